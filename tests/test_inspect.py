"""hybrid-lm inspect: PNG grids of the right shape, summary numbers equal to direct computations."""

import json

import matplotlib.image
import pytest
import torch

from tests.test_generate_cli import error_line, run_cli, save_tiny_model, single_thread  # noqa: F401
from training.generate import load_model_and_tokenizer
from training.inspect import DPI, LINE_PANEL_INCHES, PANEL_INCHES

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."
HEADS = 4

# What inspect writes for a model without attention layers (no attention.png)
FILES_WITHOUT_ATTENTION = ["embeddings.png", "hidden_norms.png", "recurrent_state.png", "summary.json", "summary.md"]


def markdown_rows(summary: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`, as lists of cell strings."""
    lines = summary.split(heading, 1)[1].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]  # without the header and separator rows


def step_by_step_state_changes(model_dir, ids: torch.Tensor) -> list[torch.Tensor]:
    """||h_t - h_(t-1)|| per block from a token-by-token cached pass: the states the cache carries."""
    model, _ = load_model_and_tokenizer(model_dir)
    states = [[] for _ in model.model.layers]
    cache = None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            cache = model(ids[:, t : t + 1], cache=cache, use_cache=True).cache
            for index in range(len(states)):
                states[index].append(cache.get_recurrent_state(index)[0, 0].clone())  # (H,) h; updated in place
    changes = []
    for per_step in states:
        stacked = torch.stack(per_step)  # (T, H)
        changes.append((stacked - torch.cat([torch.zeros_like(stacked[:1]), stacked[:-1]])).norm(dim=-1))
    return changes


@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "mingru"])
def test_figures_and_summary_match_direct_computations(tmp_path, capsys, rnn_type):
    model_dir = save_tiny_model(tmp_path / "model", rnn_type=rnn_type, layout="every-2nd", num_hidden_layers=3)
    out_dir = tmp_path / "inspect"
    code, _, err = run_cli(capsys, "inspect", "--model", str(model_dir), "--text", TEXT, "--output-dir", str(out_dir))
    assert code == 0, err

    # Attention: one panel per (attention layer, head); this model has attention in block 1 only.
    attention = matplotlib.image.imread(out_dir / "attention.png")
    assert attention.shape[:2] == (round(1 * PANEL_INCHES * DPI), round(HEADS * PANEL_INCHES * DPI))
    width, height = LINE_PANEL_INCHES
    for name in ("hidden_norms.png", "recurrent_state.png"):  # one panel per block
        assert matplotlib.image.imread(out_dir / name).shape[:2] == (round(3 * height * DPI), round(width * DPI))
    saved = json.loads((out_dir / "summary.json").read_text())
    assert {name: (grid["rows"], grid["columns"]) for name, grid in saved["figures"].items()} == {
        "attention": (1, HEADS),
        "hidden_norms": (3, 1),
        "recurrent_state": (3, 1),
        "embeddings": (1, 1),
    }

    summary = (out_dir / "summary.md").read_text()
    model, tokenizer = load_model_and_tokenizer(model_dir)
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    assert f"{ids.shape[1]} tokens" in summary

    # Recurrent state change: the summary's mean/max equal a token-by-token pass through the cache.
    direct = step_by_step_state_changes(model_dir, ids)
    rows = markdown_rows(summary, "## Recurrent state change")
    assert len(rows) == 3
    for row, changes in zip(rows, direct):
        assert float(row[1]) == pytest.approx(changes.mean().item(), abs=1e-4)
        assert float(row[2]) == pytest.approx(changes.max().item(), abs=1e-4)
        assert int(row[3]) == int(changes.argmax())

    # Stream norms: after the MLP of block i is the input of block i + 1 (output_hidden_states).
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    rows = markdown_rows(summary, "## Residual stream norm")
    assert [row[2] for row in rows] == ["-", f"{saved['stream_norms'][1]['attention']:.4f}", "-"]
    for index in range(2):
        assert float(rows[index][3]) == pytest.approx(hidden[index + 1][0].norm(dim=-1).mean().item(), abs=1e-4)

    # Attention statistics of the one attention block equal those of the model's own attention maps.
    with torch.no_grad():
        eager, _ = load_model_and_tokenizer(model_dir, attn_implementation="eager")
        maps = eager(ids, output_attentions=True, use_cache=False).attentions[0][0]  # (heads, T, T)
    entropy = -(maps * maps.clamp_min(1e-12).log()).sum(-1).mean(-1)
    rows = markdown_rows(summary, "## Attention")
    assert [(row[0], row[1]) for row in rows] == [("1", str(head)) for head in range(HEADS)]
    assert [float(row[2]) for row in rows] == pytest.approx(entropy.tolist(), abs=1e-4)


def test_a_pure_recurrent_model_has_no_attention_figure(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model", layout="no-attention")
    out_dir = tmp_path / "inspect"
    code, _, err = run_cli(
        capsys, "inspect", "--model", str(model_dir), "--text", "Speak", "--output-dir", str(out_dir)
    )
    assert code == 0, err
    assert sorted(path.name for path in out_dir.iterdir()) == FILES_WITHOUT_ATTENTION
    assert "This model has no attention layers" in (out_dir / "summary.md").read_text()


def test_an_output_dir_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    notes = tmp_path / "notes"
    notes.write_text("mine")
    for output_dir, message in (
        (notes, f"--output-dir {notes} is a file, not a folder; choose another --output-dir"),
        (notes / "o", f"--output-dir {notes / 'o'}: {notes} is a file, not a folder; choose another --output-dir"),
    ):
        code, _, err = run_cli(
            capsys, "inspect", "--model", str(model_dir), "--text", "x", "--output-dir", str(output_dir)
        )
        assert code == 2 and error_line(err) == f"error: {message}"
    assert notes.read_text() == "mine"


def test_files_of_its_names_are_replaced_only_when_an_earlier_inspection_wrote_them(tmp_path, capsys):
    """A folder of the user's own summary.md / attention.png is refused and left as it was; an earlier inspection's
    folder is replaced, and a figure the new model does not have (attention) is not left behind from the old one."""
    with_attention = save_tiny_model(tmp_path / "with-attention")
    without_attention = save_tiny_model(tmp_path / "without-attention", layout="no-attention")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("my notes")
    (mine / "attention.png").write_bytes(b"my figure")
    code, _, err = run_cli(
        capsys, "inspect", "--model", str(with_attention), "--text", "Speak", "--output-dir", str(mine)
    )
    assert code == 2
    assert error_line(err) == (
        f"error: {mine} already holds attention.png, summary.md, which `hybrid-lm inspect` did not write there "
        "(it would replace them); choose another --output-dir"
    )
    assert sorted(path.name for path in mine.iterdir()) == ["attention.png", "summary.md"]
    assert (mine / "summary.md").read_text() == "my notes" and (mine / "attention.png").read_bytes() == b"my figure"

    out_dir = tmp_path / "inspect"
    for model_dir in (with_attention, without_attention):
        code, _, err = run_cli(
            capsys, "inspect", "--model", str(model_dir), "--text", "Speak", "--output-dir", str(out_dir)
        )
        assert code == 0, err
    assert sorted(path.name for path in out_dir.iterdir()) == FILES_WITHOUT_ATTENTION
    assert f"# Inspection of {without_attention}" in (out_dir / "summary.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--text", ""], "the text is empty after tokenization"),
        (["--text", "x", "--text-file", "t.txt"], "give exactly one of --text TEXT or --text-file FILE"),
        (["--text-file", "missing.txt"], "--text-file missing.txt does not exist"),
        (["--text-file", "."], "--text-file . is a folder: give the path of a text file"),
    ],
    ids=["empty-text", "two-texts", "missing-file", "file-is-a-folder"],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, argv, message):
    model_dir = save_tiny_model(tmp_path / "model")
    code, _, err = run_cli(capsys, "inspect", "--model", str(model_dir), "--output-dir", str(tmp_path / "o"), *argv)
    assert code == 2
    assert message in error_line(err)
    assert not (tmp_path / "o").exists()
