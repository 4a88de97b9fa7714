"""Resumable checkpoints: `accelerator.save_state` folders at output_dir/checkpoints/checkpoint-<step>.

A checkpoint is written into a hidden temporary folder and renamed into place only when complete, so a run
killed mid-save never leaves a `checkpoint-<step>` that `latest` would pick up half-written.
"""

import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from training.errors import UserError

CHECKPOINTS_FOLDER = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY_PREFIX = ".tmp-"
# What accelerate's save_state always writes; a folder without it is not a checkpoint.
_REQUIRED_FILE = "model.safetensors"


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


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, step: int, limit: int) -> Path:
    """Saves the full training state atomically, then keeps only the newest `limit` checkpoints."""
    root = checkpoints_root(output_dir)
    final = root / f"checkpoint-{step}"
    temporary = root / f"{_TEMPORARY_PREFIX}checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))  # every process: each writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
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
