"""`hybrid-lm sweep`: a tiny study end to end (hybrid at two sizes, a repeated seed, a GPT-2 baseline), its report
checked against the runs' own logs, resumption, and one-line errors for bad study files."""

import csv
import json
import math
import re
import statistics
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib import image

import training.train
from training.cli import main as cli_main
from training.sweep import load_study, plan_runs

# One worker runs the whole module: its tests share one swept study.
pytestmark = pytest.mark.xdist_group("sweep")

STUDIES = Path(__file__).resolve().parents[1] / "training" / "studies"
RUN_NAMES = {"hybrid-s-seed1", "hybrid-s-seed2", "hybrid-m", "gpt2-s", "hybrid-m-fast-lr"}
STUDY = {
    "name": "tiny",
    "description": "Two hybrid sizes, one repeated seed, a GPT-2 baseline and a learning-rate variant.",
    "base": {
        "dataset": "corpus.txt",
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "block_size": 32,
        "batch_size": 4,
        "max_steps": 400,  # never used: the test runs --quick
        "eval_steps": 100,
        "eval_batches": 2,
        "log_steps": 4,
        "warmup_steps": 2,
        "checkpoint_steps": 0,
        "sample_tokens": 0,
        "cache_dir": "blocks",  # the token-block cache every run shares (relative to the working folder)
    },
    "variations": [
        {"name": "hybrid-s", "group": ["hybrid", "small"], "seeds": [1, 2]},
        {"name": "hybrid-m", "group": "hybrid", "hidden_size": 32},
        {"name": "gpt2-s", "group": ["gpt2", "small"], "architecture": "gpt2"},
        # Another training recipe: shown, but kept out of the scaling fit.
        {"name": "hybrid-m-fast-lr", "group": "lr", "hidden_size": 32, "learning_rate": 0.01},
    ],
    "quick": {"max_steps": 8, "eval_steps": 4},
    "scaling": True,
}


def _corpus() -> str:
    """~24K characters of word salad: enough for 32-token blocks, no download, the same on every machine."""
    rng = np.random.default_rng(0)
    words = "the king and queen of a small town said that we shall go home now, my lord; yes.\n".split(" ")
    return " ".join(rng.choice(words, size=5000))


def _sweep(study_path: Path, output: Path, capsys, monkeypatch, *extra: str) -> tuple[int, str, str]:
    monkeypatch.chdir(study_path.parent)  # the study's dataset path is relative to the working folder
    code = cli_main(["sweep", str(study_path), "--quick", "--output-dir", str(output), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The study swept once in quick mode: (folder, study path, output dir, what the sweep printed)."""
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "corpus.txt").write_text(_corpus())
    study_path = folder / "study.yaml"
    study_path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    output = folder / "report"
    patch, printed = pytest.MonkeyPatch(), StringIO()
    patch.chdir(folder)
    try:
        with redirect_stdout(printed):
            code = cli_main(["sweep", str(study_path), "--quick", "--output-dir", str(output)])
    finally:
        patch.undo()
    assert code == 0
    return folder, study_path, output, printed.getvalue()


def _csv(output: Path) -> list[dict]:
    with (output / "results.csv").open() as stream:
        return list(csv.DictReader(stream))


def _metrics(output: Path, run: str) -> list[dict]:
    lines = (output / "runs" / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_csv_numbers_are_the_runs_own(swept):
    output = swept[2]
    rows = _csv(output)
    assert {row["run"] for row in rows} == RUN_NAMES
    for row in rows:
        results = json.loads((output / "runs" / row["run"] / "results.json").read_text())
        metrics = _metrics(output, row["run"])
        evaluations = [m["val_loss"] for m in metrics if "val_loss" in m]
        train_losses = [m["train_loss"] for m in metrics if "train_loss" in m]
        # Exact: the CSV keeps full precision, so it reproduces each run's logs number for number.
        assert float(row["best_val_loss"]) == results["best_val_loss"] == min(evaluations)
        assert float(row["final_train_loss"]) == train_losses[-1]
        assert float(row["train_val_gap"]) == pytest.approx(evaluations[-1] - train_losses[-1], abs=1e-12)
        assert int(row["train_tokens"]) == 8 * 4 * 32 == results["train_tokens"]
        assert float(row["tokens_per_second"]) == results["tokens_per_second"] > 0
        wall_time = json.loads((output / "runs" / row["run"] / "sweep_run.json").read_text())["wall_time_s"]
        assert float(row["tokens_per_wall_second"]) == results["train_tokens"] / wall_time
        assert int(row["num_non_embedding_parameters"]) == results["num_non_embedding_parameters"]
    by_run = {row["run"]: row for row in rows}
    assert [run for run, row in by_run.items() if row["same_recipe"] == "False"] == ["hybrid-m-fast-lr"]
    assert by_run["gpt2-s"]["architecture"] == "gpt2" and by_run["hybrid-m"]["architecture"] == "hybrid"
    assert int(by_run["hybrid-m"]["num_non_embedding_parameters"]) > int(
        by_run["hybrid-s-seed1"]["num_non_embedding_parameters"]
    )
    # Seed repeats share a configuration id; different configurations do not.
    assert (
        by_run["hybrid-s-seed1"]["config_id"]
        == by_run["hybrid-s-seed2"]["config_id"]
        != by_run["hybrid-m"]["config_id"]
    )


def test_report_table_is_sorted_and_matches_the_csv(swept):
    output = swept[2]
    report = (output / "REPORT.md").read_text()
    table = report.split("## Results (sorted by best validation loss)")[1].split("\n\n")[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    names = [cells[1].strip() for cells in rows]
    losses = [float(cells[11]) for cells in rows]
    steps = [int(cells[8].replace(",", "")) for cells in rows]
    assert steps == [8] * len(rows)
    assert set(names) == RUN_NAMES and losses == sorted(losses)
    csv_losses = {row["run"]: float(row["best_val_loss"]) for row in _csv(output)}
    assert losses == [float(f"{csv_losses[name]:.4f}") for name in names]
    assert "8 steps x 4 sequences x 32 tokens = 1,024 training tokens" in report
    assert re.search(r"Hardware: .+, \d+ cores, torch [\d.]+\S* with \d+ threads?", report)
    assert re.search(r"Wall time of the study: [\d.]+ min over 5 runs", report)


def test_noise_is_the_std_over_seeds(swept):
    output = swept[2]
    report = (output / "REPORT.md").read_text()
    row = re.search(r"^\| hybrid-s \| 1, 2 \| ([\d.]+) \| ([\d.]+) \|", report, re.MULTILINE)
    assert row, report
    losses = [float(r["best_val_loss"]) for r in _csv(output) if r["variation"] == "hybrid-s"]
    assert row.group(1) == f"{statistics.fmean(losses):.4f}"
    assert row.group(2) == f"{statistics.stdev(losses):.4f}"


def test_power_law_fit_equals_a_direct_fit_of_the_csv(swept):
    output = swept[2]
    report = (output / "REPORT.md").read_text()
    rows = _csv(output)
    for architecture in ("hybrid", "gpt2"):
        points = [r for r in rows if r["architecture"] == architecture and r["same_recipe"] == "True"]
        sizes = {r["num_non_embedding_parameters"] for r in points}
        fitted = re.search(
            rf"^\| {architecture} \| (\d+) \| [\d,]+ - [\d,]+ \| ([\d.]+) \| (-?[\d.]+) \|", report, re.M
        )
        if len(sizes) < 2:  # one size (gpt2 here): nothing to fit, and the report does not pretend to
            assert fitted is None
            continue
        x = np.log([float(r["num_non_embedding_parameters"]) for r in points])
        y = np.log([float(r["best_val_loss"]) for r in points])
        slope, intercept = np.polyfit(x, y, 1)
        assert fitted is not None and int(fitted.group(1)) == len(points) == 3
        assert float(fitted.group(3)) == pytest.approx(slope, abs=6e-6)
        assert float(fitted.group(2)) == pytest.approx(math.exp(intercept), abs=6e-5)


def test_every_plot_is_a_real_png_linked_from_the_report(swept):
    output = swept[2]
    report = (output / "REPORT.md").read_text()
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report))
    groups = ("hybrid", "small", "gpt2", "lr")
    expected = {f"curves-{group}.png" for group in groups} | {f"curves-{group}-time.png" for group in groups}
    expected |= {"scaling.png", "ablation.png", "train_val_gap.png"}
    assert linked == expected == {path.name for path in output.glob("*.png")}
    for name in linked:
        pixels = image.imread(output / name)
        assert pixels.ndim == 3 and pixels.shape[0] >= 400 and pixels.shape[1] >= 700, name
        assert (pixels[..., :3] < 0.5).mean() > 0.002, f"{name} is blank"


def _cache_written_only_by_the_first_run(folder: Path, output: Path) -> bool:
    """One cache entry per split, written while the first run prepared its data and never rewritten since."""
    entries = list((folder / "blocks").glob("blocks-*/stats.json"))
    first_run_finished = (output / "runs" / "hybrid-s-seed1" / "results.json").stat().st_mtime
    return len(entries) == 2 and all(entry.stat().st_mtime <= first_run_finished for entry in entries)


def test_the_corpus_is_tokenized_once_and_weights_are_not_kept(swept):
    folder, _, output, printed = swept
    assert "5 trained, 0 skipped" in printed
    assert printed.count("best validation loss") == 5  # one progress line per run
    assert _cache_written_only_by_the_first_run(folder, output)
    assert not list(output.rglob("*.safetensors")) and not list(output.rglob("checkpoints"))
    assert (output / "runs" / ".gitignore").read_text() == "*\n"  # run folders stay out of git


def test_rerun_skips_finished_runs_and_redoes_only_a_missing_one(swept, capsys, monkeypatch):
    _, study_path, output, _ = swept
    before = {run: (output / "runs" / run / "metrics.jsonl").read_bytes() for run in RUN_NAMES}
    csv_before = (output / "results.csv").read_text()

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(training.train, "run_training", must_not_train)
    (output / "my-figure.png").write_bytes(b"the user's own")
    (output / "curves-a-group-since-removed.png").write_bytes(b"stale")
    code, out, _ = _sweep(study_path, output, capsys, monkeypatch)
    assert code == 0
    # The report's plots of groups that are gone are removed; nothing else in the folder is touched.
    assert (output / "my-figure.png").read_bytes() == b"the user's own"
    assert not (output / "curves-a-group-since-removed.png").exists()
    assert out.count("already finished (results.json exists), skipped") == 5
    assert "0 trained, 5 skipped" in out
    assert {run: (output / "runs" / run / "metrics.jsonl").read_bytes() for run in RUN_NAMES} == before
    assert (output / "results.csv").read_text() == csv_before
    monkeypatch.undo()

    # An unfinished run (no results.json) is trained again from scratch, alone; the others stay as they are.
    (output / "runs" / "gpt2-s" / "results.json").unlink()
    trained = []
    original = training.train.run_training
    monkeypatch.setattr(training.train, "run_training", lambda *a, **k: trained.append(a) or original(*a, **k))
    code, out, _ = _sweep(study_path, output, capsys, monkeypatch)
    assert code == 0 and len(trained) == 1 and "1 trained, 4 skipped" in out
    assert _cache_written_only_by_the_first_run(study_path.parent, output)
    rows = {row["run"]: row for row in _csv(output)}
    old = {row["run"]: row for row in csv.DictReader(csv_before.splitlines())}
    for run in RUN_NAMES - {"gpt2-s"}:
        assert rows[run] == old[run]
    # Same seed, same data order: the redone run reproduces its first result.
    assert float(rows["gpt2-s"]["best_val_loss"]) == pytest.approx(float(old["gpt2-s"]["best_val_loss"]), abs=1e-6)


def test_a_folder_of_the_users_own_files_is_refused_before_any_training(swept, tmp_path, capsys, monkeypatch):
    """--output-dir pointed at a folder whose REPORT.md, results.csv or plots no sweep wrote: the report would
    replace them (and it removes plots of gone groups), so nothing is trained and nothing touched."""
    _, study_path, _, _ = swept
    folder = tmp_path / "docs"
    folder.mkdir()
    own = {"REPORT.md": b"# My report\n", "ablation.png": b"mine", "photo.png": b"mine too"}
    for name, content in own.items():
        (folder / name).write_bytes(content)
    code, out, err = _sweep(study_path, folder, capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"error: --output-dir {folder} holds REPORT.md, ablation.png, which no study report wrote and the report "
        "would replace; move them elsewhere or choose another --output-dir"
    ]
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == own


def test_a_changed_study_does_not_reuse_stale_runs(swept, tmp_path, capsys, monkeypatch):
    folder, _, output, _ = swept
    changed = yaml.safe_load(yaml.safe_dump(STUDY))
    changed["quick"]["max_steps"] = 12
    study_path = folder / "changed.yaml"
    study_path.write_text(yaml.safe_dump(changed))
    code, _, err = _sweep(study_path, output, capsys, monkeypatch)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: run hybrid-s-seed1 in {output / 'runs' / 'hybrid-s-seed1'} was trained with other options "
        "(max_steps 8 -> 12); the study file or flags changed since: delete that folder to redo the run, "
        "or pass another --output-dir"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"colour": "blue"},
            "study file {path} has unknown key(s) colour; valid keys are base, description, grid, group_by, "
            "keep_weights, name, quick, scaling, seeds, variations",
            id="unknown-study-key",
        ),
        pytest.param(
            {"variations": [{"name": "big", "hiden_size": 64}]},
            "study file {path}, variation big has unknown option(s) hiden_size; valid names are those of "
            "`hybrid-lm train --help` with underscores",
            id="misspelt-option",
        ),
        pytest.param(
            {"base": {"output_dir": "x"}},
            "study file {path}, base sets output_dir, which the sweep decides (each run goes to "
            "<output-dir>/runs/<name>); remove it and pass --output-dir to `hybrid-lm sweep` instead",
            id="sweep-owned-option",
        ),
        pytest.param(
            {"name": "../elsewhere"},
            "study file {path}: name '../elsewhere' must be a plain folder name (letters, digits, - _ .; not . or ..)",
            id="study-name-outside-results",
        ),
        pytest.param(
            {"variations": [{"name": "..", "hidden_size": 64}]},
            "study file {path}: variation name '..' must be a plain folder name (letters, digits, - _ .; not . or ..)",
            id="run-name-outside-runs",
        ),
        pytest.param(
            {"seeds": [1, 1]},
            "study file {path}: seeds [1, 1] repeat a value; list each seed once",
            id="repeated-seed",
        ),
        pytest.param(
            {"variations": [{"name": "odd-heads", "num_attention_heads": 3}]},
            "study {path}, run odd-heads: --num-attention-heads 3 does not divide --hidden-size 160; pick a number "
            "of heads that divides the hidden size",
            id="invalid-run",
        ),
        pytest.param(
            {"base": {"dataset": "missing/corpus.txt"}},
            "dataset missing/corpus.txt does not exist (paths are relative to the folder you run from); pass "
            "the corpus with --dataset PATH, e.g. --dataset ../shared/data/tinyshakespeare/input.txt",
            id="missing-dataset",
        ),
    ],
)
def test_bad_study_files_fail_with_one_line(tmp_path, capsys, monkeypatch, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(change))
    code, out, err = _sweep(path, tmp_path / "out", capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.splitlines() == ["error: " + message.format(path=path)]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_shipped_studies_plan_and_sizes_spans_16x_with_matched_gpt2():
    from training.arguments import arguments_from_dict
    from training.tokenization import build_tokenizer
    from training.train import build_model, count_parameters

    # Tiny Shakespeare's 65 distinct characters: the char tokenizer then has the studies' 69 tokens.
    letters = "".join(map(chr, range(65, 91))) + "".join(map(chr, range(97, 123)))
    tokenizer = build_tokenizer("char", ["\n !$&',-.3:;?" + letters])
    assert len(tokenizer) == 69
    for path in sorted(STUDIES.glob("*.yaml")):
        study = load_study(path)
        planned = plan_runs(study, Path("runs"), quick=True)
        full = plan_runs(study, Path("runs"))
        assert [run.name for run in planned] == [run.name for run in full], path.name  # quick: same grid
        for quick_run, full_run in zip(planned, full):  # a budget of steps or of training minutes
            budget = "max_steps" if full_run.options["max_steps"] is not None else "max_train_minutes"
            assert quick_run.options[budget] * 10 <= full_run.options[budget], (path.name, budget)
        assert len({run.options["seed"] for run in full}) >= 2, f"{path.name} measures no run-to-run noise"
    sizes = plan_runs(load_study(STUDIES / "sizes.yaml"), Path("runs"))
    counts = {}
    for run in sizes:
        model_args, data_args, _ = arguments_from_dict(run.options)
        counts[run.variation] = count_parameters(build_model(model_args, tokenizer, data_args.block_size))
    hybrid = {name.split("-")[1]: c for name, c in counts.items() if name.startswith("hybrid")}
    gpt2 = {name.split("-")[1]: c for name, c in counts.items() if name.startswith("gpt2")}
    assert hybrid.keys() == gpt2.keys() and len(hybrid) >= 4
    spans = [c["num_non_embedding_parameters"] for c in hybrid.values()]
    assert max(spans) >= 16 * min(spans)
    for size in hybrid:
        assert gpt2[size]["num_parameters"] == pytest.approx(hybrid[size]["num_parameters"], rel=0.05), size

    # The cell studies: every hybrid within 10% of GPT-2's parameter count, the same models under both budgets.
    for name in ("cells-steps.yaml", "cells-minutes.yaml"):
        runs = plan_runs(load_study(STUDIES / name), Path("runs"))
        counts = {}
        for run in runs:
            model_args, data_args, _ = arguments_from_dict(run.options)
            counts[run.variation] = count_parameters(build_model(model_args, tokenizer, data_args.block_size))
        reference = counts.pop("gpt2")["num_parameters"]
        counts = {variation: count for variation, count in counts.items() if "-lr" not in variation}
        assert set(counts) == {"rnn", "gru", "lstm", "mingru", "minlstm"}
        for cell, count in counts.items():
            assert count["num_parameters"] == pytest.approx(reference, rel=0.1), (name, cell)
    # gru-width moves parameters from the MLP to the recurrent width: every split still within 10% of that GPT-2.
    for run in plan_runs(load_study(STUDIES / "gru-width.yaml"), Path("runs")):
        model_args, data_args, _ = arguments_from_dict(run.options)
        count = count_parameters(build_model(model_args, tokenizer, data_args.block_size))
        assert count["num_parameters"] == pytest.approx(reference, rel=0.1), run.name
    # minutes-size: the larger pair, the GRU hybrid and GPT-2 within 1% of each other, each given 10 training minutes.
    runs = plan_runs(load_study(STUDIES / "minutes-size.yaml"), Path("runs"))
    counts = {}
    for run in runs:
        model_args, data_args, _ = arguments_from_dict(run.options)
        counts[run.variation] = count_parameters(build_model(model_args, tokenizer, data_args.block_size))
        assert run.options["max_steps"] is None and run.options["max_train_minutes"] == 10, run.name
    (hybrid_count, gpt2_count) = (counts[name]["num_parameters"] for name in ("gru272-mlp352-10min", "gpt2-224-10min"))
    assert hybrid_count == pytest.approx(gpt2_count, rel=0.01) and hybrid_count > 2 * reference
    # minutes-5m: the same at about twice that size; GPT-2's learning-rate checks are the same model.
    counts = {}
    for run in plan_runs(load_study(STUDIES / "minutes-5m.yaml"), Path("runs")):
        model_args, data_args, _ = arguments_from_dict(run.options)
        counts[run.variation] = count_parameters(build_model(model_args, tokenizer, data_args.block_size))
        assert run.options["max_steps"] is None and run.options["max_train_minutes"] == 10, run.name
    hybrids = {name: count["num_parameters"] for name, count in counts.items() if name.startswith("gru")}
    gpt2s = {name: count["num_parameters"] for name, count in counts.items() if name.startswith("gpt2")}
    assert len(hybrids) >= 2 and len(gpt2s) >= 4 and len(hybrids) + len(gpt2s) == len(counts)
    assert len(set(hybrids.values())) == len(set(gpt2s.values())) == 1  # learning rates differ, models do not
    hybrid_count, gpt2_5m = next(iter(hybrids.values())), next(iter(gpt2s.values()))
    assert hybrid_count == pytest.approx(gpt2_5m, rel=0.01) and hybrid_count > 1.9 * gpt2_count


def test_shipped_studies_pin_the_activation_their_results_were_made_with():
    """A study's committed numbers stay reproducible when the CLI's default activation changes: every run names its
    MLP activation. The hybrids of every study but `activation` computed GELU, every GPT-2 transformers' gelu_new
    (the activation study's GPT-2 runs, the exact GELU)."""
    from training.arguments import arguments_from_dict
    from training.train import build_model_config

    for path in sorted(STUDIES.glob("*.yaml")):
        for run in plan_runs(load_study(path), Path("runs")):
            assert run.options["hidden_act"] is not None, (path.name, run.name)
            model_args, data_args, _ = arguments_from_dict(run.options)
            config = build_model_config(model_args, vocab_size=69, block_size=data_args.block_size)
            activation = getattr(config, "hidden_act", None) or config.activation_function
            if path.name == "activation.yaml":
                expected = "gelu" if run.name.startswith("gpt2") else run.variation.split("-")[-1]
            else:
                expected = "gelu_new" if model_args.architecture == "gpt2" else "gelu"
            assert activation == expected, (path.name, run.name, activation)


def test_runs_option_trains_only_the_named_runs_and_rejects_unknown_ones(tmp_path, capsys, monkeypatch):
    (tmp_path / "corpus.txt").write_text(_corpus())
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    output = tmp_path / "report"
    code, _, err = _sweep(study_path, output, capsys, monkeypatch, "--runs", "hybrid-m,transformer")
    assert code == 2 and not output.exists()
    assert err.splitlines() == [
        "error: --runs: transformer not in study tiny; its runs are "
        "hybrid-s-seed1, hybrid-s-seed2, hybrid-m, gpt2-s, hybrid-m-fast-lr"
    ]
    for empty in ("", " , "):  # an empty list (a shell variable that was not set) is not "every run"
        code, _, err = _sweep(study_path, output, capsys, monkeypatch, "--runs", empty)
        assert code == 2 and not output.exists()
        assert err.splitlines() == [
            f"error: --runs {empty!r} names no run; give run names (e.g. --runs hybrid-s-seed1) or leave --runs "
            "out to train every run"
        ]
    code, out, _ = _sweep(study_path, output, capsys, monkeypatch, "--runs", "hybrid-m")
    assert code == 0 and "1 trained, 0 skipped" in out
    assert sorted(p.name for p in (output / "runs").iterdir() if p.is_dir()) == ["hybrid-m"]
    report = (output / "REPORT.md").read_text()
    assert "- Data: `corpus.txt`" in report  # the path as given, relative to the folder the study ran from
