"""`hybrid-lm`: one command, one subcommand per task.

Each subcommand lives in its own module exposing `main(argv: list[str]) -> int`; modules are imported
lazily so that `hybrid-lm --help` stays fast and a missing optional dependency only affects its own
subcommand.
"""

import errno
import importlib
import os
import sys

# Errors of the file system rather than of the program: one line naming the path and the cause, no traceback.
# Each with the fix it calls for.
WRITE_ERRNOS = {
    errno.ENOSPC: "free space or pick a path on another disk",
    errno.EDQUOT: "free space or pick a path on another disk",
    errno.EROFS: "pick a writable path",
    errno.EACCES: "pick a writable path",
    errno.EPERM: "pick a writable path",
    errno.ENOTDIR: "a file stands where a folder should be: pick another path",
    errno.EISDIR: "a folder stands where a file should be: pick another path",
    errno.EEXIST: "a file stands where a folder should be: pick another path",
}

SUBCOMMANDS = {
    "train": ("training.train", "train a model (flags or one YAML file)"),
    "sweep": ("training.sweep", "run a study (a grid of training runs) and write its report"),
    "generate": ("training.generate", "generate text from a saved model"),
    "serve": ("training.serve", "serve a saved model over an OpenAI-compatible HTTP API (transformers serve)"),
    "eval": ("training.evaluation", "validation loss / perplexity / bits of a saved model on a corpus"),
    "inspect": ("training.inspect", "plot attention maps, hidden-state norms and recurrent state changes"),
    "finetune-classify": ("training.classify", "fine-tune a saved model for text classification"),
    "card": ("training.card", "(re)render the model card of an output folder"),
    "push": ("training.hub", "push an output folder to the Hugging Face Hub"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: hybrid-lm [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "Run `hybrid-lm <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("HYBRID_LM_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2

    from training.errors import UserError

    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        return int(module.main(rest) or 0)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # disk full, read-only or unwritable path, a file where a folder should be
        if debug or error.errno not in WRITE_ERRNOS:
            raise
        path = error.filename if error.filename is not None else "a file"
        # Training writes each checkpoint and the best model whole, then renames it into place.
        kept = " (files written before, earlier checkpoints and the best model included, are complete)"
        print(
            f"error: cannot write {path}: {error.strerror.lower()}; {WRITE_ERRNOS[error.errno]}"
            f"{kept if name in ('train', 'sweep') else ''}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
