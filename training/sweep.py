"""`hybrid-lm sweep STUDY.yaml`: run a study (a grid of training runs) one run after another, then report.

A study file names a base training config and the runs to derive from it:

    name: rnn-cell                  # optional; default: the file name
    description: one paragraph that heads the report
    base:                           # options of `hybrid-lm train` (or the path of such a YAML, relative to this file)
      dataset: ../shared/data/tinyshakespeare/input.txt
      max_steps: 400
    grid:                           # optional: the cartesian product of these option lists, one run each
      rnn_type: [rnn, gru, lstm]
    group_by: rnn_type              # optional: grid runs are grouped by this option (default: one group "grid")
    variations:                     # optional: named runs, each a dict of overrides with a group for plotting
      - {name: no-residual, group: residual, use_residual: false}
      - {name: base, group: [heads, window], seeds: [1337, 1, 2]}   # several groups; repeated seeds
    seeds: [1337]                   # optional: every run is repeated with each seed (a variation may set its own)
    quick: {max_steps: 40, eval_steps: 20}   # overrides applied to every run by --quick
    scaling: true                   # optional: fit and plot best validation loss vs parameters (size studies)
    keep_weights: true              # optional: keep each run's best model (checkpoints are always deleted)

Every run goes through `training.train.run_training`, the code behind `hybrid-lm train`, into
`<output-dir>/runs/<run>/`; model weights and checkpoints are deleted once its results are written, so the study
folder stays small. A run whose results.json exists is skipped, so an interrupted study continues where it
stopped when the same command is run again. The report (REPORT.md, results.csv, PNG plots) is written by
`training.report` at the end.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from training.arguments import ARGUMENT_CLASSES, ModelArguments, arguments_from_dict, arguments_to_dict
from training.errors import UserError

STUDY_KEYS = {
    "name",
    "description",
    "base",
    "grid",
    "group_by",
    "variations",
    "seeds",
    "quick",
    "scaling",
    "keep_weights",
}
VARIATION_KEYS = {"name", "group", "seeds"}  # every other key of a variation is a training option
# The sweep decides where each run goes and that an unfinished run is redone: a study cannot set these.
SWEEP_OWNED_OPTIONS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint")
MODEL_OPTIONS = {f.name for f in dataclasses.fields(ModelArguments)}
RUNS_FOLDER = "runs"
RUN_RECORD = "sweep_run.json"  # what the sweep knows about a run (variation, groups, wall time, hardware)
ATTEMPTS_RECORD = "sweep_interrupted.json"  # wall time of interrupted attempts, added once the run finishes
# What a finished run keeps: metrics, results, arguments, plots, tokenizer and card. Weights are deleted.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


@dataclass
class Variation:
    """A named set of overrides of the base config."""

    name: str
    groups: list[str]
    overrides: dict
    seeds: list[int] | None = None


@dataclass
class Study:
    """A parsed study file."""

    name: str
    path: Path
    text: str  # the file as written, quoted verbatim in the report
    description: str
    base: dict
    variations: list[Variation]
    seeds: list[int] | None
    quick: dict
    scaling: bool
    keep_weights: bool = False  # keep each run's best model (e.g. for an analysis after the study); never checkpoints


@dataclass
class PlannedRun:
    """One training run of a study: its name, plotting groups and complete flat training options."""

    name: str
    variation: str
    groups: list[str]
    seed: int
    options: dict  # every option of `hybrid-lm train`, output_dir included
    overrides: dict = field(default_factory=dict)  # the variation's options, as the study file writes them
    same_recipe: bool = True  # trained like the base: only model options (size, cell, ...) differ


# ------------------------------------------------------------------------------------------------------------
# Study files
# ------------------------------------------------------------------------------------------------------------


def load_study(path: str | os.PathLike) -> Study:
    """Reads and checks a study file; every problem is a UserError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file {path} does not exist; pass the path of a study YAML (see training/studies/)")
    text = path.read_text()
    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UserError(f"study file {path} is not valid YAML ({_first_line(error)}); fix the file") from None
    if not isinstance(content, dict):
        raise UserError(f"study file {path} must hold a mapping (base, grid, variations, ...), not a list or a value")
    unknown = sorted(str(key) for key in content if key not in STUDY_KEYS)
    if unknown:
        raise UserError(
            f"study file {path} has unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(STUDY_KEYS))}"
        )
    where = f"study file {path}"
    base = _read_base(content.get("base", {}), path)
    variations = _grid_variations(content.get("grid"), content.get("group_by"), where)
    variations += [_parse_variation(item, index, where) for index, item in enumerate(content.get("variations") or [])]
    if not variations:
        variations = [Variation(name="base", groups=["base"], overrides={})]
    names = [variation.name for variation in variations]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(
            f"{where}: run name(s) {', '.join(duplicates)} appear twice; give every variation its own name"
        )
    quick = content.get("quick") or {}
    _check_options(quick, f"{where}, quick")
    return Study(
        name=path.stem if content.get("name") is None else _folder_name(content["name"], "name", where),
        path=path,
        text=text,
        description=str(content.get("description") or "").strip(),
        base=base,
        variations=variations,
        seeds=_parse_seeds(content.get("seeds"), where),
        quick=quick,
        scaling=_parse_bool(content.get("scaling", False), f"{where}, scaling"),
        keep_weights=_parse_bool(content.get("keep_weights", False), f"{where}, keep_weights"),
    )


def _read_base(base, study_path: Path) -> dict:
    where = f"study file {study_path}, base"
    if isinstance(base, str):  # a training YAML, relative to the study file
        base_path = (study_path.parent / base).resolve()
        if not base_path.is_file():
            raise UserError(f"{where}: {base_path} does not exist; give a training YAML path relative to the study")
        try:
            base = yaml.safe_load(base_path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"{where}: {base_path} is not valid YAML ({_first_line(error)}); fix the file") from None
        where = f"{where} ({base_path})"
    _check_options(base, where)
    return dict(base)


def _grid_variations(grid, group_by, where: str) -> list[Variation]:
    if grid is None:
        return []
    if not isinstance(grid, dict) or not grid:
        raise UserError(
            f"{where}: grid must map option names to lists of values, e.g. grid: {{rnn_type: [gru, lstm]}}"
        )
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: grid option {name} must be a non-empty list of values, e.g. {name}: [a, b]")
    _check_options({name: values[0] for name, values in grid.items()}, f"{where}, grid")
    if group_by is not None and group_by not in grid:
        raise UserError(f"{where}: group_by {group_by!r} is not a grid option; use one of {', '.join(grid)}")
    variations = []
    for combination in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combination))
        name = "_".join(f"{key}-{_slug(value)}" for key, value in overrides.items())
        group = f"{group_by}={overrides[group_by]}" if group_by is not None else "grid"
        variations.append(Variation(name=name, groups=[group], overrides=overrides))
    return variations


def _parse_variation(item, index: int, where: str) -> Variation:
    if not isinstance(item, dict) or "name" not in item:
        raise UserError(
            f"{where}: variation #{index + 1} must be a mapping with a name, e.g. {{name: big, hidden_size: 256}}"
        )
    name = _folder_name(item["name"], "variation name", where)
    groups = item.get("group", "default")
    groups = [str(group) for group in groups] if isinstance(groups, list) else [str(groups)]
    overrides = {key: value for key, value in item.items() if key not in VARIATION_KEYS}
    _check_options(overrides, f"{where}, variation {name}")
    seeds = _parse_seeds(item.get("seeds"), f"{where}, variation {name}")
    return Variation(name=name, groups=groups, overrides=overrides, seeds=seeds)


def _parse_seeds(seeds, where: str) -> list[int] | None:
    if seeds is None:
        return None
    if not isinstance(seeds, list) or not seeds or not all(_is_int(seed) for seed in seeds):
        raise UserError(f"{where}: seeds must be a non-empty list of integers, e.g. seeds: [1337, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds {seeds} repeat a value; list each seed once")
    return list(seeds)


def _parse_bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where} must be true or false, got {value!r}")
    return value


def _check_options(options, where: str) -> None:
    if not isinstance(options, dict):
        raise UserError(f"{where} must be a mapping of training options (names of `hybrid-lm train --help`)")
    owned = sorted(set(options) & set(SWEEP_OWNED_OPTIONS))
    if owned:
        raise UserError(
            f"{where} sets {', '.join(owned)}, which the sweep decides (each run goes to <output-dir>/runs/<name>); "
            "remove it and pass --output-dir to `hybrid-lm sweep` instead"
        )
    # Names only: values are checked on each run's complete options, where sizes and heads are known together.
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in options if key not in known)
    if unknown:
        raise UserError(
            f"{where} has unknown option(s) {', '.join(unknown)}; valid names are those of `hybrid-lm train --help` "
            "with underscores"
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _folder_name(value, what: str, where: str) -> str:
    """A name the sweep makes a folder of (the study's under results/, each run's under runs/): one plain path
    component, so that no name reaches outside the folder it belongs in."""
    name = str(value)
    if not name or _slug(name) != name or name in {".", ".."}:
        raise UserError(f"{where}: {what} {name!r} must be a plain folder name (letters, digits, - _ .; not . or ..)")
    return name


def _slug(value) -> str:
    text = str(value).strip()
    return "".join(character if character.isalnum() or character in "-_." else "-" for character in text)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------------------


def plan_runs(study: Study, runs_dir: Path, quick: bool = False, dataset: str | None = None) -> list[PlannedRun]:
    """Expands the study into runs, each with its complete, validated training options."""
    default_seed = arguments_to_dict(*arguments_from_dict({}))["seed"]
    planned = []
    for variation in study.variations:
        seeds = variation.seeds or study.seeds or [study.base.get("seed", default_seed)]
        for seed in seeds:
            name = variation.name if len(seeds) == 1 else f"{variation.name}-seed{seed}"
            try:
                options = _complete_options(study, variation.overrides, seed, quick, dataset)
            except UserError as error:
                raise UserError(f"study {study.path}, run {name}: {error}") from None
            # The same run with only its model options applied: equal options mean the base's training recipe.
            model_only = {key: value for key, value in variation.overrides.items() if key in MODEL_OPTIONS}
            same_recipe = options == _complete_options(study, model_only, seed, quick, dataset)
            options["output_dir"] = str(runs_dir / name)
            planned.append(
                PlannedRun(name, variation.name, variation.groups, seed, options, variation.overrides, same_recipe)
            )
    return planned


def _complete_options(study: Study, overrides: dict, seed: int, quick: bool, dataset: str | None) -> dict:
    """Base, then the variation, then the seed, --quick's overrides and --dataset: every option of a run."""
    options = {**study.base, **overrides, "seed": seed, **(study.quick if quick else {})}
    if dataset is not None:
        options["dataset"] = dataset
    complete = arguments_to_dict(*arguments_from_dict(options))
    complete["dataset"] = _absolute_if_local(complete["dataset"])
    return complete


def _absolute_if_local(dataset: str) -> str:
    """A local corpus path is stored absolute, so that a re-run from another folder finds the same runs."""
    path = Path(dataset).expanduser()
    return str(path.resolve()) if path.exists() else dataset


def check_dataset(planned: list[PlannedRun]) -> None:
    """Fails before any training when a corpus that looks like a path is missing."""
    for dataset in sorted({run.options["dataset"] for run in planned}):
        looks_like_path = dataset.startswith(("/", ".", "~")) or Path(dataset).suffix in (".txt", ".jsonl", ".parquet")
        if looks_like_path and not Path(dataset).expanduser().exists():
            raise UserError(
                f"dataset {dataset} does not exist (paths are relative to the folder you run from); "
                "pass the corpus with --dataset PATH, e.g. --dataset ../shared/data/tinyshakespeare/input.txt"
            )


# ------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------


RUN_ARGUMENTS_IGNORED = set(SWEEP_OWNED_OPTIONS)  # differ between a planned run and its training_args.yaml


def run_status(run: PlannedRun) -> str:
    """finished / resumable (a checkpoint exists) / new; a finished run made with other options is an error."""
    folder = Path(run.options["output_dir"])
    arguments_file = folder / "training_args.yaml"
    if arguments_file.is_file():
        used = yaml.safe_load(arguments_file.read_text()) or {}
        # An option missing from the file did not exist when the run was made: it cannot have been changed.
        changed = sorted(
            key
            for key, value in run.options.items()
            if key not in RUN_ARGUMENTS_IGNORED and key in used and used[key] != value
        )
        if changed and (folder / "results.json").is_file():
            details = ", ".join(f"{key} {used.get(key)!r} -> {run.options[key]!r}" for key in changed[:4])
            raise UserError(
                f"run {run.name} in {folder} was trained with other options ({details}); the study file or flags "
                "changed since: delete that folder to redo the run, or pass another --output-dir"
            )
        if changed:
            return "new"  # an unfinished run of an older study: started again from scratch
    if (folder / "results.json").is_file():
        return "finished"
    if any((folder / "checkpoints").glob("checkpoint-*/model.safetensors")):
        return "resumable"
    return "new"


def hardware() -> dict:
    """What the timings were measured on."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),  # the process default; results.json has the run's own count
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def train_one(run: PlannedRun, status: str) -> dict:
    """Trains one run through the same code as `hybrid-lm train` and returns its results.json content."""
    from training.train import run_training

    options = dict(run.options)
    if status == "resumable":
        options["resume_from_checkpoint"] = "latest"
    else:
        options["overwrite_output_dir"] = True  # a folder without results.json is an unfinished earlier attempt
    return run_training(*arguments_from_dict(options))


def remove_weights(folder: Path, keep_model: bool = False) -> None:
    """Weights and checkpoints are large and not part of a study's results (`keep_model`: the best model stays)."""
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    for pattern in () if keep_model else WEIGHT_PATTERNS:
        for file in folder.glob(pattern):
            file.unlink()


def run_study(planned: list[PlannedRun], runs_dir: Path, log=print, keep_weights: bool = False) -> dict:
    """Runs every planned run that is not finished yet, one after another; returns counts for the summary line."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Run folders hold per-run logs only; the study's committed results are the report files beside them.
    (runs_dir / ".gitignore").write_text("*\n")
    machine = hardware()
    counts = {"trained": 0, "skipped": 0}
    for index, run in enumerate(planned, start=1):
        prefix = f"[{index}/{len(planned)}] {run.name}"
        status = run_status(run)
        if status == "finished":
            # Names and groups come from the study file and may have been edited since: refresh them.
            record_path = Path(run.options["output_dir"]) / RUN_RECORD
            _write_json(record_path, {**json.loads(record_path.read_text()), **plan_record(run)})
            log(f"{prefix}: already finished (results.json exists), skipped")
            counts["skipped"] += 1
            continue
        log(
            f"{prefix}: {'resuming from its last checkpoint' if status == 'resumable' else 'training'} "
            f"({_describe(run)})"
        )
        folder = Path(run.options["output_dir"])
        earlier = _earlier_attempts_s(folder) if status == "resumable" else 0.0
        started, load_before = time.perf_counter(), _load_average()
        try:
            results = train_one(run, status)
        except KeyboardInterrupt:  # a checkpoint was saved: the next sweep resumes it, and adds this time
            _write_json(folder / ATTEMPTS_RECORD, {"seconds": earlier + time.perf_counter() - started})
            raise
        elapsed = earlier + time.perf_counter() - started
        (folder / ATTEMPTS_RECORD).unlink(missing_ok=True)
        remove_weights(folder, keep_model=keep_weights)
        measured = {
            "wall_time_s": elapsed,  # every attempt of the run, interrupted ones included
            "hardware": machine,
            # Other processes on the machine slow a run down: its tokens/s is only comparable at similar load.
            "load_average_1min": [load_before, _load_average()],
        }
        _write_json(folder / RUN_RECORD, {**plan_record(run), **measured})
        counts["trained"] += 1
        log(
            f"{prefix}: best validation loss {results['best_val_loss']:.4f} at step {results['best_step']}, "
            f"{results['num_non_embedding_parameters']:,} non-embedding parameters, "
            f"{results.get('tokens_per_second') or 0:,.0f} tokens/s, {elapsed:.0f} s"
            + ("" if results["stopped_reason"] == "max_steps" else f" (stopped: {results['stopped_reason']})")
        )
    return counts


def plan_record(run: PlannedRun) -> dict:
    """What the report needs to know about a run besides its own files."""
    return {
        "name": run.name,
        "variation": run.variation,
        "groups": run.groups,
        "seed": run.seed,
        "overrides": run.overrides,
        "same_recipe": run.same_recipe,
    }


def _earlier_attempts_s(folder: Path) -> float:
    path = folder / ATTEMPTS_RECORD
    return json.loads(path.read_text())["seconds"] if path.is_file() else 0.0


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


SIZE_OPTIONS = ("architecture", "hidden_size", "num_hidden_layers")  # already in the description's first words


def _describe(run: PlannedRun) -> str:
    options = run.options
    size = f"{options['architecture']} {options['hidden_size']}x{options['num_hidden_layers']}"
    changes = ", ".join(f"{key}={value}" for key, value in run.overrides.items() if key not in SIZE_OPTIONS)
    budget = [f"{options['max_steps']} steps"] if options["max_steps"] is not None else []
    if options.get("max_train_minutes") is not None:
        budget.append(f"{options['max_train_minutes']:g} training minutes")
    return f"{size}, seed {run.seed}, {' or '.join(budget) or 'default steps'}" + (f", {changes}" if changes else "")


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see `hybrid-lm sweep --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="hybrid-lm sweep",
        description="Run every training run of a study file one after another, then write REPORT.md, "
        "results.csv and plots. Finished runs are skipped, so re-running continues an interrupted study.",
    )
    parser.add_argument("study", help="study YAML (see training/studies/)")
    parser.add_argument("--quick", action="store_true", help="apply the study's quick: overrides (a short run for CI)")
    parser.add_argument(
        "--output-dir",
        help="folder for the report; runs go to its runs/ subfolder "
        "(default: results/<study>, or runs/sweeps/<study>-quick with --quick)",
    )
    parser.add_argument("--dataset", help="corpus of every run, replacing the study's dataset option")
    parser.add_argument(
        "--runs",
        help="train only these runs (comma-separated names, as in the report), e.g. to share a study between two "
        "processes or machines; the report covers every finished run of the study",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from training.report import check_report_folder, write_report

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    study = load_study(args.study)
    default_dir = Path("runs") / "sweeps" / f"{study.name}-quick" if args.quick else Path("results") / study.name
    output_dir = Path(args.output_dir) if args.output_dir else default_dir
    runs_dir = output_dir / RUNS_FOLDER
    check_report_folder(output_dir)
    planned = plan_runs(study, runs_dir, quick=args.quick, dataset=args.dataset)
    check_dataset(planned)
    for planned_run in planned:  # before any training: an edited study must not silently reuse stale runs
        run_status(planned_run)
    selected = planned
    if args.runs is not None:
        names = [name.strip() for name in args.runs.split(",") if name.strip()]
        if not names:
            raise UserError(
                f"--runs {args.runs!r} names no run; give run names (e.g. --runs "
                f"{planned[0].name}) or leave --runs out to train every run"
            )
        unknown = [name for name in names if name not in {run.name for run in planned}]
        if unknown:
            raise UserError(
                f"--runs: {', '.join(unknown)} not in study {study.name}; its runs are "
                f"{', '.join(run.name for run in planned)}"
            )
        selected = [run for run in planned if run.name in names]
    print(f"study {study.name}: {len(planned)} runs{' (quick)' if args.quick else ''} -> {output_dir}")
    started = time.perf_counter()
    from training.train import TrainingInterrupted

    try:
        with _quiet_libraries():
            counts = run_study(selected, runs_dir, keep_weights=study.keep_weights)
    except TrainingInterrupted as stop:
        print(
            f"{stop}\nthe study stopped; run the same `hybrid-lm sweep` command again to continue it", file=sys.stderr
        )
        return stop.exit_code
    report = write_report(study, planned, output_dir, quick=args.quick)
    print(
        f"study {study.name}: {counts['trained']} trained, {counts['skipped']} skipped in "
        f"{time.perf_counter() - started:.0f} s; report: {report}"
    )
    return 0


@contextlib.contextmanager
def _quiet_libraries():
    """One progress line per run and the training bar: no per-map bars or info logs from the libraries.
    Restored afterwards, for callers that go on in the same process."""
    import datasets
    import transformers

    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    training_logger = logging.getLogger("training")
    level = training_logger.level
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    training_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        transformers.logging.set_verbosity(verbosity)
        training_logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
