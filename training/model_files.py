"""The weights of a saved model folder: safetensors only. A folder whose weights exist only as pickles
(`pytorch_model.bin`, `.pt`, ...) is refused by every command, never loaded: unpickling can run arbitrary code."""

import json
from pathlib import Path

from training.errors import UserError

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# from_pretrained options of every model these commands load. transformers 5 marks a loaded model for "hub kernels"
# by default: when the model sits on a GPU and switches between train() and eval(), its activations are replaced by
# compiled code fetched from the Hub (kernels-community/...), which fails offline and runs code no folder of ours
# holds. The commands run the model's own code only.
LOCAL_CODE_ONLY = {"use_kernels": False}


def holds_json_object_with(path: Path, keys: set[str], max_bytes: int = 16_000_000) -> bool:
    """Whether a file is a JSON object holding `keys`: how a command recognises a file it wrote before, the only kind
    it replaces. Anything else (missing, a folder, too large, not UTF-8, not JSON, other keys) is not."""
    try:
        if not path.is_file() or path.stat().st_size > max_bytes:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: UnicodeDecodeError and JSONDecodeError
        return False
    return isinstance(data, dict) and keys <= data.keys()


def weight_files(folder: Path, refusal: str = "never loaded") -> list[str]:
    """The safetensors files of `folder` (one file, or an index and its shards); a UserError otherwise."""
    if (folder / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    if (folder / WEIGHTS_INDEX_FILE).is_file():
        shards = sorted(set(json.loads((folder / WEIGHTS_INDEX_FILE).read_text())["weight_map"].values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise UserError(f"{folder} lacks weight shards {missing} listed in {WEIGHTS_INDEX_FILE}; save it again")
        return [WEIGHTS_INDEX_FILE, *shards]
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{folder} holds weights only as pickles ({', '.join(pickles)}), which are {refusal} because loading "
            f"a pickle can run arbitrary code; re-save the model as safetensors with `model.save_pretrained(folder)`"
        )
    raise UserError(f"{folder} has no {WEIGHTS_FILE}; pass the output folder of `hybrid-lm train`")


def check_safetensors(path: Path) -> None:
    """A truncated or corrupt file fails here with its name, not deep inside loading: the header must parse and
    promise no more bytes than the file has."""
    from safetensors import safe_open

    try:
        with open(path, "rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            header = json.loads(stream.read(length))
        end = 8 + length + max((e["data_offsets"][1] for n, e in header.items() if n != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise UserError(
            f"{path} is corrupt (its header is not readable: {_first_line(error)}); save the model again"
        ) from None
    if path.stat().st_size < end:
        raise UserError(f"{path} is truncated ({path.stat().st_size:,} of {end:,} bytes); save the model again")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # safetensors raises its own SafetensorError for every other malformed file
        raise UserError(f"{path} is corrupt ({_first_line(error)}); save the model again") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def refuse_missing_weights(folder: Path, missing) -> None:
    """A tensor the saved weights lack would start from random values: a model that silently is not the saved one."""
    if missing:
        names = sorted(missing)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(
            f"{folder}: the saved weights lack {len(names)} of the model's tensors ({shown}), which would start from "
            "random values; save the model again"
        )


def classifier_class(architectures) -> str | None:
    """The sequence-classification class among config.json's `architectures` (`hybrid-lm finetune-classify` writes
    one), or None."""
    return next((name for name in architectures or [] if name.endswith("ForSequenceClassification")), None)
