"""`hybrid-lm train`: train a hybrid RNN + attention (or GPT-2 baseline) language model with accelerate.

    hybrid-lm train                                   # small model on the built-in python-docs corpus
    hybrid-lm train --dataset input.txt --max-steps 2000 --output-dir runs/shakespeare
    hybrid-lm train runs/shakespeare/training_args.yaml --max-steps 4000 --resume-from-checkpoint latest
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no -m training.train --max-steps 200

The output folder holds the best model and its tokenizer (`from_pretrained`-ready), metrics.jsonl,
results.json, loss_curve.png, training_args.yaml and checkpoints/. `run_training` is the same thing from Python.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    LoggerType,
    ProjectConfiguration,
    set_seed,
)
from torch.utils.data import DataLoader

from training.arguments import (
    DEFAULT_HYBRID_ACTIVATION,
    DEFAULT_MAX_STEPS,
    DataArguments,
    ModelArguments,
    TrainArguments,
    arguments_to_dict,
    parse_arguments,
    parse_attention_layers,
    write_arguments_yaml,
)
from training.checkpoints import (
    check_checkpoint_files,
    checkpoint_step,
    list_checkpoints,
    load_model_weights,
    read_progress,
    remove_checkpoints_after,
    remove_temporary_folders,
    resolve_checkpoint,
    save_checkpoint,
    save_views_apart,
)
from training.errors import UserError
from training.loop import UNBOUNDED_STEPS, LoopParts, TrainingProgress, evaluate_model, train_loop
from training.model_files import LOCAL_CODE_ONLY
from training.plots import plot_loss_curve, read_metrics

logger = logging.getLogger("training.train")


class _TiedWeightsNotice(logging.Filter):
    """accelerate warns at every checkpoint that tied embeddings are stored once: that is what tying means."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "language_modeling"
RUN_FILES = ("metrics.jsonl", "results.json", "training_args.yaml", "loss_curve.png")
# Everything a run (or a sweep around it) writes into its output folder: --overwrite-output-dir removes these, and
# refuses to touch a folder that holds anything else.
RUN_OUTPUTS = (
    *RUN_FILES,
    "checkpoints",
    "logs",
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "configuration_hybrid_rnn_lm.py",
    "modeling_hybrid_rnn_lm.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "sweep_run.json",
    "sweep_interrupted.json",
)
RUN_OUTPUT_PATTERNS = ("model-*-of-*.safetensors", ".tmp-model*")
_TRACKER_CHECKS = {
    "tensorboard": "is_tensorboard_available",
    "wandb": "is_wandb_available",
    "comet_ml": "is_comet_ml_available",
    "aim": "is_aim_available",
    "mlflow": "is_mlflow_available",
    "clearml": "is_clearml_available",
    "dvclive": "is_dvclive_available",
    "swanlab": "is_swanlab_available",
    "trackio": "is_trackio_available",
}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved; the message says how to resume."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code  # 128 + the signal, as a shell reports it: 130 for Ctrl-C, 143 for SIGTERM


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, train_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    try:
        results = run_training(model_args, data_args, train_args)
    except TrainingInterrupted as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    finally:
        PartialState().destroy_process_group()
    if not PartialState().is_main_process:
        return 0
    if results["stopped_reason"].startswith("non_finite"):
        print(f"error: {results['message']}", file=sys.stderr)
        return 1
    full = results.get("full_validation") or {}
    print(
        f"\nvalidation perplexity {full.get('perplexity', results['val_perplexity']):.3f} (loss "
        f"{full.get('loss', results['best_val_loss']):.4f} nats/token on the "
        f"{'full validation split' if full.get('whole_split', True) else 'first --eval-batches validation batches'}, "
        "best at step "
        f"{results['best_step']}); model saved to {results['output_dir']}"
    )
    stream = full.get("stream")
    if stream is not None:
        print(f"streamed, state carried: loss {stream['loss']:.4f} nats/token over all {stream['tokens']:,} tokens")
    sliding = full.get("sliding")
    if sliding is not None:
        print(
            f"sliding windows, stride {sliding['stride']}: loss {sliding['loss']:.4f} nats/token over all "
            f"{sliding['tokens']:,} tokens"
        )
    if results.get("sample") is not None:
        print(f"sample:\n{results['sample']}")
    return 0


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainArguments,
    *,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
) -> dict:
    """Trains one model and writes its output folder; returns the content of results.json.

    `on_batch(step, input_ids)` sees every micro-batch of this process (e.g. to check data sharding).
    Raises `TrainingInterrupted` on Ctrl-C (after saving a checkpoint) and `UserError` on bad input.
    """
    threads = torch.get_num_threads()
    if train_args.num_threads:
        torch.set_num_threads(train_args.num_threads)
    try:
        return _run_training(model_args, data_args, train_args, on_batch)
    finally:
        torch.set_num_threads(threads)  # a sweep runs several trainings in one process


def _run_training(model_args, data_args, train_args, on_batch) -> dict:
    started = time.perf_counter()
    # Everything that can reject the input runs before the first file is written.
    if train_args.carry_state and model_args.architecture != "hybrid":
        raise UserError(
            "--carry-state carries the recurrent state between blocks: only the hybrid architecture has one "
            "(GPT-2's context is its block); drop --carry-state or use --architecture hybrid"
        )
    if data_args.streaming and train_args.carry_state_streams > 1:
        raise UserError(
            "--carry-state-streams needs the whole training split in memory (each row's run is cut into sub-streams); "
            "drop --streaming or --carry-state-streams"
        )
    if data_args.streaming and train_args.max_steps is None and train_args.max_train_minutes is None:
        raise UserError(
            "--streaming reads a corpus of unknown length: give --max-steps or --max-train-minutes (not --epochs)"
        )
    check_model_fits(build_model_config(model_args, vocab_size=256, block_size=data_args.block_size), train_args)
    warn_ignored_model_options(model_args)
    accelerator, output_dir = build_accelerator(train_args)
    resume_from = check_output_dir(output_dir, train_args)
    resume_changes = check_resume_options(output_dir, model_args, data_args, train_args) if resume_from else {}
    set_seed(train_args.seed)
    test_text = None
    if data_args.test_dataset is not None:  # read now, so that a bad path fails before anything is written
        from training.data import load_whole_text

        test_text = load_whole_text(data_args.test_dataset, text_column=data_args.text_column)
    tokenizer, tokenized = prepare_data(accelerator, data_args, model_args, train_args, resume_from)
    # Its blocks too, before training: a text shorter than one block fails here, not after the last step.
    test_blocks = None if test_text is None else tokenize_test_text(test_text, tokenizer, data_args.block_size)
    train_dataloader, val_dataloader = build_dataloaders(tokenized, train_args, accelerator.num_processes)
    model = build_model(model_args, tokenizer, data_args.block_size)
    init_embeddings = prepare_embeddings(model, tokenizer, model_args)
    create_output_dir(accelerator, output_dir, train_args)
    start_trackers(accelerator, output_dir, train_args)
    if accelerator.is_main_process:
        used = dataclasses.replace(train_args, output_dir=str(output_dir))
        write_arguments_yaml(output_dir / "training_args.yaml", model_args, data_args, used)
        tokenizer.save_pretrained(output_dir)
    optimizer = build_optimizer(model, train_args)
    if train_dataloader is None:  # --streaming: the loop reads the training split itself
        model, optimizer, val_dataloader = accelerator.prepare(model, optimizer, val_dataloader)
    else:
        model, optimizer, train_dataloader, val_dataloader = accelerator.prepare(
            model, optimizer, train_dataloader, val_dataloader
        )
    progress = TrainingProgress()
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, output_dir, progress)
        progress.resumes.append({"step": progress.step, "changed": resume_changes})

    carried = None
    if train_args.carry_state:
        from training.streams import CarriedState

        carried = CarriedState(train_args.carry_state_streams)
        if resume_from is not None:
            carried.load(resume_from, accelerator.process_index, accelerator.device, train_args.batch_size)
    batches, batches_per_epoch = training_batches(
        tokenized, tokenizer, data_args, train_args, accelerator, progress, train_dataloader
    )
    max_steps = resolve_max_steps(train_args, batches_per_epoch)
    tokens_per_step = (
        train_args.batch_size
        * data_args.block_size
        * train_args.gradient_accumulation_steps
        * accelerator.num_processes
    )
    stats = getattr(tokenized, "stats", {}).get("validation")
    characters_per_token = stats.characters_per_token if stats is not None else None
    metric = load_metric(accelerator)
    metrics_file = output_dir / "metrics.jsonl"

    def log(row: dict) -> None:
        if accelerator.is_main_process:
            with metrics_file.open("a") as stream:
                stream.write(json.dumps(row) + "\n")
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def save_best_model() -> None:
        save_model_folder(accelerator, model, output_dir)

    # Streamed evaluation carries a recurrent state: hybrid models only (GPT-2's context is its block).
    validation_stream = getattr(tokenized, "validation_stream", None) if model_args.architecture == "hybrid" else None

    def evaluate() -> dict:
        metrics = evaluate_model(accelerator, model, val_dataloader, metric, characters_per_token)
        if carried is not None:  # the validation split as streams, the state carried (the first blocks' tokens)
            wanted = len(val_dataloader.dataset) * data_args.block_size if train_args.eval_batches else None
            streamed = stream_scores(
                accelerator,
                model,
                validation_stream[:wanted],
                data_args,
                train_args,
                tokenizer,
                characters_per_token,
                metric,
            )
            metrics.update({f"val_stream_{name}": value for name, value in streamed.items()})
        return metrics

    interrupt = _InterruptFlag(accelerator)
    parts = LoopParts(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        train_dataloader=train_dataloader,
        lr_multiplier=lr_schedule(train_args, optimizer, max_steps),
        evaluate=evaluate,
        save_best_model=save_best_model,
        save_checkpoint=lambda step: save_checkpoint(
            accelerator,
            output_dir,
            step,
            train_args.checkpoint_limit,
            progress.state_dict(),
            save_process_state=None if carried is None else carried.save,
        ),
        log=log,
        stop_requested=interrupt.is_set,
        tokens_per_step=tokens_per_step,
        resumed=resume_from is not None,
        on_batch=on_batch,
        carried=carried,
        batches=batches,
        selection_metric="val_stream_loss" if carried is not None else "val_loss",
    )
    with interrupt.installed():
        stopped_reason = train_loop(parts, progress, train_args, max_steps)
    for tracker in accelerator.trackers:
        tracker.finish()
    if stopped_reason == "interrupted":
        raise TrainingInterrupted(
            f"interrupted at step {progress.step} ({interrupt.signal_name}): checkpoint saved in "
            f"{output_dir / 'checkpoints'}; continue with "
            f"`hybrid-lm train {output_dir / 'training_args.yaml'} --resume-from-checkpoint latest`",
            exit_code=128 + interrupt.signal_number,
        )

    results = {
        "output_dir": str(output_dir),
        "best_step": progress.best_step,
        "best_val_loss": progress.best_val_loss,
        "train_tokens": progress.tokens_seen,
        "wall_time_s": time.perf_counter() - started,
        **count_parameters(accelerator.unwrap_model(model)),
        "dataset": data_args.dataset,
        "tokenizer": _tokenizer_kind(tokenizer),
        "vocab_size": len(tokenizer),
        # Share of the validation text's tokens that the vocabulary does not hold (scored as the unknown token).
        "validation_oov_rate": stats.unknown_rate
        if stats is not None and tokenizer.unk_token_id is not None
        else None,
        "architecture": architecture_of(accelerator.unwrap_model(model)),
        "num_processes": accelerator.num_processes,
        "num_threads": torch.get_num_threads(),  # per process
        "steps": progress.step,
        "train_seconds": progress.train_seconds,
        "init_embeddings": init_embeddings,  # {file, found, vocabulary} with --init-embeddings
        "resumes": progress.resumes,  # each resume's step and the options it changed: {option: [before, after]}
        "stopped_reason": stopped_reason,
    }
    non_finite = stopped_reason.startswith("non_finite")
    if non_finite:
        last_good = list_checkpoints(output_dir)
        step = progress.step + (1 if stopped_reason in ("non_finite_loss", "non_finite_gradient") else 0)
        results["message"] = (
            f"training stopped at step {step}: {parts.non_finite} (not finite); no checkpoint "
            f"was written after it, the last good one is {last_good[-1] if last_good else 'none'}; resume from it "
            "with a lower --learning-rate (and/or --max-grad-norm 1.0) via --resume-from-checkpoint"
        )
    if not non_finite and progress.best_step >= 0:
        full_split = tokenized["validation"]
        # Periodic evaluations that saw only part of the split: score the best model on all of it. Otherwise the best
        # evaluation already covered the whole split, and finish_output_folder copies its numbers.
        full = {}
        if (
            train_args.eval_batches
            and train_args.eval_batches * train_args.batch_size * accelerator.num_processes < len(full_split)
        ):
            loader = DataLoader(full_split, batch_size=train_args.batch_size, collate_fn=_collate)
            full = evaluate_saved_model(accelerator, output_dir, loader, metric, characters_per_token)
        # --streaming holds only the first --eval-batches batches of the validation split (all of it with 0).
        whole = not data_args.streaming or not train_args.eval_batches
        results["full_validation"] = {**full, "blocks": len(full_split), "whole_split": whole}
        if validation_stream is not None:  # the best model on the whole validation stream, the state carried
            best = load_saved_model(accelerator, output_dir)
            results["full_validation"]["stream"] = stream_scores(
                accelerator, best, validation_stream, data_args, train_args, tokenizer, characters_per_token, metric
            )
        elif getattr(tokenized, "validation_stream", None) is not None and data_args.block_size > 1:
            # No state (GPT-2): sliding windows instead, each token with half a block of context or more.
            best = load_saved_model(accelerator, output_dir)
            results["full_validation"]["sliding"] = sliding_scores(
                accelerator,
                best,
                tokenized.validation_stream,
                data_args,
                train_args,
                tokenizer,
                characters_per_token,
                metric,
            )
        if data_args.test_dataset is not None:
            results["test"] = evaluate_test_text(
                accelerator, output_dir, test_blocks, data_args, train_args, tokenizer, metric
            )
    if accelerator.is_main_process:  # metrics.jsonl, which the summary reads, is the main process's
        finish_output_folder(output_dir, results, train_args)
    accelerator.wait_for_everyone()
    return json.loads((output_dir / "results.json").read_text())


# ------------------------------------------------------------------------------------------------------------
# Setup
# ------------------------------------------------------------------------------------------------------------


def build_accelerator(args: TrainArguments) -> tuple[Accelerator, Path]:
    """The Accelerator of this run and the run's output folder (the same on every process)."""
    check_mixed_precision(args.mixed_precision)
    trackers = check_trackers(args.report_to)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir()
    # One process may run several trainings (a sweep): forget the previous run's precision/accumulation settings.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        # Accumulation follows our step count only: a step never straddles two epochs differently on resume.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # Shuffling from a seed + epoch generator makes mid-epoch resume exact (see loop.batch_stream).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # Trackers that write files (tensorboard, ...) need their folder when the Accelerator is built.
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        log_with=trackers,
    )
    accelerator.register_save_state_pre_hook(save_views_apart)
    accelerator.register_load_state_pre_hook(load_model_weights)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and accelerator.num_processes == 1:
        raise UserError(
            f"WORLD_SIZE={world_size} but this process trains alone (accelerate found no distributed setup), so "
            f"{world_size} independent copies would write the same output; on CPU launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 "
            "--mixed_precision no --dynamo_backend no -m training.train ...`"
        )
    return accelerator, output_dir


def start_trackers(accelerator: Accelerator, output_dir: Path, args: TrainArguments) -> None:
    """After the output folder is prepared (--overwrite-output-dir empties it first): the trackers' files stay."""
    if accelerator.log_with:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(output_dir.name, config=config)


def default_output_dir() -> Path:
    """runs/hybrid-lm-<time>, with the main process's clock so that every process writes to the same folder."""
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    if state.num_processes > 1:
        broadcast_object_list(stamp, from_process=0)
    return Path("runs") / f"hybrid-lm-{stamp[0]}"


def check_mixed_precision(mode: str) -> None:
    if mode == "fp16" and not torch.cuda.is_available():
        raise UserError(
            "--mixed-precision fp16 needs a CUDA GPU and none is available; use --mixed-precision bf16 "
            "(CPU autocast) or no"
        )
    if mode == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError("--mixed-precision bf16: this GPU does not support bfloat16; use fp16 or no")
    if mode == "bf16" and not torch.cuda.is_available() and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        logger.warning(
            "--mixed-precision bf16 on this CPU: it has no bf16 matrix instructions (torch's oneDNN needs AVX-512 or "
            "AMX), so bf16 matrix products run in generic code and training runs several times slower than in "
            "float32; --mixed-precision no is faster here"
        )


def check_trackers(report_to: str) -> list[str] | None:
    """`none` / `tensorboard,wandb` -> tracker names for accelerate; a missing package is an error, not a warning."""
    names = [name.strip().lower() for name in report_to.split(",") if name.strip()]
    if not names or names == ["none"]:
        return None
    known = [tracker.value for tracker in LoggerType]
    for name in names:
        if name not in known or name == "none":
            raise UserError(
                f"--report-to {name!r} is not a tracker accelerate knows; choose from: none, {', '.join(known)}"
            )
        check = _TRACKER_CHECKS.get(name)
        if check is not None:
            import accelerate.utils

            if not getattr(accelerate.utils, check)():
                raise UserError(
                    f"--report-to {name}: the {name} package is not installed; `pip install {name}` or use "
                    "--report-to none"
                )
    return names


def check_folder_path(output_dir: Path) -> None:
    """--output-dir names a folder, or a path where one can be made: neither it nor a folder above it is a file."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file, not a folder; choose another --output-dir")
    blocking = next((parent for parent in output_dir.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UserError(f"--output-dir {output_dir}: {blocking} is a file, not a folder; choose another --output-dir")


def check_output_dir(output_dir: Path, args: TrainArguments) -> Path | None:
    """The checkpoint to resume from, if any; refuses to clobber an earlier run, and --overwrite-output-dir refuses a
    folder that holds anything a run did not write. Writes nothing."""
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        read_progress(checkpoint)  # a missing or broken loop state fails here, before anything is written
        check_checkpoint_files(checkpoint)
        return checkpoint
    check_folder_path(output_dir)
    ours, others = output_dir_contents(output_dir)
    has_run = any(path.name in (*RUN_FILES, "checkpoints") for path in ours)
    if has_run and not args.overwrite_output_dir:
        raise UserError(
            f"{output_dir} already holds a training run; continue it with --resume-from-checkpoint latest, "
            "replace it with --overwrite-output-dir, or choose another --output-dir"
        )
    if args.overwrite_output_dir and others:
        shown = ", ".join(sorted(path.name for path in others)[:5]) + (", ..." if len(others) > 5 else "")
        raise UserError(
            f"--overwrite-output-dir: {output_dir} also holds files that no training run wrote ({shown}); nothing was "
            "deleted: move them elsewhere or choose another --output-dir"
        )
    return None


# Options that shape the run: a resume that changed them would not continue the same training.
RUN_SHAPING_OPTIONS = (
    *(f.name for f in dataclasses.fields(ModelArguments)),
    "dataset",
    "dataset_config",
    "text_column",
    "validation_fraction",
    "tokenizer",
    "vocab_size",
    "min_frequency",
    "lowercase",
    "block_size",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "mixed_precision",
    "carry_state",
    "carry_state_across_documents",
    "carry_state_streams",
    "streaming",
)
# What a resume never records as a change: where the run is and how it was started.
RESUME_BOOKKEEPING = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint")


def check_resume_options(output_dir: Path, model_args, data_args, train_args) -> dict:
    """The options a resume changes against the run's training_args.yaml, {option: [before, after]}. Options that
    shape the run (model, data, tokenizer, block and batch size, seed) are refused; the others (steps, time budget,
    evaluation and checkpoint cadence, learning rate, ...) are allowed and recorded in results.json."""
    saved_file = output_dir / "training_args.yaml"
    if not saved_file.is_file():
        return {}
    saved = yaml.safe_load(saved_file.read_text()) or {}
    current = arguments_to_dict(model_args, data_args, train_args)
    changes = {
        name: [saved[name], value]
        for name, value in current.items()
        if name in saved and saved[name] != value and name not in RESUME_BOOKKEEPING
    }
    refused = [name for name in changes if name in RUN_SHAPING_OPTIONS]
    if refused:
        listed = ", ".join(f"{name} {changes[name][0]!r} -> {changes[name][1]!r}" for name in refused)
        raise UserError(
            f"--resume-from-checkpoint: {listed} would change the run being resumed; resume with the options it was "
            f"trained with (`hybrid-lm train {saved_file} --resume-from-checkpoint latest`) or start a new run"
        )
    return changes


def is_run_output(path: Path) -> bool:
    """Whether a training run (or a command writing a model folder) writes a file or folder of this name."""
    return path.name in RUN_OUTPUTS or any(path.match(pattern) for pattern in RUN_OUTPUT_PATTERNS)


def output_dir_contents(output_dir: Path) -> tuple[list[Path], list[Path]]:
    """(what a run of ours wrote, everything else) in the folder."""
    if not output_dir.is_dir():
        return [], []
    ours, others = [], []
    for path in output_dir.iterdir():
        (ours if is_run_output(path) else others).append(path)
    return ours, others


def create_output_dir(accelerator: Accelerator, output_dir: Path, args: TrainArguments) -> None:
    """Creates the folder (with --overwrite-output-dir, the previous run's files removed first, nothing else) and
    removes leftovers of a killed save."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            for path in output_dir_contents(output_dir)[0]:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_temporary_folders(output_dir)
        for stale in output_dir.glob(".tmp-model*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def prepare_data(
    accelerator, data_args: DataArguments, model_args: ModelArguments, train_args: TrainArguments, resume_from
):
    """Corpus -> tokenizer (built, or reloaded from the run being resumed) -> fixed-length token blocks."""
    from training.data import load_corpus, split_token_stream, tokenize_corpus, training_texts
    from training.tokenization import build_tokenizer

    max_length = data_args.block_size if model_args.architecture == "gpt2" else max(1024, data_args.block_size)
    # A resumed run must keep its token ids: the run's folder (the checkpoints' parent) holds its tokenizer.
    saved_tokenizer = None if resume_from is None else resume_from.parent.parent
    with accelerator.main_process_first():
        corpus = load_corpus(
            data_args.dataset,
            dataset_config=data_args.dataset_config,
            text_column=data_args.text_column,
            validation_fraction=data_args.validation_fraction,
            streaming=data_args.streaming,
        )
        if saved_tokenizer is not None and (saved_tokenizer / "tokenizer_config.json").is_file():
            tokenizer = build_tokenizer(str(saved_tokenizer), model_max_length=max_length)
        else:
            tokenizer = build_tokenizer(
                data_args.tokenizer,
                training_texts(corpus["train"]),
                data_args.vocab_size,
                max_length,
                min_frequency=data_args.min_frequency,
                lowercase=data_args.lowercase,
            )
        cache_dir = None if data_args.streaming else block_cache_dir(data_args.cache_dir)
        tokenized = tokenize_corpus(
            corpus, tokenizer, data_args.block_size, num_proc=data_args.num_proc, cache_dir=cache_dir
        )
        if data_args.streaming:
            tokenized = streamed_splits(corpus, tokenized, data_args, train_args, accelerator.num_processes)
        if not data_args.streaming:
            # Streamed evaluation (hybrid) and sliding windows (GPT-2) read the whole validation stream, the last
            # tokens included.
            tokenized.validation_stream = split_token_stream(corpus["validation"], tokenizer)
        if cache_dir is not None and hasattr(tokenized, "cache_hit"):
            logger.info("token blocks %s %s", "loaded from" if tokenized.cache_hit else "cached in", cache_dir)
    validation = getattr(tokenized, "stats", {}).get("validation")
    if accelerator.is_main_process and validation is not None and tokenizer.unk_token_id is not None:
        logger.info(
            "validation split: %d of %d tokens (%.2f%%) are out of the vocabulary (%s)",
            validation.unknown_tokens,
            validation.text_tokens,
            100 * validation.unknown_rate,
            tokenizer.unk_token,
        )
    return tokenizer, tokenized


class StreamedSplits(dict):
    """--streaming: "train" stays a lazy IterableDataset of blocks; "validation" (read at every evaluation) is held
    in memory: its first --eval-batches batches, or all of it. `documents`: the lazy training documents (for
    --carry-state rows); `validation_stream`: the validation tokens for streamed evaluation."""


def streamed_splits(corpus, tokenized, data_args, train_args, num_processes: int) -> StreamedSplits:
    import numpy as np
    from datasets import Dataset

    wanted = train_args.eval_batches * train_args.batch_size * num_processes if train_args.eval_batches else None
    validation = tokenized["validation"] if wanted is None else tokenized["validation"].take(wanted)
    rows = [example["input_ids"] for example in validation]
    if not rows:
        raise UserError(
            f"the streamed validation split has no block of {data_args.block_size} tokens; lower --block-size or give "
            "more validation data"
        )
    splits = StreamedSplits(train=tokenized["train"], validation=Dataset.from_dict({"input_ids": rows}))
    splits.documents = corpus["train"]
    splits.validation_stream = np.asarray(rows, dtype=np.int64).reshape(-1)
    return splits


def block_cache_dir(option: str | None) -> Path | None:
    """--cache-dir: unset = the user cache folder, `none` = no cache."""
    if option is not None:
        return None if option.lower() == "none" else Path(option).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybrid-lm" / "blocks"


def training_batches(tokenized, tokenizer, data_args, train_args, accelerator, progress, train_dataloader):
    """(micro-batch iterator or None for the loop's shuffled dataloader, micro-batches per epoch or None if unknown)
    for the four ways of reading the training split: shuffled blocks or contiguous rows (--carry-state), from memory
    or streamed (--streaming)."""
    from training.streams import (
        CarriedStreams,
        carried_batch_stream,
        streamed_block_batches,
        streamed_row_batches,
    )

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    reset_documents = not train_args.carry_state_across_documents
    if data_args.streaming:
        if train_args.carry_state:
            batches = streamed_row_batches(
                tokenized.documents, tokenizer, data_args.block_size, train_args.batch_size, rank, world,
                reset_documents, progress,
            )  # fmt: skip
        else:
            batches = streamed_block_batches(
                tokenized["train"], train_args.batch_size, train_args.seed, rank, world, progress
            )
        return ({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches), None
    if train_args.carry_state:
        eos_id = tokenizer.eos_token_id if reset_documents else None
        streams = CarriedStreams(
            tokenized["train"], train_args.batch_size, rank, world, eos_id, train_args.carry_state_streams,
            train_args.seed,
        )  # fmt: skip
        return carried_batch_stream(streams, progress, device), streams.length
    return None, len(train_dataloader)


def build_dataloaders(tokenized, args: TrainArguments, num_processes: int) -> tuple[DataLoader | None, DataLoader]:
    """Shuffled training batches (whole batches only; None for a streamed corpus, which the loop reads itself) and
    the fixed evaluation batches."""
    if not hasattr(tokenized, "stats"):  # streamed: validation blocks were read into memory by prepare_data
        return None, DataLoader(tokenized["validation"], batch_size=args.batch_size, collate_fn=_collate)
    train = tokenized["train"]
    if len(train) < args.batch_size * num_processes:
        raise UserError(
            f"the training split has {len(train)} blocks, fewer than one batch of {args.batch_size} per process; "
            "lower --batch-size or --block-size, or use more data"
        )
    train_dataloader = DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # every step sees the same number of tokens
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(args.seed),  # keeps loader workers' seeds off the global RNG
    )
    validation = tokenized["validation"]
    if args.eval_batches:  # the same first blocks at every evaluation, so that evaluations compare
        wanted = args.eval_batches * args.batch_size * num_processes
        validation = validation.select(range(min(wanted, len(validation))))
    return train_dataloader, DataLoader(validation, batch_size=args.batch_size, collate_fn=_collate)


def _collate(examples: list[dict]) -> dict:
    from training.data import collate_blocks

    return {"input_ids": collate_blocks(examples)["input_ids"]}


def stream_scores(accelerator, model, stream, data_args, train_args, tokenizer, characters_per_token, metric) -> dict:
    """Streamed evaluation (training.streams) with the run's block size, one row per batch row."""
    from training.streams import evaluate_stream

    return evaluate_stream(
        accelerator,
        model,
        stream,
        block_size=data_args.block_size,
        rows=train_args.batch_size * accelerator.num_processes,
        eos_id=tokenizer.eos_token_id,
        # As the model was trained: block-wise training runs the state through EOS, --carry-state resets it there.
        reset_documents=train_args.carry_state and not train_args.carry_state_across_documents,
        characters_per_token=characters_per_token,
        metric=metric,
    )


def sliding_scores(accelerator, model, stream, data_args, train_args, tokenizer, characters_per_token, metric) -> dict:
    """A model without a recurrent state on the whole validation stream in sliding windows of the run's block, half
    a block apart (`hybrid-lm eval --stride`): every token scored, each with at least half a block of context."""
    from training.streams import evaluate_sliding

    return evaluate_sliding(
        accelerator,
        model,
        stream,
        block_size=data_args.block_size,
        stride=max(1, data_args.block_size // 2),
        rows=train_args.batch_size,
        prefix_id=tokenizer.eos_token_id,
        characters_per_token=characters_per_token,
        metric=metric,
    )


def load_saved_model(accelerator: Accelerator, output_dir: Path):
    from transformers import AutoModelForCausalLM

    with _quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(output_dir, **LOCAL_CODE_ONLY)
    return accelerator.prepare_model(model, evaluation_mode=True)


def evaluate_saved_model(
    accelerator: Accelerator, output_dir: Path, dataloader: DataLoader, metric, characters_per_token
):
    """The best model, loaded back from the output folder, scored on every block of the validation split.

    Periodic evaluations may see only the first --eval-batches batches (to choose the best step quickly); the numbers
    a run reports are this full-split evaluation."""
    model = load_saved_model(accelerator, output_dir)
    metrics = evaluate_model(
        accelerator, model, accelerator.prepare_data_loader(dataloader), metric, characters_per_token
    )
    return {
        "loss": metrics["val_loss"],
        "perplexity": metrics["val_perplexity"],
        "bits_per_token": metrics["val_bits_per_token"],
        "bits_per_character": metrics.get("val_bits_per_char"),
    }


def tokenize_test_text(text, tokenizer, block_size: int):
    """--test-dataset's text (read whole) cut into blocks, as one "test" split."""
    from datasets import DatasetDict

    from training.data import tokenize_corpus

    return tokenize_corpus(DatasetDict({"test": text}), tokenizer, block_size)


def evaluate_test_text(
    accelerator, output_dir: Path, tokenized, data_args: DataArguments, train_args, tokenizer, metric
) -> dict:
    """--test-dataset: the best model on every block of that text (`tokenize_test_text`), with its OOV rate."""
    stats = tokenized.stats["test"]
    loader = DataLoader(tokenized["test"], batch_size=train_args.batch_size, collate_fn=_collate)
    scores = evaluate_saved_model(accelerator, output_dir, loader, metric, stats.characters_per_token)
    return {
        **scores,
        "dataset": Path(data_args.test_dataset).name,
        "tokens": stats.text_tokens,
        "tokens_evaluated": stats.blocks * (data_args.block_size - 1),  # each block's first token has no context
        "oov_rate": stats.unknown_rate if tokenizer.unk_token_id is not None else None,
    }


def build_model(model_args: ModelArguments, tokenizer, block_size: int):
    """The model at the requested size, its vocabulary and special tokens taken from the tokenizer."""
    from transformers import AutoModelForCausalLM

    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = build_model_config(model_args, len(tokenizer), block_size, **special)
    return AutoModelForCausalLM.from_config(config)


def prepare_embeddings(model, tokenizer, model_args: ModelArguments) -> dict | None:
    """--init-embeddings and --freeze-embeddings. A resume does the same, then loads the trained weights over them."""
    from training.embeddings import freeze_embeddings, initialise_embeddings

    found = None
    if model_args.init_embeddings is not None:
        found = initialise_embeddings(model, tokenizer, model_args.init_embeddings)
        logger.info(
            "--init-embeddings %s: %d of %d vocabulary tokens (%.1f%%) found there; the others keep the normal "
            "initialisation",
            found["file"],
            found["found"],
            found["vocabulary"],
            100 * found["found"] / max(1, found["vocabulary"]),
        )
    if model_args.freeze_embeddings:
        freeze_embeddings(model)
    return found


def check_model_fits(config, args: TrainArguments) -> None:
    """A model whose training state cannot fit in memory is refused in one line, before anything is allocated."""
    import psutil
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: nothing is allocated
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    needed = parameters * 4 * 4  # float32 weights, gradients and AdamW's two moments
    available = psutil.virtual_memory().available if not torch.cuda.is_available() else None
    if available is not None and needed > available:
        raise UserError(
            f"the model has {parameters:,} parameters, whose training state needs about {needed / 1e9:.1f} GB, more "
            f"than the {available / 1e9:.1f} GB of memory available; lower --hidden-size or --num-hidden-layers"
        )


HYBRID_ONLY_OPTIONS = ("rnn_type", "attention_layers", "attention_window", "use_residual")
# What a --model-config file decides instead of the flags (the embeddings options still apply).
MODEL_CONFIG_REPLACES = (
    "architecture",
    "hidden_size",
    "num_hidden_layers",
    "rnn_type",
    "num_attention_heads",
    "attention_layers",
    "attention_window",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout",
    "attention_dropout",
    "use_residual",
)


def warn_ignored_model_options(model_args: ModelArguments) -> None:
    """Options that the run cannot use and that were set away from their defaults are named: a config file replaces
    every size option, and GPT-2 has no recurrent cell or attention layout (studies give their GPT-2 baselines the
    hybrid runs' options, hence a warning, not an error)."""
    if model_args.model_config is not None:
        names, reason = MODEL_CONFIG_REPLACES, f"--model-config {model_args.model_config} replaces the options"
    elif model_args.architecture == "gpt2":
        names, reason = HYBRID_ONLY_OPTIONS, "--architecture gpt2 ignores the hybrid model's options"
    else:
        return
    fields = ModelArguments.__dataclass_fields__
    ignored = []
    for name in names:
        value, flag = getattr(model_args, name), name.replace("_", "-")
        if value != fields[name].default:  # as typed: --no-use-residual, --rnn-type lstm
            ignored.append(
                (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}"
            )
    if ignored:
        logger.warning("%s %s", reason, ", ".join(ignored))


def build_model_config(model_args: ModelArguments, vocab_size: int, block_size: int, **special_tokens):
    """HybridRnnLmConfig / GPT2Config from the arguments (or --model-config); a UserError if they do not fit."""
    from transformers import AutoConfig, GPT2Config

    from hybrid_rnn_lm import HybridRnnLmConfig  # importing it registers the model with the Auto classes

    special = {"vocab_size": vocab_size, **special_tokens}
    try:
        if model_args.model_config is not None:
            config = _load_model_config(model_args.model_config, AutoConfig)
            for name, value in special.items():
                setattr(config, name, value)
            return config
        if model_args.architecture == "gpt2":
            return GPT2Config(
                n_embd=model_args.hidden_size,
                n_layer=model_args.num_hidden_layers,
                n_head=model_args.num_attention_heads,
                n_inner=model_args.intermediate_size,
                activation_function=model_args.hidden_act or GPT2Config().activation_function,
                n_positions=block_size,
                resid_pdrop=model_args.hidden_dropout,
                embd_pdrop=model_args.hidden_dropout,
                attn_pdrop=model_args.attention_dropout,
                tie_word_embeddings=True,
                **special,
            )
        return HybridRnnLmConfig(
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            rnn_type=model_args.rnn_type,
            num_attention_heads=model_args.num_attention_heads,
            attention_layers=parse_attention_layers(model_args.attention_layers),
            attention_window=model_args.attention_window,
            intermediate_size=model_args.intermediate_size,
            hidden_act=model_args.hidden_act or DEFAULT_HYBRID_ACTIVATION,
            hidden_dropout=model_args.hidden_dropout,
            attention_dropout=model_args.attention_dropout,
            use_residual=model_args.use_residual,
            **special,
        )
    except ValueError as error:
        raise UserError(f"invalid model configuration: {error}") from None


def _load_model_config(path: str, auto_config):
    location = Path(path)
    folder = location.parent if location.is_file() else location
    if not (folder / "config.json").is_file():
        raise UserError(f"--model-config {path}: no config.json there; pass a config.json or a folder holding one")
    if location.is_file() and location.name != "config.json":
        raise UserError(f"--model-config {path}: the file must be named config.json (or pass its folder)")
    try:
        return auto_config.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"--model-config {path} cannot be read ({str(error).splitlines()[0]}); fix the file") from None


def build_optimizer(model: torch.nn.Module, args: TrainArguments) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms, biases and embeddings are not pulled towards zero."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for parameter in model.parameters():  # tied weights are yielded once
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and id(parameter) not in embeddings else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused kernel updates every parameter in one pass (3x faster than the default on CPU, same result up to
    # float rounding); it exists for float parameters on CPU and CUDA.
    fused = all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for group in groups for p in group["params"]
    )
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.99), fused=fused)


def lr_schedule(args: TrainArguments, optimizer, max_steps: int) -> Callable[[int], float]:
    """step -> fraction of the peak learning rate, from transformers.get_scheduler's schedule of that name."""
    from transformers import get_scheduler

    name = args.lr_scheduler
    if name == "constant" and args.warmup_steps:
        name = "constant_with_warmup"  # transformers' "constant" ignores warmup
    specific = {}
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        specific["min_lr_rate"] = args.min_lr_rate
    if name == "warmup_stable_decay":
        specific["num_decay_steps"] = max(1, max_steps // 5)
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=max_steps,
        scheduler_specific_kwargs=specific,
    )
    multiplier = scheduler.lr_lambdas[0]
    for group in optimizer.param_groups:  # the scheduler's constructor moved them; the loop sets lr every step
        group["lr"] = args.learning_rate
    return multiplier


def resolve_max_steps(args: TrainArguments, batches_per_epoch: int | None) -> int:
    if args.max_steps is not None:
        return args.max_steps
    if args.epochs is not None:
        return max(1, math.ceil(args.epochs * batches_per_epoch / args.gradient_accumulation_steps))
    if args.max_train_minutes is not None:
        return UNBOUNDED_STEPS  # the time budget alone ends the run
    return DEFAULT_MAX_STEPS


def load_metric(accelerator: Accelerator):
    import evaluate

    # From the repository, by path: evaluate never goes to the Hub for it. Main process first: it copies the
    # module into its cache folder.
    with accelerator.main_process_first():
        return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, output_dir: Path, progress: TrainingProgress) -> None:
    state = read_progress(checkpoint)  # before anything is loaded: a broken checkpoint changes nothing
    try:
        accelerator.load_state(str(checkpoint))
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(
            f"{checkpoint} does not fit the model being built ({str(error).strip().splitlines()[0]}); resume with "
            f"the arguments it was trained with: `hybrid-lm train {output_dir / 'training_args.yaml'} "
            "--resume-from-checkpoint ...`"
        ) from None
    progress.load_state_dict(state)
    step = checkpoint_step(checkpoint)
    if accelerator.is_main_process:
        removed = remove_checkpoints_after(output_dir, step)
        if removed:
            logger.warning("resuming from step %d: removed newer checkpoints %s", step, [p.name for p in removed])
        _truncate_metrics(output_dir / "metrics.jsonl", step)
    accelerator.wait_for_everyone()
    logger.info("resumed from %s (step %d)", checkpoint, step)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops rows a killed run logged after its last checkpoint (and a line torn by the kill): they are redone."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


# ------------------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------------------


def save_model_folder(accelerator: Accelerator, model, output_dir: Path) -> None:
    """save_pretrained into the output folder, file by file through a temporary folder (each file is atomic)."""
    if accelerator.is_main_process:
        temporary = output_dir / ".tmp-model"
        shutil.rmtree(temporary, ignore_errors=True)
        with _quiet_progress_bars():  # one bar per save would bury the training bar
            accelerator.unwrap_model(model).save_pretrained(temporary)
        for file in sorted(temporary.iterdir(), key=lambda f: f.name == "model.safetensors"):
            os.replace(file, output_dir / file.name)
        temporary.rmdir()
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def _quiet_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def count_parameters(model) -> dict:
    """Parameters, and those outside token/position embeddings (as nanoGPT and scaling-law papers count)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    output = model.get_output_embeddings()
    if output is not None:
        embeddings.add(id(output.weight))
    parameters = list(model.parameters())  # deduplicated: a tied head counts once
    total = sum(p.numel() for p in parameters)
    return {
        "num_parameters": total,
        "num_non_embedding_parameters": total - sum(p.numel() for p in parameters if id(p) in embeddings),
    }


def architecture_of(model) -> str:
    return "gpt2" if model.config.model_type == "gpt2" else "hybrid"


def _tokenizer_kind(tokenizer) -> str:
    from training.tokenization import tokenizer_kind

    return tokenizer_kind(tokenizer)


def finish_output_folder(output_dir: Path, results: dict, train_args: TrainArguments) -> None:
    """Best evaluation, throughput, sample, plot, results.json and the model card (main process)."""
    rows = read_metrics(output_dir / "metrics.jsonl")
    best = [row for row in rows if "val_loss" in row and row["step"] == results["best_step"]]
    best = best[-1] if best else {}
    results["val_perplexity"] = best.get("val_perplexity")
    results["val_bits_per_token"] = best.get("val_bits_per_token")
    results["val_bits_per_char"] = best.get("val_bits_per_char")  # null for non-char tokenizers
    full = results.get("full_validation")
    if full is not None and "loss" not in full:  # the best evaluation was already on the whole split
        full.update(
            loss=best["val_loss"],
            perplexity=best["val_perplexity"],
            bits_per_token=best["val_bits_per_token"],
            bits_per_character=best.get("val_bits_per_char"),
        )
    throughputs = [row["tokens_per_second"] for row in rows if "tokens_per_second" in row]
    results["tokens_per_second"] = sum(throughputs) / len(throughputs) if throughputs else None
    finite = not results["stopped_reason"].startswith("non_finite")
    if finite and train_args.sample_tokens and results["best_step"] >= 0:
        results["sample"] = generate_sample(output_dir, train_args)
    plot_loss_curve(rows, output_dir / "loss_curve.png", title=output_dir.name)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_model_card(output_dir)


def generate_sample(output_dir: Path, args: TrainArguments) -> str:
    """Text from the saved best model, loaded back the way a user would load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(output_dir)
        model = AutoModelForCausalLM.from_pretrained(output_dir, **LOCAL_CODE_ONLY).eval()
    prompt = tokenizer(args.sample_prompt, add_special_tokens=False, return_tensors="pt").input_ids
    if prompt.shape[1] == 0:
        prompt = torch.tensor([[tokenizer.bos_token_id]])
    new_tokens = args.sample_tokens
    limit = getattr(model.config, "n_positions", None)  # GPT-2 cannot go past its position table
    if limit is not None:
        new_tokens = max(0, min(new_tokens, limit - prompt.shape[1]))
    torch.manual_seed(args.seed)
    with torch.no_grad():
        output = model.generate(
            prompt,
            max_new_tokens=new_tokens,
            do_sample=True,
            top_k=50,
            temperature=0.8,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0], skip_special_tokens=True)


def write_model_card(output_dir: Path) -> None:
    """The run's card, README.md; a card kept by hand (its generated-card line deleted, e.g. before a resumed run
    ends) stays as it is, as `hybrid-lm push` and `hybrid-lm card` keep it."""
    try:
        from training.card import is_generated, write_card
    except ImportError as error:
        if error.name not in ("training.card",):
            logger.warning("model card not written: training.card failed to import: %s", error)
        return
    readme = output_dir / "README.md"
    if readme.is_file() and not is_generated(readme):
        logger.warning(
            "kept the hand-edited %s (it lacks the generated-card line); `hybrid-lm card %s --overwrite` renders "
            "this run's card in its place",
            readme,
            output_dir,
        )
        return
    try:
        write_card(output_dir)
    except Exception as error:  # the trained model is saved either way; say why its card is missing
        logger.warning(
            "model card not written (%s: %s); retry with `hybrid-lm card %s`", type(error).__name__, error, output_dir
        )


# ------------------------------------------------------------------------------------------------------------
# Ctrl-C
# ------------------------------------------------------------------------------------------------------------


class _InterruptFlag:
    """First Ctrl-C or SIGTERM (what cluster schedulers send before killing a job): finish the current step, save a
    checkpoint, stop. A second one: stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.signal_number: int | None = None

    @property
    def raised(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str:
        return "Ctrl-C" if self.signal_number in (None, signal.SIGINT) else signal.Signals(self.signal_number).name

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.signal_number = signum
        if self.accelerator.is_main_process:
            print(
                f"\n{self.signal_name}: saving a checkpoint after this step (send it again to stop at once)",
                file=sys.stderr,
            )

    def is_set(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self.raised
        flag = torch.tensor([float(self.signal_number or 0)], device=self.accelerator.device)
        received = int(self.accelerator.gather(flag).max().item())  # stop together: saving a checkpoint is collective
        if received and not self.raised:
            self.signal_number = received
        return bool(received)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


if __name__ == "__main__":
    # `accelerate launch -m training.train ...`: the same command line as `hybrid-lm train ...`.
    from training.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
