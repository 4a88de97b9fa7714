"""`hybrid-lm push` against a loopback Hub stand-in, with the real huggingface_hub client in a subprocess.

Checks the exact file set of the commit, that a snapshot of it loads with trust_remote_code where the package
cannot be imported and generates what the original generates, and the one-line errors.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tests.hub_server import HubStandIn
from tests.isolation import REPO_ROOT, run_without_package
from tests.test_card import train_tiny_run
from training.card import GENERATED_MARKER
from training.hub import select_hub_files

PROMPT = "The "
NEW_TOKENS = 24
# Besides the tokenizer files: the Hub-ready set, and the two that go through LFS.
MODEL_FILES = {
    "README.md",
    "config.json",
    "configuration_hybrid_rnn_lm.py",
    "generation_config.json",
    "loss_curve.png",
    "model.safetensors",
    "modeling_hybrid_rnn_lm.py",
}
LFS_FILES = ["loss_curve.png", "model.safetensors"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("hub"))


def copy_with_clutter(run_folder: Path, destination: Path) -> Path:
    """The run plus what must never be pushed: a pickle beside the weights, a log, a stray script."""
    copy = Path(shutil.copytree(run_folder, destination))
    assert any(copy.glob("checkpoints/checkpoint-*/*.pkl")), "the run should hold accelerate checkpoints"
    torch.save({"weight": torch.zeros(2)}, copy / "pytorch_model.bin")
    (copy / "train.log").write_text("step 1 loss 4.5\n")
    (copy / "scratch.py").write_text("print('not part of the model')\n")
    return copy


@pytest.fixture
def folder(run_folder, tmp_path) -> Path:
    return copy_with_clutter(run_folder, tmp_path / "tiny-run")


@pytest.fixture
def hub():
    with HubStandIn() as server:
        yield server


@dataclass
class Pushed:
    hub: HubStandIn
    folder: Path
    env: dict[str, str]
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def pushed(run_folder, tmp_path_factory):
    """One `hybrid-lm push DIR --repo-id tiny-gru` (no namespace: the token's user) to a fresh stand-in."""
    workdir = tmp_path_factory.mktemp("pushed")
    folder = copy_with_clutter(run_folder, workdir / "tiny-run")
    with HubStandIn() as hub:
        env = hub.client_env(workdir / "hf-home")
        result = run_cli(["push", str(folder), "--repo-id", "tiny-gru"], env)
        assert result.returncode == 0, result.stderr[-3000:]
        yield Pushed(hub, folder, env, result)


def hub_file_set(folder: Path) -> set[str]:
    tokenizer = {p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens_map"))}
    assert "tokenizer.json" in tokenizer
    return MODEL_FILES | tokenizer


def client_env(env: dict[str, str]) -> dict[str, str]:
    """This environment without any Hub token of the machine, plus `env` (the stand-in's endpoint and token)."""
    base = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return {**base, **env}


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    # A fresh process: huggingface_hub reads HF_ENDPOINT once, at import.
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *args],
        cwd=REPO_ROOT,
        env=client_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(repo_id: str, revision: str, local_dir: Path, env: dict[str, str]) -> Path:
    code = "import sys; from huggingface_hub import snapshot_download; "
    code += "snapshot_download(sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3])"
    result = subprocess.run(
        [sys.executable, "-c", code, repo_id, revision, str(local_dir)],
        env=client_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return local_dir


def greedy(model, tokenizer) -> tuple[list[int], list[float]]:
    inputs = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = model(**inputs).logits[0, -1]
    return output[0].tolist(), logits.tolist()


def test_push_commits_exactly_the_hub_files_and_the_download_loads_without_the_package(pushed, tmp_path):
    hub, folder, env, result = pushed.hub, pushed.folder, pushed.env, pushed.result
    (commit,) = hub.commits
    expected = hub_file_set(folder)
    assert (commit.repo_id, commit.revision) == ("tester/tiny-gru", "main")
    assert set(commit.files) == expected
    assert commit.lfs_paths == LFS_FILES
    assert all(commit.files[name] == (folder / name).read_bytes() for name in expected)
    assert 'repo_id = "tester/tiny-gru"' in commit.files["README.md"].decode()
    assert commit.summary.startswith("Upload model trained with hybrid-lm (validation loss ")
    assert f"commit {commit.oid}" in result.stdout

    downloaded = snapshot("tester/tiny-gru", "main", tmp_path / "download", env)
    assert {p.name for p in downloaded.iterdir() if p.name != ".cache"} == expected | {".gitattributes"}

    code = f"""
    import json, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    path = {str(downloaded)!r}
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, use_safetensors=True).eval()
    inputs = tokenizer({PROMPT!r}, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens={NEW_TOKENS}, do_sample=False)
        logits = model(**inputs).logits[0, -1]
    print(json.dumps({{"module": type(model).__module__, "ids": output[0].tolist(), "logits": logits.tolist()}}))
    """
    remote = run_without_package(textwrap.dedent(code), cwd=tmp_path)
    assert remote["module"].startswith("transformers_modules.")  # the code came from the downloaded folder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same reduction order as the subprocess
    try:
        original = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        ids, logits = greedy(original, AutoTokenizer.from_pretrained(folder))
    finally:
        torch.set_num_threads(threads)
    assert remote["ids"] == ids and len(ids) > NEW_TOKENS
    torch.testing.assert_close(torch.tensor(remote["logits"]), torch.tensor(logits), atol=1e-5, rtol=1e-5)


def test_the_cards_snippet_runs_as_written_against_the_hub_at_a_pinned_commit(pushed, tmp_path):
    (commit,) = pushed.hub.commits
    readme = commit.files["README.md"].decode()
    snippet = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert 'revision = "main"' in snippet
    # The card asks users to pin a reviewed commit; the snippet must work once they do.
    snippet = snippet.replace('revision = "main"', f'revision = "{commit.oid}"')
    snippet = snippet.replace("max_new_tokens=200", "max_new_tokens=8")
    snippet += "import json\nprint(json.dumps({'module': type(model).__module__, 'length': len(output[0])}))\n"

    env = {**client_env(pushed.env), "HF_HOME": str(tmp_path / "fresh-cache"), "HF_HUB_OFFLINE": "0"}
    first_request = len(pushed.hub.requests)
    loaded = run_without_package(snippet, cwd=tmp_path, env=env)

    assert loaded["module"].startswith("transformers_modules.") and loaded["length"] > 8
    fetched = {path for method, path in pushed.hub.requests[first_request:] if method == "GET" and "/resolve/" in path}
    assert f"/tester/tiny-gru/resolve/{commit.oid}/modeling_hybrid_rnn_lm.py" in fetched


def test_a_pushed_classifier_has_a_classifiers_card_whose_snippet_classifies_as_the_local_model(
    run_folder, hub, tmp_path, capsys
):
    from transformers import AutoModelForSequenceClassification

    from tests.test_generate_cli import run_cli as run_in_process

    examples = tmp_path / "reviews.csv"
    examples.write_text(
        "text,label\n" + "".join(f"a good film {i},good\nsuch a bad film {i},bad\n" for i in range(20))
    )
    classifier = tmp_path / "tiny-classifier"
    arguments = [
        "--model",
        str(run_folder),
        "--train",
        str(examples),
        "--output-dir",
        str(classifier),
        "--epochs",
        "1",
    ]
    code, _, err = run_in_process(capsys, "finetune-classify", *arguments)
    assert code == 0, err
    env = hub.client_env(tmp_path / "hf-home")
    result = run_cli(["push", str(classifier), "--repo-id", "tester/tiny-classifier"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    (commit,) = hub.commits
    accuracy = json.loads((classifier / "results.json").read_text())["validation_accuracy"]
    assert commit.summary == f"Upload text classifier fine-tuned with hybrid-lm (validation accuracy {accuracy:.4f})"
    readme = commit.files["README.md"].decode()
    assert "pipeline_tag: text-classification" in readme and 'repo_id = "tester/tiny-classifier"' in readme
    assert {"results.json", "loss_curve.png"}.isdisjoint(commit.files) and "model.safetensors" in commit.files

    snippet = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    snippet = snippet.replace('revision = "main"', f'revision = "{commit.oid}"')
    code = "import contextlib, io, json\nprinted = io.StringIO()\nwith contextlib.redirect_stdout(printed):\n"
    code += "".join(f"    {line}\n" for line in snippet.splitlines())
    code += "print(json.dumps({'printed': printed.getvalue()}))\n"
    env = {**client_env(env), "HF_HOME": str(tmp_path / "fresh-cache"), "HF_HUB_OFFLINE": "0"}
    printed = run_without_package(code, cwd=tmp_path, env=env)["printed"]
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    example = json.loads(re.search(r"print\(classifier\((.*)\)\)", snippet).group(1))
    ids = AutoTokenizer.from_pretrained(classifier)(example, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        label = model.config.id2label[int(model(input_ids=ids).logits.argmax())]
    assert printed.startswith(f"[{{'label': '{label}', 'score': "), printed


def test_push_to_a_new_branch_of_a_private_repo_then_a_hand_edited_card_is_pushed_as_is(folder, hub, tmp_path):
    env = hub.client_env(tmp_path / "hf-home")
    args = ["push", str(folder), "--repo-id", "tester/tiny-gru", "--private", "--revision", "dev"]
    first = run_cli([*args, "--commit-message", "First dev build"], env)
    assert first.returncode == 0, first.stderr[-3000:]

    repo = hub.repos["tester/tiny-gru"]
    assert repo.private and set(repo.branches) == {"main", "dev"}
    (commit,) = hub.commits
    assert (commit.revision, commit.summary) == ("dev", "First dev build")
    assert set(hub.files_at("tester/tiny-gru", "dev")) == hub_file_set(folder) | {".gitattributes"}
    assert set(hub.files_at("tester/tiny-gru", "main")) == {".gitattributes"}
    assert 'revision = "dev"' in commit.files["README.md"].decode()

    # Without the generated-card line the card is the user's: pushed as it is, never re-rendered.
    edited = (folder / "README.md").read_text().replace(GENERATED_MARKER, "Hand-written notes.")
    (folder / "README.md").write_text(edited)
    second = run_cli([*args[:4], "--revision", "dev"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "kept the hand-edited README.md" in second.stdout
    assert [sorted(c.files) for c in hub.commits[1:]] == [["README.md"]]  # the other files did not change
    assert hub.commits[1].files["README.md"].decode() == edited


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def pickle_only_folder(run_folder, tmp_path) -> Path:
    folder = tmp_path / "pickle-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run_folder / name, folder / name)
    torch.save({"weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    return folder


ERROR_CASES = [
    ("not-logged-in", "error: not logged in to the Hugging Face Hub; run `hf auth login`", []),
    ("invalid-repo-id", "error: invalid repository id 'bad--name/x' (", []),
    ("pickle-only", "error: {folder} holds weights only as pickles (pytorch_model.bin)", []),
    ("no-weights", "error: {folder} has no model.safetensors; pass the output folder of `hybrid-lm train`", []),
    (
        "bad-card-metadata",
        'error: the Hub rejected the metadata of {folder}/README.md ("license" must be a string)',
        [("GET", "/api/whoami-v2"), ("POST", "/api/validate-yaml")],
    ),
    ("rejected-token", "error: the Hub rejected your token (", [("GET", "/api/whoami-v2")]),
    ("unreachable", "error: could not reach the Hub at http://127.0.0.1:", []),
    ("offline", "error: HF_HUB_OFFLINE is set, so huggingface_hub makes no network request and nothing can be", []),
]


@pytest.mark.parametrize(("case", "expected", "requests"), ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_push_errors_are_one_line_and_change_nothing(
    folder, pickle_only_folder, hub, tmp_path, case, expected, requests
):
    target, repo_id = folder, "tester/tiny-gru"
    env = hub.client_env(tmp_path / "hf-home")
    if case == "not-logged-in":
        env = hub.client_env(tmp_path / "hf-home", token=None)
    elif case == "invalid-repo-id":
        repo_id = "bad--name/x"
    elif case == "pickle-only":
        target = pickle_only_folder
    elif case == "no-weights":
        target = pickle_only_folder
        (target / "pytorch_model.bin").unlink()
    elif case == "bad-card-metadata":  # a hand-edited card (no generated line) with a list where a string goes
        card = (folder / "README.md").read_text().replace(GENERATED_MARKER, "")
        (folder / "README.md").write_text(card.replace("license: apache-2.0", "license: [apache-2.0, mit]"))
    elif case == "rejected-token":
        env["HF_TOKEN"] = "hf_not_the_right_token"
    elif case == "unreachable":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    elif case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    readme_before = (folder / "README.md").read_bytes()

    result = run_cli(["push", str(target), "--repo-id", repo_id], env)

    assert result.returncode == 2
    assert result.stderr.startswith(expected.format(folder=target)), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert hub.requests == requests and hub.repos == {} and hub.commits == []
    assert (folder / "README.md").read_bytes() == readme_before


def test_gpt2_baseline_folder_pushes_no_code(run_folder, tmp_path):
    GPT2LMHeadModel(GPT2Config(vocab_size=95, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        tmp_path
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run_folder / name, tmp_path / name)
    assert select_hub_files(tmp_path) == ["config.json", "generation_config.json", "model.safetensors"] + sorted(
        ["tokenizer.json", "tokenizer_config.json"]
    )


def test_no_code_in_the_packages_loads_pickles():
    # Weights are only ever read as safetensors; a pickle can run arbitrary code when loaded.
    forbidden = ("torch.load(", "pickle.load", "import pickle", "cloudpickle", "joblib", "import dill")
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: {needle}"
        for package in ("hybrid_rnn_lm", "training")
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        for needle in forbidden
        if needle in path.read_text(encoding="utf-8")
    ]
    assert offenders == []
