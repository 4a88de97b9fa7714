"""The report of a study: results.csv, REPORT.md and PNG plots, all read back from the runs' own files.

Every number comes from a run folder written by `run_training` (results.json, metrics.jsonl,
training_args.yaml) plus the sweep's sweep_run.json (variation, groups, wall time, hardware):
- best validation loss, perplexity and bits: the best evaluation (the minimum val_loss of metrics.jsonl);
- final train loss: the last train_loss row of metrics.jsonl (mean over the last `log_steps` steps, dropout on);
- train/validation gap: the last evaluation's val_loss minus that final train loss (positive = overfitting side);
- scaling: best validation loss vs non-embedding parameters, a least-squares line in log-log space per
  architecture, i.e. the power law L = a * N^b.
"""

import csv
import hashlib
import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import matplotlib
import numpy as np
import yaml

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from training.errors import UserError  # noqa: E402
from training.plots import DPI, FIGURE_SIZE_INCHES, read_metrics  # noqa: E402

REPORT_FILE = "REPORT.md"
CSV_FILE = "results.csv"
SCALING_PLOT = "scaling.png"
ABLATION_PLOT = "ablation.png"
GAP_PLOT = "train_val_gap.png"
REPORT_MARKER = "Produced by `hybrid-lm sweep "  # in every REPORT.md a study writes
ARCHITECTURE_COLORS = {"hybrid": "tab:blue", "gpt2": "tab:orange"}


@dataclass
class RunRecord:
    """One row of results.csv."""

    run: str
    variation: str
    config_id: str  # the same for runs that differ only in their seed
    groups: str  # ";"-separated
    seed: int
    architecture: str
    rnn_type: str  # empty for GPT-2
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    attention_layers: str  # empty for GPT-2 (attention in every block)
    attention_window: str  # empty = full causal attention
    use_residual: bool
    num_parameters: int
    num_non_embedding_parameters: int
    steps: int
    batch_size: int
    block_size: int
    train_tokens: int
    wall_time_s: float
    train_seconds: float  # time inside training steps (evaluations excluded); NaN for runs that did not record it
    tokens_per_second: float  # the loop's training throughput (evaluations and saving excluded)
    tokens_per_wall_second: float  # train_tokens / wall_time_s: everything included, independent of the loop's logs
    best_step: int
    best_val_loss: float
    val_perplexity: float
    val_bits_per_token: float
    val_bits_per_char: float | None
    final_val_loss: float
    final_train_loss: float
    train_val_gap: float
    stopped_reason: str
    num_threads: int  # torch CPU threads of the run (per process)
    same_recipe: bool  # changes only model options (size, cell, ...) of the base: such runs form the scaling fit
    overrides: str  # what this run changes in the study's base config
    test_loss: float = math.nan  # --test-dataset: the best model on that text (NaN when the run had none)
    test_perplexity: float = math.nan
    test_oov_rate: float | None = None
    validation_oov_rate: float | None = None
    full_val_loss: float = math.nan  # the best model on the whole validation split, block by block
    stream_val_loss: float = math.nan  # ... every token scored: streamed, state carried (hybrid); sliding (GPT-2)


@dataclass
class PowerLawFit:
    """L = a * N^b, fitted on (log N, log L) by least squares."""

    architecture: str
    a: float
    b: float
    points: int
    min_parameters: int
    max_parameters: int


# ------------------------------------------------------------------------------------------------------------
# Reading runs
# ------------------------------------------------------------------------------------------------------------


def read_run(folder: Path) -> RunRecord:
    """A finished run folder -> its record."""
    results = json.loads((folder / "results.json").read_text())
    sweep = json.loads((folder / "sweep_run.json").read_text())
    options = yaml.safe_load((folder / "training_args.yaml").read_text())
    rows = read_metrics(folder / "metrics.jsonl")
    evaluations = [row for row in rows if "val_loss" in row]
    train_rows = [row for row in rows if "train_loss" in row]
    final_train = train_rows[-1]["train_loss"] if train_rows else math.nan
    final_val = evaluations[-1]["val_loss"] if evaluations else math.nan
    hybrid = results["architecture"] == "hybrid"
    return RunRecord(
        run=sweep["name"],
        variation=sweep["variation"],
        config_id=configuration_id(options),
        groups=";".join(sweep["groups"]),
        seed=sweep["seed"],
        architecture=results["architecture"],
        rnn_type=options["rnn_type"] if hybrid else "",
        hidden_size=options["hidden_size"],
        num_hidden_layers=options["num_hidden_layers"],
        num_attention_heads=options["num_attention_heads"],
        attention_layers=str(options["attention_layers"]) if hybrid else "",
        attention_window="" if options["attention_window"] is None or not hybrid else str(options["attention_window"]),
        use_residual=bool(options["use_residual"]) if hybrid else True,
        num_parameters=results["num_parameters"],
        num_non_embedding_parameters=results["num_non_embedding_parameters"],
        steps=results["steps"],
        batch_size=options["batch_size"] * options["gradient_accumulation_steps"] * results["num_processes"],
        block_size=options["block_size"],
        train_tokens=results["train_tokens"],
        wall_time_s=sweep["wall_time_s"],
        train_seconds=results.get("train_seconds", math.nan),
        tokens_per_second=results["tokens_per_second"] or math.nan,
        tokens_per_wall_second=results["train_tokens"] / sweep["wall_time_s"],
        best_step=results["best_step"],
        best_val_loss=results["best_val_loss"],
        val_perplexity=results["val_perplexity"],
        val_bits_per_token=results["val_bits_per_token"],
        val_bits_per_char=results["val_bits_per_char"],
        final_val_loss=final_val,
        final_train_loss=final_train,
        train_val_gap=final_val - final_train,
        stopped_reason=results["stopped_reason"],
        num_threads=results.get("num_threads", sweep["hardware"]["torch_threads"]),
        same_recipe=sweep["same_recipe"],
        overrides=", ".join(f"{key}={value}" for key, value in sweep["overrides"].items()),
        test_loss=(results.get("test") or {}).get("loss", math.nan),
        test_perplexity=(results.get("test") or {}).get("perplexity", math.nan),
        test_oov_rate=(results.get("test") or {}).get("oov_rate"),
        validation_oov_rate=results.get("validation_oov_rate"),
        full_val_loss=(results.get("full_validation") or {}).get("loss", math.nan),
        stream_val_loss=_every_token_loss(results.get("full_validation") or {}),
    )


def configuration_id(options: dict) -> str:
    """A short hash of a run's training options without its seed and folder: repeats share it."""
    ignored = {"seed", "output_dir", "overwrite_output_dir", "resume_from_checkpoint"}
    kept = {key: value for key, value in options.items() if key not in ignored}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


def validation_curve(folder: Path, x: str = "tokens_seen") -> tuple[list[float], list[float]]:
    """(x, validation loss) at every evaluation of a run; x is tokens_seen or train_seconds (then in minutes)."""
    rows = [row for row in read_metrics(folder / "metrics.jsonl") if "val_loss" in row and x in row]
    scale = 1 / 60 if x == "train_seconds" else 1
    return [row[x] * scale for row in rows], [row["val_loss"] for row in rows]


def has_training_time(folder: Path) -> bool:
    return any("train_seconds" in row for row in read_metrics(folder / "metrics.jsonl"))


# ------------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------------


def fit_power_law(parameters: list[float], losses: list[float]) -> tuple[float, float]:
    """(a, b) of L = a * N^b: a straight line through (log N, log L)."""
    slope, intercept = np.polyfit(
        np.log(np.asarray(parameters, dtype=float)), np.log(np.asarray(losses, dtype=float)), 1
    )
    return float(math.exp(intercept)), float(slope)


def scaling_fits(records: list[RunRecord]) -> list[PowerLawFit]:
    """One fit per architecture with at least two distinct sizes. Every run trained with the base's recipe is a
    point (seeds included); a run that changes training options (e.g. the learning rate) is left out."""
    fits = []
    for architecture in sorted({record.architecture for record in records}):
        points = [
            r for r in records if r.architecture == architecture and r.same_recipe and math.isfinite(r.best_val_loss)
        ]
        sizes = [r.num_non_embedding_parameters for r in points]
        if len(set(sizes)) < 2:
            continue
        a, b = fit_power_law(sizes, [r.best_val_loss for r in points])
        fits.append(PowerLawFit(architecture, a, b, len(points), min(sizes), max(sizes)))
    return fits


@dataclass
class Noise:
    """Spread of the best validation loss over repeated seeds of one configuration."""

    variation: str  # the variation name(s) of the repeats
    seeds: list[int]
    mean: float
    std: float  # sample standard deviation (n - 1)
    spread: float  # max - min


def by_configuration(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by configuration (seeds pooled), in the order of `records`."""
    groups = defaultdict(list)
    for record in records:
        groups[record.config_id].append(record)
    return dict(groups)


def _label(runs: list[RunRecord]) -> str:
    return "/".join(dict.fromkeys(run.variation for run in runs))


def seed_noise(records: list[RunRecord]) -> list[Noise]:
    noise = []
    for runs in by_configuration(records).values():
        if len(runs) < 2:
            continue
        losses = [run.best_val_loss for run in runs]
        noise.append(
            Noise(
                _label(runs),
                [run.seed for run in runs],
                statistics.fmean(losses),
                statistics.stdev(losses),
                max(losses) - min(losses),
            )
        )
    return noise


def variation_summary(records: list[RunRecord]) -> list[dict]:
    """Per configuration (seeds pooled): mean and std of the best validation loss, throughput, parameters."""
    summary = []
    for runs in by_configuration(records).values():
        losses = [run.best_val_loss for run in runs]
        summary.append(
            {
                "variation": _label(runs),
                "groups": list(dict.fromkeys(group for run in runs for group in run.groups.split(";"))),
                "architecture": runs[0].architecture,
                "num_parameters": runs[0].num_parameters,
                "num_non_embedding_parameters": runs[0].num_non_embedding_parameters,
                "runs": len(runs),
                "mean_loss": statistics.fmean(losses),
                "std_loss": statistics.stdev(losses) if len(losses) > 1 else None,
                "tokens_per_second": statistics.fmean(run.tokens_per_second for run in runs),
                "gap": statistics.fmean(run.train_val_gap for run in runs),
            }
        )
    return summary


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------


def write_csv(records: list[RunRecord], path: Path) -> None:
    """One row per run; floats written in full (repr) so the file reproduces the runs' numbers exactly."""
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=[f.name for f in fields(RunRecord)])
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in asdict(record).items()})


def plot_curves(
    folders: dict[str, Path], records: list[RunRecord], group: str, path: Path, x: str = "tokens_seen"
) -> None:
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_INCHES, dpi=DPI)
    for record in records:
        positions, losses = validation_curve(folders[record.run], x)
        axes.plot(positions, losses, marker="o", markersize=2, linewidth=1.2, label=record.run)
    axes.set_xlabel("training tokens seen" if x == "tokens_seen" else "training time (minutes, evaluations excluded)")
    axes.set_ylabel("validation loss (nats per token)")
    axes.set_title(f"validation loss, group {group}")
    _zoom_to_late_curves(axes, folders, records)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    _save(figure, path)


def _zoom_to_late_curves(axes, folders: dict[str, Path], records: list[RunRecord]) -> None:
    """The first evaluations (loss ~ ln V) would flatten the part where the runs differ."""
    late = []
    for record in records:
        losses = validation_curve(folders[record.run])[1]
        late += losses[len(losses) // 4 :]
    if late:
        low, high = min(late), max(late)
        margin = 0.1 * (high - low) or 0.05
        axes.set_ylim(low - margin, high + 3 * margin)


def plot_scaling(records: list[RunRecord], fits: list[PowerLawFit], path: Path) -> None:
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_INCHES, dpi=DPI)
    for architecture in sorted({record.architecture for record in records}):
        color = ARCHITECTURE_COLORS.get(architecture)
        for same_recipe, marker, label in ((True, "o", "runs"), (False, "x", "other training options, not fitted")):
            points = [r for r in records if r.architecture == architecture and r.same_recipe == same_recipe]
            if points:
                x = [r.num_non_embedding_parameters for r in points]
                y = [r.best_val_loss for r in points]
                axes.scatter(x, y, color=color, marker=marker, zorder=3, label=f"{architecture} {label}")
        fit = next((fit for fit in fits if fit.architecture == architecture), None)
        if fit is not None:
            line = np.geomspace(fit.min_parameters, fit.max_parameters, 50)
            axes.plot(
                line,
                fit.a * line**fit.b,
                color=color,
                linestyle="--",
                label=f"{architecture}: L = {fit.a:.3g} N^{fit.b:.4f}",
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("non-embedding parameters N")
    axes.set_ylabel("best validation loss L (nats per token)")
    axes.set_title("scaling: best validation loss vs parameters (power-law fit per architecture)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    _save(figure, path)


def plot_ablation(summary: list[dict], path: Path) -> None:
    """Mean best validation loss per configuration in study order (error bar: std over seeds), coloured by group."""
    ordered = summary
    groups = list(dict.fromkeys(item["groups"][0] for item in ordered))
    colors = {group: plt.cm.tab10(index % 10) for index, group in enumerate(groups)}
    figure, axes = plt.subplots(figsize=(max(8, 0.6 * len(ordered) + 2), 6), dpi=DPI)
    positions = range(len(ordered))
    means = [item["mean_loss"] for item in ordered]
    errors = [item["std_loss"] or 0.0 for item in ordered]
    bars = axes.bar(positions, means, color=[colors[item["groups"][0]] for item in ordered])
    repeated = [(p, m, item["std_loss"]) for p, m, item in zip(positions, means, ordered) if item["std_loss"]]
    if repeated:
        axes.errorbar(*zip(*repeated), fmt="none", ecolor="black", capsize=3)
    axes.bar_label(bars, [f"{mean:.3f}" for mean in means], fontsize=7, padding=2)
    axes.set_xticks(list(positions), [item["variation"] for item in ordered], rotation=45, ha="right", fontsize=8)
    low, high = min(m - e for m, e in zip(means, errors)), max(m + e for m, e in zip(means, errors))
    margin = 0.15 * (high - low) or 0.05
    axes.set_ylim(low - margin, high + margin)  # not from zero: the differences are a few percent
    axes.set_ylabel("best validation loss (nats/token)")
    axes.set_title("best validation loss per configuration (axis not from 0; error bar: std over seeds)", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[group]) for group in groups]
    axes.legend(handles, groups, fontsize=8, title="group")
    axes.grid(alpha=0.3, axis="y")
    _save(figure, path)


def plot_gap(records: list[RunRecord], path: Path) -> None:
    ordered = sorted(records, key=lambda record: record.train_val_gap)
    figure, axes = plt.subplots(figsize=(max(8, 0.5 * len(ordered) + 2), 5), dpi=DPI)
    colors = [ARCHITECTURE_COLORS.get(record.architecture, "tab:gray") for record in ordered]
    axes.bar(range(len(ordered)), [record.train_val_gap for record in ordered], color=colors)
    axes.set_xticks(range(len(ordered)), [record.run for record in ordered], rotation=45, ha="right", fontsize=8)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_ylabel("final validation loss - final train loss (nats)")
    axes.set_title("train/validation gap at the end of training (higher = more overfitting)")
    axes.grid(alpha=0.3, axis="y")
    _save(figure, path)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------------
# REPORT.md
# ------------------------------------------------------------------------------------------------------------


def report_files(output_dir: Path) -> list[Path]:
    """The files of `output_dir` that have the names a report writes: REPORT.md, results.csv and its plots."""
    names = {REPORT_FILE, CSV_FILE, SCALING_PLOT, ABLATION_PLOT, GAP_PLOT}
    if not output_dir.is_dir():
        return []
    return sorted(
        path
        for path in output_dir.iterdir()
        if path.is_file() and (path.name in names or (path.name.startswith("curves-") and path.suffix == ".png"))
    )


def _is_report_folder(output_dir: Path) -> bool:
    """Whether the report files there are an earlier report's: its REPORT.md says so, or (a report stopped before
    its REPORT.md) its results.csv has the report's header."""
    report, table = output_dir / REPORT_FILE, output_dir / CSV_FILE
    header = ",".join(f.name for f in fields(RunRecord))
    try:
        if report.is_file():
            return REPORT_MARKER in report.read_text(encoding="utf-8")
        if table.is_file():
            with table.open(encoding="utf-8") as stream:
                return stream.readline().strip() == header
    except (OSError, UnicodeDecodeError):
        return False
    return False  # plots of a report's names, and no report


def check_report_folder(output_dir: Path) -> None:
    """Before any training: the report will replace its files in `output_dir` (and remove plots of groups that are
    gone), so a folder whose files of those names no report wrote is refused, with nothing touched."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; pass a folder for the study's report and runs")
    ours = report_files(output_dir)
    if ours and not _is_report_folder(output_dir):
        names = ", ".join(path.name for path in ours)
        raise UserError(
            f"--output-dir {output_dir} holds {names}, which no study report wrote and the report would replace; "
            "move them elsewhere or choose another --output-dir"
        )


def write_report(study, planned: list, output_dir: Path, quick: bool = False) -> Path:
    """results.csv, the plots and REPORT.md for the finished runs of `planned` (sweep.PlannedRun list)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    folders = {run.name: Path(run.options["output_dir"]) for run in planned}
    # Study order: groups, bars and seed lists follow the study file; the tables sort by loss themselves.
    records = [read_run(folder) for folder in folders.values() if (folder / "results.json").is_file()]
    if not records:
        raise ValueError(f"no finished run in {output_dir}: nothing to report")
    for stale in report_files(output_dir):  # plots of groups that no longer exist; the rest is rewritten below
        if stale.suffix == ".png":
            stale.unlink()
    write_csv(sorted(records, key=lambda record: record.best_val_loss), output_dir / CSV_FILE)

    summary = variation_summary(records)
    plots = {}
    for group in dict.fromkeys(g for record in records for g in record.groups.split(";")):
        members = [record for record in records if group in record.groups.split(";")]
        plots[f"curves-{_file_slug(group)}.png"] = f"validation loss against training tokens, group `{group}`"
        plot_curves(folders, members, group, output_dir / f"curves-{_file_slug(group)}.png")
        if all(has_training_time(folders[record.run]) for record in members):
            name = f"curves-{_file_slug(group)}-time.png"
            plots[name] = f"validation loss against training time, group `{group}`"
            plot_curves(folders, members, group, output_dir / name, x="train_seconds")
    fits = scaling_fits(records) if study.scaling else []
    if study.scaling:
        plot_scaling(records, fits, output_dir / SCALING_PLOT)
        plots[SCALING_PLOT] = "scaling: best validation loss vs non-embedding parameters"
    plot_ablation(summary, output_dir / ABLATION_PLOT)
    plots[ABLATION_PLOT] = "best validation loss per variation"
    plot_gap(records, output_dir / GAP_PLOT)
    plots[GAP_PLOT] = "train/validation gap per run"

    text = render_report(study, planned, records, summary, fits, plots, quick)
    (output_dir / REPORT_FILE).write_text(text)
    return output_dir / REPORT_FILE


def render_report(study, planned, records, summary, fits, plots, quick) -> str:
    missing = [run.name for run in planned if run.name not in {record.run for record in records}]
    lines = [f"# Study `{study.name}`{' (quick mode)' if quick else ''}", ""]
    if study.description:
        lines += [study.description, ""]
    command = f"hybrid-lm sweep {study.path}{' --quick' if quick else ''}"
    lines += [
        f"Produced by `{command}` from the study file quoted at the end; every number below is read from "
        "the runs' own metrics.jsonl / results.json.",
        "",
    ]
    if missing:
        lines += [f"**Unfinished runs (not in the tables):** {', '.join(missing)}", ""]
    lines += _setup_section(planned, records)
    lines += _results_table(records)
    lines += _noise_section(seed_noise(records))
    lines += _groups_section(summary)
    if study.scaling:
        lines += _scaling_section(fits)
    lines += ["## Plots", ""]
    lines += [f"![{title}]({name})" + "  " for name, title in plots.items()]
    lines += ["", "## Study file", "", f"`{study.path}`:", "", "```yaml", study.text.rstrip(), "```", ""]
    return "\n".join(lines)


def _setup_section(planned, records) -> list[str]:
    options = planned[0].options
    if options.get("max_train_minutes") is not None:
        budget_text = (
            f"{options['max_train_minutes']:g} minutes of training steps (evaluations not counted), batches of "
            f"{records[0].batch_size} x {records[0].block_size} tokens; the steps reached differ per run (table)"
        )
    else:
        budgets = sorted({(r.steps, r.batch_size, r.block_size, r.train_tokens) for r in records})
        budget_text = "; ".join(
            f"{steps:,} steps x {batch} sequences x {block} tokens = {tokens:,} training tokens"
            for steps, batch, block, tokens in budgets
        )
    evaluation = (
        f"the first {options['eval_batches'] * options['batch_size']} validation blocks "
        f"({options['eval_batches'] * options['batch_size'] * options['block_size']:,} tokens)"
        if options["eval_batches"]
        else "the whole validation split"
    )
    machines = []
    for record in records:
        machine = _sweep_record(planned, record.run)["hardware"]
        text = (
            f"{machine['cpu']}, {machine['cpu_cores']} cores, torch {machine['torch_version']} with "
            f"{record.num_threads} thread{'s' if record.num_threads != 1 else ''}"
            + (f", GPU {machine['cuda']}" if machine.get("cuda") else "")
        )
        if text not in machines:
            machines.append(text)
    total = sum(record.wall_time_s for record in records)
    loads = [load for r in records for load in _sweep_record(planned, r.run).get("load_average_1min", []) if load]
    load_text = (
        f" CPU load average (1 min) at the start/end of the runs: {min(loads):.1f} to {max(loads):.1f} on "
        f"{machine['cpu_cores']} cores; tokens/s compare fairly only between runs at similar load."
        if loads
        else ""
    )
    return [
        "## Setup",
        "",
        f"- Data: `{display_path(options['dataset'])}`, tokenizer `{options['tokenizer']}`, validation = the last "
        f"{options['validation_fraction']:.0%} of the text.",
        f"- Budget per run: {budget_text}.",
        f"- Optimizer: AdamW, peak learning rate {options['learning_rate']}, {options['lr_scheduler']} schedule, "
        f"{options['warmup_steps']} warmup steps, weight decay {options['weight_decay']}; the same for every run.",
        f"- Evaluation: every {options['eval_steps']} steps on {evaluation}; the best evaluation is reported.",
        f"- Hardware: {'; '.join(machines)}.{load_text}",
        f"- Wall time of the study: {total / 60:.1f} min over {len(records)} runs (sum of the runs' wall-clock "
        "times, each measured around the whole run: data, model, training, evaluations, sample and card).",
        "",
    ]


def display_path(dataset: str) -> str:
    """A local corpus relative to the folder the study ran from (runs store it absolute), never a machine's path."""
    path = Path(dataset)
    if not path.is_absolute():
        return dataset
    try:
        return os.path.relpath(path, Path.cwd())
    except ValueError:  # another drive
        return path.name


def _sweep_record(planned, run_name: str) -> dict:
    folder = next(Path(run.options["output_dir"]) for run in planned if run.name == run_name)
    return json.loads((folder / "sweep_run.json").read_text())


def _every_token_loss(full: dict) -> float:
    """The best model's loss with every validation token scored: read as streams with the recurrent state carried
    (hybrid runs), or in sliding windows half a block apart (models without a state: GPT-2)."""
    reading = full.get("stream") or full.get("sliding") or {}
    return reading.get("loss", math.nan)


def _results_table(records: list[RunRecord]) -> list[str]:
    header = (
        "| # | run | arch | cell | width x depth | params | non-emb params | tokens/s | steps | wall min | best step | "
        "best val loss | ppl | bits/char | final train loss | gap | changes |"
    )
    tested = any(math.isfinite(r.test_loss) for r in records)
    streamed = any(math.isfinite(r.stream_val_loss) for r in records)
    columns = 17 + (2 if tested else 0) + (2 if streamed else 0)
    if tested:
        header = header.replace("| bits/char |", "| bits/char | test loss | test ppl |")
    if streamed:
        header = header.replace(
            "| best val loss |", "| best val loss | full split, blocks | full split, every token |"
        )
    lines = ["## Results (sorted by best validation loss)", "", header, "|" + "---|" * columns]
    for rank, r in enumerate(sorted(records, key=lambda record: record.best_val_loss), start=1):
        bits = "" if r.val_bits_per_char is None else f"{r.val_bits_per_char:.4f}"
        test = f" {r.test_loss:.4f} | {r.test_perplexity:.2f} |" if tested else ""
        full = f" {r.full_val_loss:.4f} | {_number(r.stream_val_loss)} |" if streamed else ""
        stopped = "" if r.stopped_reason == "max_steps" else f" (stopped: {r.stopped_reason})"
        lines.append(
            f"| {rank} | {r.run}{stopped} | {r.architecture} | {r.rnn_type or '-'} | "
            f"{r.hidden_size} x {r.num_hidden_layers} | {r.num_parameters:,} | "
            f"{r.num_non_embedding_parameters:,} | {r.tokens_per_second:,.0f} | {r.steps:,} | {r.wall_time_s / 60:.2f} | "
            f"{r.best_step} | "
            f"{r.best_val_loss:.4f} |{full} {r.val_perplexity:.3f} | {bits} |{test} {r.final_train_loss:.4f} | "
            f"{r.train_val_gap:+.4f} | {r.overrides or '(base config)'} |"
        )
    lines += [
        "",
        "tokens/s: training throughput measured by the training loop (evaluations excluded); wall min: the whole "
        "run. changes: the run's options in the study file (on top of the base config). "
        "params: all parameters (tied embeddings counted once); non-emb: without token/position embeddings "
        "(GPT-2's position table is an embedding). gap: last validation loss minus the last logged train loss "
        "(mean over the last logging window, dropout on); positive means the model fits the training text better "
        "than unseen text. Before the end of the first pass over the training split the training batches are unseen "
        "text too, so there the gap measures how the validation text differs from the training text; growth of the "
        "gap from pass to pass is what shows overfitting.",
        "",
    ]
    if streamed:
        lines += [
            "full split, blocks / every token: the best model on the whole validation split, cut into independent "
            "blocks of the training block size (each block starts from a zero state; its first token is not scored), "
            "and with every token scored: a hybrid reads it as contiguous streams with the recurrent state carried "
            "from block to block (attention sees the current block); GPT-2, which has no state, reads it in sliding "
            "windows of a block, half a block apart (each token with at least half a block of context; `hybrid-lm "
            "eval --stride`). '-' where a run has neither (a --streaming corpus, or a GPT-2 run made before it got "
            "this reading). best val loss is what chose the best step: the streamed loss for --carry-state runs, the "
            "block-wise one otherwise.",
            "",
        ]
    if tested:
        oov = sorted({f"{100 * r.test_oov_rate:.2f}%" for r in records if r.test_oov_rate is not None})
        lines += [
            "test loss / test ppl: the best model (chosen on the validation split) on the whole --test-dataset text, "
            "block by block as the validation split is scored (each block's first token is not scored)"
            + (
                f"; out-of-vocabulary share of the test tokens: {', '.join(oov)} (each scored as the unknown token)"
                if oov
                else ""
            )
            + ".",
            "",
        ]
    return lines


def _number(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "-"


def _noise_section(noise: list[Noise]) -> list[str]:
    lines = ["## Run-to-run noise", ""]
    if not noise:
        return lines + [
            "No configuration of this study was repeated with other seeds, so its noise is not measured here.",
            "",
        ]
    lines += ["| variation | seeds | mean best val loss | std (n-1) | max - min |", "|---|---|---|---|---|"]
    for item in noise:
        lines.append(
            f"| {item.variation} | {', '.join(map(str, item.seeds))} | {item.mean:.4f} | {item.std:.4f} | "
            f"{item.spread:.4f} |"
        )
    largest = max(item.std for item in noise)
    lines += [
        "",
        f"Seeds change the initial weights and the order of the training batches. Differences in best "
        f"validation loss below about 2 x {largest:.4f} = {2 * largest:.4f} nats are within run-to-run noise.",
        "",
    ]
    return lines


def _groups_section(summary: list[dict]) -> list[str]:
    groups = list(dict.fromkeys(group for item in summary for group in item["groups"]))
    lines = ["## By group", "", "Seeds pooled: mean (and std when repeated) of the best validation loss.", ""]
    for group in groups:
        members = sorted((item for item in summary if group in item["groups"]), key=lambda item: item["mean_loss"])
        lines += [
            f"**{group}**",
            "",
            "| variation | arch | params | non-emb params | runs | best val loss | tokens/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for item in members:
            loss = f"{item['mean_loss']:.4f}" + (f" ± {item['std_loss']:.4f}" if item["std_loss"] is not None else "")
            lines.append(
                f"| {item['variation']} | {item['architecture']} | {item['num_parameters']:,} | "
                f"{item['num_non_embedding_parameters']:,} | {item['runs']} | {loss} | "
                f"{item['tokens_per_second']:,.0f} |"
            )
        lines.append("")
    return lines


def _scaling_section(fits: list[PowerLawFit]) -> list[str]:
    lines = ["## Scaling", ""]
    if not fits:
        return lines + ["No architecture has two or more sizes: no power law fitted.", ""]
    lines += [
        "Least-squares line through (ln N, ln L) of the architecture's runs that keep the base training options "
        "(CSV column same_recipe; seeds included): L = a * N^b, N = non-embedding parameters, L = best validation "
        "loss.",
        "",
        "| architecture | runs | N range | a | exponent b |",
        "|---|---|---|---|---|",
    ]
    for fit in fits:
        lines.append(
            f"| {fit.architecture} | {fit.points} | {fit.min_parameters:,} - {fit.max_parameters:,} | "
            f"{fit.a:.4f} | {fit.b:.5f} |"
        )
    return lines + [""]


def _file_slug(text: str) -> str:
    return "".join(character if character.isalnum() or character in "-_." else "-" for character in text)
