"""Resumable checkpoints: `accelerator.save_state` folders at output_dir/checkpoints/checkpoint-<step>.

A checkpoint is written into a hidden temporary folder and renamed into place only when complete, so a run
killed mid-save never leaves a `checkpoint-<step>` that `latest` would pick up half-written. The loop's own state
(step, data position, best loss, ...) is `training_progress.json`: plain JSON, never a pickle.
"""

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from accelerate import Accelerator

from training.errors import UserError
from training.model_files import check_safetensors

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY_PREFIX = ".tmp-"
# What accelerate's save_state always writes; a folder without it is not a checkpoint.
_REQUIRED_FILE = "model.safetensors"
PROGRESS_FILE = "training_progress.json"


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS_FOLDER


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path:
    """`latest` or a folder -> the checkpoint folder to resume from (a UserError when there is none)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"--resume-from-checkpoint latest: no checkpoint in {checkpoints_root(output_dir)}; "
                "check --output-dir, or start a new run without --resume-from-checkpoint"
            )
        return found[-1]
    path = Path(spec)
    if not (path / _REQUIRED_FILE).is_file() or checkpoint_step(path) is None:
        raise UserError(
            f"--resume-from-checkpoint {spec}: not a checkpoint folder (expected .../checkpoint-<step> holding "
            f"{_REQUIRED_FILE}); pass one from <output_dir>/{CHECKPOINTS_FOLDER}/ or `latest`"
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    limit: int,
    progress: dict,
    save_process_state=None,
) -> Path:
    """Saves the full training state (accelerate's, plus the loop's `progress` as JSON) atomically, then keeps only
    the newest `limit` checkpoints. `save_process_state(folder, process_index)` adds each process's own files (the
    carried recurrent state)."""
    root = checkpoints_root(output_dir)
    final = root / f"checkpoint-{step}"
    temporary = root / f"{_TEMPORARY_PREFIX}checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))  # every process: each writes its own RNG state
    if save_process_state is not None:
        save_process_state(temporary, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / PROGRESS_FILE).write_text(json.dumps(progress, indent=2) + "\n")
        if final.exists():  # same step saved by an earlier attempt: move it aside first, rename is then atomic
            stale = root / f"{_TEMPORARY_PREFIX}stale-checkpoint-{step}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(temporary, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(temporary, final)
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _same_view(a, b) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _exact_aliases(state: dict) -> dict[str, str]:
    """{name: earlier name} for each tensor that is the very same view as an earlier one (tied weights:
    lm_head.weight -> model.embed_tokens.weight)."""
    seen, aliases = {}, {}
    for name, tensor in state.items():
        original = next((other for other, kept in seen.items() if _same_view(tensor, kept)), None)
        if original is None:
            seen[name] = tensor
        else:
            aliases[name] = original
    return aliases


def save_views_apart(models: list, weights: list[dict], output_dir: str) -> None:
    """accelerate's save_state pre-hook. accelerate keeps one tensor per storage when it writes safetensors, meant
    for tied weights; but cuDNN keeps a GRU / LSTM / RNN's weights on a GPU (`flatten_parameters`) as views into one
    buffer, and all but one of them would be left out of the checkpoint. Each such view is saved from a copy of its
    own; tied weights (the very same view) stay shared with their copy and are written once."""
    for state in weights:
        storages = {}
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                storages.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
        for names in storages.values():
            if len(names) < 2:
                continue
            aliases = _exact_aliases({name: state[name] for name in names})
            for name in names:
                if name not in aliases:
                    state[name] = state[name].clone()
            for name, original in aliases.items():
                state[name] = state[original]


def load_model_weights(models: list, input_dir: str) -> None:
    """accelerate's load_state pre-hook: loads each model's `model[_i].safetensors` with `load_state_dict`, which
    copies into the parameters where they are, and takes the models off accelerate's list. accelerate's own path
    (safetensors' `load_model`) refuses parameters that are views into one larger storage, as cuDNN's recurrent
    weights are on a GPU. A name missing from the file must be a tied weight of one that is there; FSDP and DeepSpeed
    models never reach this list (accelerate loads them its own way)."""
    from safetensors.torch import load_file

    paths = [Path(input_dir) / f"model{f'_{index}' if index else ''}.safetensors" for index in range(len(models))]
    if not all(path.is_file() for path in paths):
        return  # accelerate's .bin files (older checkpoints): its own path, which matches files to models by index
    for model, path in zip(models, paths):
        state, live = load_file(path), model.state_dict()
        tied = {name for name, original in _exact_aliases(live).items() if original in state}
        missing = set(live) - set(state) - tied
        unexpected = set(state) - set(live)
        if missing or unexpected:
            raise RuntimeError(
                f"{path.name} does not hold the model's weights: missing {sorted(missing)}, unexpected "
                f"{sorted(unexpected)}"
            )
        model.load_state_dict(state, strict=False)
    models.clear()


def read_progress(checkpoint: Path) -> dict:
    """The loop state saved with a checkpoint; a one-line error naming the file when it is missing or broken, or
    when the folder holds a pickled object state (accelerate would count it, and a pickle can run code)."""
    pickled = sorted(path.name for path in checkpoint.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise UserError(
            f"{checkpoint} holds {', '.join(pickled)}, a pickled object state that this version never writes and "
            "never loads (loading a pickle can run arbitrary code); delete it to resume from this checkpoint"
        )
    path = checkpoint / PROGRESS_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{checkpoint} has no {PROGRESS_FILE} (the loop state): it was written by an older version, which kept "
            "that state in a pickle that is never loaded; resume from a newer checkpoint or start the run again"
        ) from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({error}); resume from an earlier checkpoint") from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{path} is not a loop state (no step); resume from an earlier checkpoint")
    return state


def check_checkpoint_files(checkpoint: Path) -> None:
    """The weights and optimizer state a resume reads, checked before anything is loaded (and without unpickling):
    a truncated or corrupt file is a UserError naming it and the previous checkpoint to resume from instead. A
    missing RNG state is only a warning: the run resumes, but not bit for bit."""
    try:
        check_safetensors(checkpoint / _REQUIRED_FILE)
        optimizer = checkpoint / "optimizer.bin"
        if not optimizer.is_file():
            raise UserError(f"{optimizer} is missing")
        if not zipfile.is_zipfile(optimizer):
            raise UserError(f"{optimizer} is truncated or corrupt")
        with zipfile.ZipFile(optimizer) as archive:
            if archive.testzip() is not None:  # CRC of every member, read as bytes: nothing is unpickled
                raise UserError(f"{optimizer} is corrupt")
    except (UserError, zipfile.BadZipFile, OSError) as error:
        step = checkpoint_step(checkpoint)
        earlier = [path for path in list_checkpoints(checkpoint.parent.parent) if checkpoint_step(path) < step]
        hint = (
            f"resume from the previous checkpoint with --resume-from-checkpoint {earlier[-1]}"
            if earlier
            else "no earlier checkpoint exists: start the run again"
        )
        reason = str(error).split("; save the model again")[0]
        raise UserError(f"checkpoint {checkpoint} cannot be resumed: {reason}; {hint}") from None
    if not list(checkpoint.glob("random_states_*.pkl")):
        logger.warning(
            "%s has no random_states_*.pkl (the random number generators' state): the resumed run continues, but "
            "its dropout masks and sampling will differ from an uninterrupted run",
            checkpoint,
        )


def remove_checkpoints_after(output_dir: str | os.PathLike, step: int) -> list[Path]:
    """Deletes checkpoints newer than `step` (a run resumed from an older one replaces that future)."""
    removed = [path for path in list_checkpoints(output_dir) if checkpoint_step(path) > step]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_temporary_folders(output_dir: str | os.PathLike) -> None:
    """Leftovers of a save that was killed midway."""
    root = checkpoints_root(output_dir)
    if root.is_dir():
        for path in root.glob(f"{_TEMPORARY_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
