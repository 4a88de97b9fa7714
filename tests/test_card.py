"""Model cards: rendered from a real training run, parsed back with huggingface_hub, for hybrid and GPT-2 folders."""

import json
import shutil
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import GPT2Config, GPT2LMHeadModel

from training.arguments import arguments_from_dict
from training.card import GENERATED_MARKER, RunFiles, architecture_rows, describe_dataset, write_card
from training.cli import main as cli_main
from training.plots import read_metrics
from training.train import run_training

TINY_RUN = {
    "tokenizer": "char",
    "block_size": 32,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "rnn_type": "gru",
    "attention_layers": "2",
    "attention_window": 16,
    "batch_size": 8,
    "max_steps": 12,
    "eval_steps": 6,
    "eval_batches": 2,
    "warmup_steps": 2,
    "checkpoint_steps": 6,
    "log_steps": 3,
    "learning_rate": 1e-2,
    "sample_tokens": 8,
}


def train_tiny_run(workdir: Path) -> Path:
    """A real `hybrid-lm train` run (a few steps on 40 kB of the Python docs); returns its output folder."""
    corpus = workdir / "pydocs.txt"
    corpus.write_text("\n\n".join(topics[name] for name in sorted(topics))[:40_000], encoding="utf-8")
    output_dir = workdir / "tiny-run"
    # One thread: at this size threading costs more than it gains, and test workers share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(*arguments_from_dict({**TINY_RUN, "dataset": str(corpus), "output_dir": str(output_dir)}))
    finally:
        torch.set_num_threads(threads)
    return output_dir


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("card"))


@pytest.fixture
def folder(run_folder, tmp_path) -> Path:
    """A private copy of the run, so each test may re-render its card."""
    return Path(shutil.copytree(run_folder, tmp_path / "tiny-run"))


def eval_values(card: ModelCard) -> dict[str, float]:
    return {result.metric_type: result.metric_value for result in card.data.eval_results}


def test_card_metadata_and_model_index_equal_the_run_results(folder):
    results = json.loads((folder / "results.json").read_text())
    card = ModelCard.load(write_card(folder))

    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert {"hybrid-rnn-lm", "gru"} <= set(card.data.tags)
    assert card.data.datasets is None  # a local corpus is described in the text, never listed as a Hub dataset
    assert card.data.model_name == "tiny-run"
    # The reported numbers: the best model on the whole validation split, evaluated when the run ended.
    full = results["full_validation"]
    assert eval_values(card) == {
        name: full[name] for name in ("loss", "perplexity", "bits_per_token", "bits_per_character")
    }
    assert {result.dataset_split for result in card.data.eval_results} == {"validation"}


def test_card_body_documents_architecture_training_and_results(folder):
    results = json.loads((folder / "results.json").read_text())
    text = write_card(folder).read_text()

    assert f"| Parameters | {results['num_parameters']:,} |" in text
    assert f"| Non-embedding parameters | {results['num_non_embedding_parameters']:,} |" in text
    assert "| Recurrent cell | GRU (fused `torch.nn.GRU`) |" in text
    assert "| Attention layers | blocks 1 of 0-1 (1 of 2, every 2nd block) |" in text
    assert "| Attention window | sliding, 16 tokens |" in text
    assert "| Evaluated on | full validation split |" in text
    assert f"| Validation loss (nats per token) | {results['full_validation']['loss']:.4f} |" in text
    stream_loss = results["full_validation"]["stream"]["loss"]
    assert f"| Validation loss read as one stream, recurrent state carried (every token) | {stream_loss:.4f} |" in text
    assert f"| Loss of the periodic evaluation that chose the best step | {results['best_val_loss']:.4f} |" in text
    assert "| `max_steps` | `12` |" in text and "| `learning_rate` | `0.01` |" in text
    assert "![Training and validation loss](loss_curve.png)" in text
    assert "## Intended use and limitations" in text
    # The trainer's directory layout stays private: only the last two parts of local paths appear.
    assert str(folder.parent) not in text
    assert "transformers>=5.25,<6" in text and "trust_remote_code=True" in text


def test_cli_renders_the_snippet_for_a_hub_repo_and_keeps_the_chosen_license(folder, capsys):
    assert (
        cli_main(["card", str(folder), "--repo-id", "someone/tiny-gru", "--revision", "v1.0", "--license", "mit"]) == 0
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and card.data.model_name == "tiny-gru"
    assert 'repo_id = "someone/tiny-gru"' in card.text and 'revision = "v1.0"' in card.text
    assert "repo_id, revision=revision, trust_remote_code=True, use_safetensors=True" in card.text

    assert cli_main(["card", str(folder)]) == 0  # re-rendering keeps the license chosen before
    assert ModelCard.load(folder / "README.md").data.license == "mit"
    assert GENERATED_MARKER in (folder / "README.md").read_text()


def test_gpt2_baseline_card_needs_no_remote_code(run_folder, tmp_path):
    folder = tmp_path / "gpt2-run"
    config = GPT2Config(vocab_size=95, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "training_args.yaml", "loss_curve.png"):
        shutil.copy(run_folder / name, folder / name)
    results = {
        **json.loads((run_folder / "results.json").read_text()),
        "architecture": "gpt2",
        "dataset": "wikitext:wikitext-2-raw-v1",  # a Hub dataset: listed in the metadata
    }
    results.pop("num_parameters")  # counted from the safetensors header instead
    (folder / "results.json").write_text(json.dumps(results))

    card = ModelCard.load(write_card(folder, repo_id="someone/gpt2-baseline"))
    assert "trust_remote_code" not in card.text
    assert {"gpt2", "baseline"} <= set(card.data.tags)
    assert "| Architecture | GPT-2 (`GPT2LMHeadModel`), the attention-only baseline |" in card.text
    assert "| Recurrent cell | none |" in card.text
    total = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())  # tied head counted once
    assert f"| Parameters | {total:,} |" in card.text
    assert eval_values(card)["loss"] == results["full_validation"]["loss"]
    assert card.data.datasets == ["wikitext"]
    assert {(r.dataset_type, r.dataset_config) for r in card.data.eval_results} == {("wikitext", "wikitext-2-raw-v1")}


@pytest.mark.parametrize(
    ("dataset", "hub_id", "label", "config"),
    [
        ("wikitext:wikitext-2-raw-v1", "wikitext", "wikitext", "wikitext-2-raw-v1"),
        ("Salesforce/wikitext", "Salesforce/wikitext", "Salesforce/wikitext", None),
        ("python-docs", None, "python-docs", None),
        ("/home/someone/data/shakespeare/input.txt", None, "shakespeare/input.txt", None),
        ("data/*.jsonl", None, "data/*.jsonl", None),
    ],
    ids=["hub-with-config", "hub-namespaced", "built-in", "local-file", "local-glob"],
)
def test_only_hub_datasets_are_listed_as_hub_datasets(tmp_path, dataset, hub_id, label, config):
    info = describe_dataset(RunFiles(folder=tmp_path, config={}, results={"dataset": dataset}))
    assert (info.hub_id, info.label, info.config) == (hub_id, label, config)


def test_a_hand_written_card_is_replaced_only_with_overwrite(folder, capsys):
    """The generated card says "delete this line to keep manual edits"; `hybrid-lm card` must then keep them too."""
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace(GENERATED_MARKER, "") + "\nMy own notes.\n")
    before = readme.read_bytes()
    assert cli_main(["card", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: {readme} is not a generated card (it lacks the line {GENERATED_MARKER[:40]}...: written or kept by "
        "hand), so rendering would replace your text: move it aside, or pass --overwrite to replace it"
    ]
    assert readme.read_bytes() == before
    assert cli_main(["card", str(folder), "--overwrite"]) == 0
    assert GENERATED_MARKER in readme.read_text() and "My own notes." not in readme.read_text()


def test_the_end_of_a_run_keeps_a_hand_written_card(folder, caplog):
    """A resumed run ends by writing its card: one kept by hand stays (with a warning), a generated one is redone."""
    from training.train import write_model_card

    readme = folder / "README.md"
    readme.write_text("# My own card\n")
    with caplog.at_level("WARNING", logger="training.train"):
        write_model_card(folder)
    assert readme.read_text() == "# My own card\n"
    assert f"kept the hand-edited {readme}" in caplog.text and f"`hybrid-lm card {folder} --overwrite`" in caplog.text
    readme.write_text(GENERATED_MARKER + "\nstale\n")
    write_model_card(folder)
    assert "stale" not in readme.read_text() and "## Intended use and limitations" in readme.read_text()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["card", "{missing}"], "is not a folder; pass the output folder of `hybrid-lm train`"),
        (["card", "{folder}", "--repo-id", "bad--name/x"], "invalid repository id 'bad--name/x'"),
        (["card", "{folder}", "--license", "Apache 2"], "license 'Apache 2' is not a Hub license identifier"),
        (["card", "{folder}", "--bogus"], "unrecognized arguments: --bogus (see `hybrid-lm card --help`)"),
    ],
    ids=["missing-folder", "invalid-repo-id", "invalid-license", "unknown-flag"],
)
def test_bad_input_is_one_line_and_leaves_the_card_untouched(folder, tmp_path, capsys, argv, expected):
    before = (folder / "README.md").read_bytes()
    argv = [arg.format(missing=tmp_path / "nowhere", folder=folder) for arg in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert (folder / "README.md").read_bytes() == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"best_val_loss": 1.2,', "is not valid JSON (Expecting"),
        ("[1, 2]", "holds an array, not a JSON object; re-create it by re-running the command that wrote it"),
        ("null", "holds null, not a JSON object"),
        (b"\xff\xfe", "is not valid JSON ('utf-8' codec can't decode"),
    ],
    ids=["torn", "array", "null", "not-utf8"],
)
def test_a_damaged_results_file_is_one_line_and_leaves_the_card_untouched(folder, capsys, content, expected):
    before = (folder / "README.md").read_bytes()
    results = folder / "results.json"
    results.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cli_main(["card", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {results} {expected}") and err.count("\n") == 1
    assert (folder / "README.md").read_bytes() == before


@pytest.mark.parametrize("attention_layers", ["all", "none", 2, [0, 3]], ids=["all", "none", "every-2nd", "list"])
def test_attention_row_names_the_blocks_the_config_gives_attention(tmp_path, attention_layers):
    from hybrid_rnn_lm import HybridRnnLmConfig

    config = HybridRnnLmConfig(
        num_hidden_layers=4, hidden_size=16, num_attention_heads=2, attention_layers=attention_layers
    )
    saved = json.loads(config.to_json_string())  # what config.json holds
    rows = dict(architecture_rows(RunFiles(folder=tmp_path, config=saved)))
    indices = config.attention_layer_indices
    expected = {0: "none (pure recurrent model)", 4: "every block (4 of 4)"}.get(len(indices))
    assert rows["Attention layers"] == expected or rows["Attention layers"].startswith(
        f"blocks {', '.join(map(str, indices))} of 0-3 ({len(indices)} of 4"
    )
    assert ("Attention heads" in rows) == bool(indices)


def test_a_torn_last_metrics_line_left_by_a_kill_is_ignored(folder):
    expected = write_card(folder).read_text()
    metrics = folder / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 999, "train_lo')  # cut off mid-row, no newline
    assert write_card(folder).read_text() == expected
    rows = read_metrics(metrics)
    assert rows[-1]["step"] != 999
    metrics.write_text(metrics.read_text().rsplit("\n", 1)[0] + '\n{"step": 999, "train_loss": 1.0}')  # whole row
    assert read_metrics(metrics)[-1] == {"step": 999, "train_loss": 1.0}


def test_activation_row_names_the_saved_activation_and_gelu_for_configs_saved_before_the_field(tmp_path):
    from hybrid_rnn_lm import HybridRnnLmConfig

    saved = json.loads(HybridRnnLmConfig(hidden_size=16, num_attention_heads=2, hidden_act="relu2").to_json_string())
    assert dict(architecture_rows(RunFiles(folder=tmp_path, config=saved)))["MLP activation"] == "`relu2`"
    del saved["hidden_act"]  # an older config.json: its models computed GELU
    assert dict(architecture_rows(RunFiles(folder=tmp_path, config=saved)))["MLP activation"] == "`gelu`"
    gpt2 = {"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 32, "vocab_size": 40}
    assert dict(architecture_rows(RunFiles(folder=tmp_path, config=gpt2)))["MLP activation"] == "`gelu_new`"
