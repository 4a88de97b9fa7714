"""`hybrid-lm push`: publish a training output folder to the Hugging Face Hub as one commit.

The commit holds exactly the files a user needs to load and understand the model: safetensors weights,
`config.json` (with `auto_map`), the modeling code it names, `generation_config.json`, the tokenizer files, the
`README.md` model card and `loss_curve.png`. Everything else in the folder (accelerate checkpoints with their
optimizer pickles, logs, metrics) stays local. Weights that exist only as pickles (`pytorch_model.bin`, `.pt`)
are refused: loading a pickle can run arbitrary code.

All checks that need no network run first, so a bad folder or repository id fails before anything is created
on the Hub.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from training.card import (
    GENERATED_MARKER,
    OneLineArgumentParser,
    is_generated,
    read_run,
    validate_hub_repo_id,
    write_card,
)
from training.errors import UserError
from training.model_files import weight_files

MODEL_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
CARD_FILES = ("README.md", "loss_curve.png")
LOGIN_HINT = "run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN to a token with write access"


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    files: list[str]
    card_rendered: bool


# ---- what goes into the commit -------------------------------------------------------------------------------


def select_hub_files(folder: str | Path) -> list[str]:
    """The names (relative to `folder`) of the files a push uploads, README.md included; sorted."""
    folder = Path(folder)
    run = read_run(folder)  # checks the folder and config.json
    files = [*weight_files(folder, refusal="never pushed"), *_remote_code_files(folder, run.config)]
    files += [name for name in MODEL_FILES + TOKENIZER_FILES + CARD_FILES if (folder / name).is_file()]
    if not any(name in files for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(
            f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json), so the pushed model could "
            "not be used; save the tokenizer into the folder with `tokenizer.save_pretrained(folder)`"
        )
    return sorted(set(files))


def _remote_code_files(folder: Path, config: dict) -> list[str]:
    """The `.py` files `auto_map` names, plus the siblings they import, exactly as transformers resolves them."""
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        from transformers import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise UserError(
                f"{folder / 'config.json'} has no auto_map for the custom model type {config.get('model_type')!r}, "
                "so the pushed model could not be loaded; save it with the package imported (`import hybrid_rnn_lm`)"
            )
        return []
    from transformers.dynamic_module_utils import get_relative_import_files

    references = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value])]
    modules = {ref.split("--")[-1].split(".")[0] for ref in references if ref}
    files = set()
    for module in sorted(modules):
        path = folder / f"{module}.py"
        if not path.is_file():
            raise UserError(
                f"{folder} lacks {path.name}, the modeling code config.json's auto_map names; "
                "save the model again with `save_pretrained`"
            )
        files.add(path.name)
        files.update(Path(dependency).name for dependency in get_relative_import_files(str(path)))
    return sorted(files)


# ---- talking to the Hub ----------------------------------------------------------------------------------------


@contextmanager
def hub_errors(endpoint: str, repo_id: str) -> Iterator[None]:
    """Turns what the Hub client raises into one-line `UserError`s that say what to do."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RevisionNotFoundError as error:
        raise UserError(f"{repo_id} has no such revision ({_server_message(error)}); check --revision") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"repository {repo_id} was not found on {endpoint} or your token cannot see it; check --repo-id "
            f"and {LOGIN_HINT}"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        message = _server_message(error)
        if status == 401:
            raise UserError(f"the Hub rejected your token ({message}); {LOGIN_HINT}") from None
        if status == 403:
            raise UserError(
                f"your token may not write to {repo_id} ({message}); use a namespace you own or a token "
                "with write access"
            ) from None
        raise UserError(
            f"the Hub refused the push (HTTP {status}: {message}); try again or check {endpoint}"
        ) from None
    except HTTPError as error:  # the connection itself failed: no HTTP status
        raise UserError(
            f"could not reach the Hub at {endpoint} ({type(error).__name__}: {_one_line(str(error))}); "
            "check your network connection, proxy settings or HF_ENDPOINT"
        ) from None
    except ValueError as error:
        if "Invalid metadata in README.md" not in str(error):
            raise
        raise UserError(
            f"the Hub rejected the model card's metadata ({_one_line(str(error))}); fix README.md or re-render "
            "it with `hybrid-lm card`"
        ) from None


def _server_message(error) -> str:
    message = getattr(error, "server_message", None) or str(error)
    return _one_line(message)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:300]


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Pushes a training output folder to `repo_id` as one commit on `revision` (default: main).

    The repository is created if needed (`private` applies only then) and so is the branch. A missing card is
    rendered first, and so is a generated one (it then names `repo_id`); a hand-edited card is pushed as is.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    folder = Path(folder)
    validate_hub_repo_id(repo_id)
    select_hub_files(folder)  # every local refusal happens before the network is touched
    if constants.is_offline_mode() or _true(os.environ.get("HF_HUB_OFFLINE")):
        raise UserError(
            "HF_HUB_OFFLINE is set, so huggingface_hub makes no network request and nothing can be pushed; unset it "
            "(or set HF_HUB_OFFLINE=0) to push"
        )
    token = token or get_token()
    if not token:
        raise UserError(f"not logged in to the Hugging Face Hub; {LOGIN_HINT}")
    api = HfApi(token=token)
    endpoint = api.endpoint or constants.ENDPOINT
    branch = revision or constants.DEFAULT_REVISION
    with hub_errors(endpoint, repo_id):
        user = api.whoami()["name"]
        full_repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
        readme = folder / "README.md"
        card_rendered = not readme.is_file() or is_generated(readme)
        if card_rendered:
            write_card(folder, repo_id=full_repo_id, revision=branch)
        check_card_metadata(readme)
        files = select_hub_files(folder)
        full_repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(full_repo_id, branch=branch, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
        info = api.create_commit(
            full_repo_id,
            operations,
            commit_message=commit_message or _default_commit_message(folder),
            revision=branch,
        )
    return PushResult(full_repo_id, branch, info.oid, info.commit_url, files, card_rendered)


def check_card_metadata(readme: Path) -> None:
    """Has the Hub validate the card's YAML before anything is created: the commit would be refused later."""
    from huggingface_hub import ModelCard

    try:
        ModelCard.load(readme).validate()
    except ValueError as error:
        try:  # the Hub answers {"errors": [{"message": ...}]}
            messages = "; ".join(e["message"] for e in json.loads(str(error))["errors"])
        except (ValueError, KeyError, TypeError):
            messages = str(error)
        raise UserError(
            f"the Hub rejected the metadata of {readme} ({_one_line(messages)}); fix its YAML header or delete the "
            "file so that `hybrid-lm push` renders a new card"
        ) from None


def _default_commit_message(folder: Path) -> str:
    results = read_run(folder).results or {}
    if results.get("validation_accuracy") is not None:  # a finetune-classify folder
        return f"Upload text classifier fine-tuned with hybrid-lm (validation accuracy {results['validation_accuracy']:.4f})"
    if results.get("best_val_loss") is not None:
        return f"Upload model trained with hybrid-lm (validation loss {results['best_val_loss']:.4f})"
    return "Upload model trained with hybrid-lm"


def main(argv: list[str]) -> int:
    parser = OneLineArgumentParser(
        prog="hybrid-lm push",
        description=(
            "Push a training output folder to the Hugging Face Hub as one commit: safetensors weights, config, "
            "modeling code, generation config, tokenizer, model card and loss curve (never checkpoints, logs "
            "or pickles). Authenticate with `hf auth login` or HF_TOKEN."
        ),
    )
    parser.add_argument("folder", help="output folder of `hybrid-lm train` or `hybrid-lm finetune-classify`")
    parser.add_argument("--repo-id", required=True, help="'namespace/name' (or 'name' for your own namespace)")
    parser.add_argument("--private", action="store_true", help="create the repository private (new ones only)")
    parser.add_argument("--revision", help="branch to commit to, created if missing (default: main)")
    parser.add_argument("--commit-message", help="commit summary (default: names the validation loss)")
    args = parser.parse_args(argv)
    result = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    if result.card_rendered:
        print(f"rendered the model card for {result.repo_id}")
    else:
        print(f"kept the hand-edited README.md (it lacks the line {GENERATED_MARKER[:40]}...)")
    print(f"pushed {len(result.files)} files to {result.repo_id}@{result.revision}: commit {result.commit_oid}")
    for name in result.files:
        print(f"  {name}")
    print(result.commit_url)
    return 0
