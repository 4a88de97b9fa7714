"""Nothing lost, nothing unpickled: --overwrite-output-dir deletes only a previous run, checkpoints keep the loop
state as JSON, and model folders whose weights are pickles are refused by every command."""

import hashlib
import json
import pickle
from pathlib import Path

import pytest

from tests.test_generate_cli import save_tiny_model
from tests.test_train import single_thread, tiny_options  # noqa: F401
from training.arguments import arguments_from_dict
from training.checkpoints import PROGRESS_FILE, list_checkpoints
from training.cli import main as cli_main
from training.errors import UserError
from training.train import run_training

pytestmark = pytest.mark.usefixtures("single_thread")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class PlantedPickle:
    """Unpickling this object creates `marker`: what a hostile file does when a full unpickler loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(PlantedPickle(marker)))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()  # only what this command prints
    code = cli_main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("run") / "out"
    options = tiny_options(folder, max_steps=4, eval_steps=2, checkpoint_steps=2)
    run_training(*arguments_from_dict(options))
    return folder, options


# ------------------------------------------------------------------------------------------------------------
# --overwrite-output-dir
# ------------------------------------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_with_files_no_run_wrote_and_deletes_nothing(tmp_path, capsys):
    folder = tmp_path / "out"
    options = tiny_options(folder, max_steps=2, eval_steps=2)
    run_training(*arguments_from_dict(options))
    (folder / "thesis.tex").write_text("three years of work")
    (folder / "data").mkdir()
    (folder / "data" / "notes.txt").write_text("keep me")
    before = snapshot(folder)
    code, err = run_cli(capsys, "train", "--output-dir", str(folder), "--max-steps", "2", "--overwrite-output-dir")
    assert code == 2
    assert err.strip() == (
        f"error: --overwrite-output-dir: {folder} also holds files that no training run wrote (data, thesis.tex); "
        "nothing was deleted: move them elsewhere or choose another --output-dir"
    )
    assert snapshot(folder) == before


def test_overwrite_replaces_a_previous_run(tmp_path):
    folder = tmp_path / "out"
    options = tiny_options(folder, max_steps=4, eval_steps=2, checkpoint_steps=2)
    run_training(*arguments_from_dict(options))
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2", "checkpoint-4"]
    results = run_training(*arguments_from_dict({**options, "max_steps": 2, "overwrite_output_dir": True}))
    assert results["steps"] == 2
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2"]  # the old run's checkpoint-4 is gone


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("not a folder")
    code, err = run_cli(capsys, "train", "--output-dir", str(target), "--max-steps", "2")
    assert (
        code == 2
        and err.strip() == f"error: --output-dir {target} is a file, not a folder; choose another --output-dir"
    )
    assert target.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------------------------
# No pickles
# ------------------------------------------------------------------------------------------------------------


def test_checkpoints_keep_the_loop_state_as_json_and_resume_never_unpickles(finished_run, tmp_path):
    folder, options = finished_run
    checkpoint = list_checkpoints(folder)[-1]
    state = json.loads((checkpoint / PROGRESS_FILE).read_text())
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 4 * 32
    assert not list(checkpoint.glob("custom_checkpoint_*"))

    # A planted pickle where accelerate would look for a registered object's state is refused, never loaded.
    marker = tmp_path / "pwned"
    plant(checkpoint / "custom_checkpoint_0.pkl", marker)
    resume = arguments_from_dict({**options, "max_steps": 6, "resume_from_checkpoint": "latest"})
    with pytest.raises(UserError, match=r"holds custom_checkpoint_0\.pkl, a pickled object state .* delete it"):
        run_training(*resume)
    assert not marker.exists()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    assert run_training(*resume)["steps"] == 6


def test_a_checkpoint_without_its_loop_state_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "out"
    options = tiny_options(folder, max_steps=2, eval_steps=2, checkpoint_steps=2)
    run_training(*arguments_from_dict(options))
    checkpoint = list_checkpoints(folder)[-1]
    (checkpoint / PROGRESS_FILE).unlink()
    before = snapshot(folder)
    code, err = run_cli(
        capsys, "train", str(folder / "training_args.yaml"), "--max-steps", "4", "--resume-from-checkpoint", "latest"
    )
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {checkpoint} has no {PROGRESS_FILE}") and "never loaded" in line
    assert snapshot(folder) == before


def command_line(command: str, folder: Path, work: Path) -> list[str]:
    """A command that reads the model folder, with everything else it needs under `work` (a labelled CSV for
    finetune-classify is written there)."""
    (work / "train.csv").write_text("text,label\n" + "good,1\nbad,0\n" * 10)
    return {
        "generate": ["generate", "--model", str(folder), "--prompt", "a", "--max-new-tokens", "2"],
        "eval": ["eval", "--model", str(folder), "--dataset", "python-docs", "--output", str(work / "e.json")],
        "inspect": ["inspect", "--model", str(folder), "--text", "abc", "--output-dir", str(work / "inspect")],
        "card": ["card", str(folder)],
        "finetune-classify": [
            "finetune-classify",
            "--model",
            str(folder),
            "--train",
            str(work / "train.csv"),
            "--output-dir",
            str(work / "classifier"),
        ],
    }[command]


@pytest.mark.parametrize("command", ["generate", "eval", "inspect", "finetune-classify"])
def test_model_folders_with_only_pickled_weights_are_refused_and_never_loaded(tmp_path, capsys, command):
    folder = save_tiny_model(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    plant(folder / "pytorch_model.bin", marker)
    arguments = command_line(command, folder, tmp_path)
    code, err = run_cli(capsys, *arguments)
    assert code == 2
    assert err.strip() == (
        f"error: {folder} holds weights only as pickles (pytorch_model.bin), which are never loaded because loading "
        "a pickle can run arbitrary code; re-save the model as safetensors with `model.save_pretrained(folder)`"
    )
    assert not marker.exists()
    assert not (tmp_path / "inspect").exists() and not (tmp_path / "classifier").exists()


def test_a_pickle_beside_safetensors_weights_is_never_loaded(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model")
    marker = tmp_path / "pwned"
    plant(folder / "pytorch_model.bin", marker)
    code, _ = run_cli(capsys, "generate", "--model", str(folder), "--prompt", "a", "--max-new-tokens", "3")
    assert code == 0
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------
# Broken model folders
# ------------------------------------------------------------------------------------------------------------


def drop_tensor(weights: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    del tensors[name]
    save_file(tensors, weights, metadata={"format": "pt"})


def _break(folder: Path, how: str) -> str:
    """Damages a saved model folder as `how` says; returns the start of the error line expected."""
    config_file = folder / "config.json"
    weights = folder / "model.safetensors"
    if how == "no-config":
        config_file.unlink()
        return f"error: {folder} is not a saved model (no config.json there)"
    if how == "invalid-config":
        config_file.write_text('{"model_type": "hybrid_rnn_lm",')
        return f"error: {config_file} is not valid JSON"
    if how == "config-not-an-object":
        config_file.write_text("[]")
        return f"error: {config_file} names no model_type, so it is not a saved model's config"
    config = json.loads(config_file.read_text())
    if how == "other-model-type":
        config_file.write_text(json.dumps({"model_type": "bert", "vocab_size": 30}))
        return f"error: {config_file} describes a 'bert' model; these commands read hybrid_rnn_lm models"
    if how == "remote-code":
        config["auto_map"]["AutoModelForCausalLM"] = "someone/repo--evil.Model"
        config_file.write_text(json.dumps(config))
        return f"error: {config_file}: auto_map points to code this package does not ship (someone/repo--evil.Model)"
    if how == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:-1000])
        return f"error: {weights} is truncated ("
    if how == "corrupt-weights":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + weights.read_bytes()[24:])
        return f"error: {weights} is corrupt ("
    if how == "shape-mismatch":
        config["intermediate_size"] = 2 * config["intermediate_size"]
        config_file.write_text(json.dumps(config))
        return f"error: {folder}: the weights do not fit config.json ("
    if how == "missing-tensor":  # loading would give the model a random one in its place
        drop_tensor(weights, "model.layers.0.rnn.out_proj.bias")
        return f"error: {folder}: the saved weights lack 1 of the model's tensors ("
    if how == "tokenizer-too-large":
        from training.tokenization import build_tokenizer

        build_tokenizer("char", ["".join(map(chr, range(33, 400)))]).save_pretrained(folder)
        return f"error: {folder}: the tokenizer has "
    raise AssertionError(how)


BROKEN = [
    "no-config",
    "invalid-config",
    "config-not-an-object",
    "other-model-type",
    "remote-code",
    "truncated-weights",
    "corrupt-weights",
    "shape-mismatch",
    "missing-tensor",
    "tokenizer-too-large",
]


# card reads no weights and no tokenizer (shapes and vocabulary are not its concern) and reports a missing or
# invalid config.json itself (test_card.py): it checks the model type, auto_map and the weight files.
CARD_CHECKS = ("config-not-an-object", "other-model-type", "remote-code", "truncated-weights", "corrupt-weights")
COMMANDS = ("generate", "eval", "inspect", "finetune-classify")
CASES = [(how, command) for how in BROKEN for command in COMMANDS] + [(how, "card") for how in CARD_CHECKS]


@pytest.mark.parametrize(("how", "command"), CASES, ids=[f"{how}-{command}" for how, command in CASES])
def test_broken_model_folders_are_one_line_errors_that_write_nothing(tmp_path, capsys, how, command):
    folder = save_tiny_model(tmp_path / "model")
    arguments = command_line(command, folder, tmp_path)
    expected = _break(folder, how)
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, *arguments)
    assert code == 2, err
    [line] = [line for line in err.splitlines() if line.startswith("error")]
    assert line.startswith(expected), line
    assert "Traceback" not in err and snapshot(tmp_path) == before


def test_an_unfinished_run_folder_loads_with_a_warning(tmp_path, capsys, caplog):
    folder = save_tiny_model(tmp_path / "model")
    (folder / "metrics.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n')
    code, _ = run_cli(capsys, "generate", "--model", str(folder), "--prompt", "a", "--max-new-tokens", "2")
    assert code == 0
    assert any("unfinished training run (no results.json)" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------------------------------------
# Broken checkpoints
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated-weights", "corrupt-optimizer", "missing-optimizer"])
def test_a_broken_latest_checkpoint_names_the_previous_one_and_changes_nothing(tmp_path, capsys, damage):
    folder = tmp_path / "out"
    options = tiny_options(folder, max_steps=4, eval_steps=2, checkpoint_steps=2)
    run_training(*arguments_from_dict(options))
    latest = list_checkpoints(folder)[-1]
    if damage == "truncated-weights":
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        reason = f"{weights} is truncated ("
    elif damage == "corrupt-optimizer":
        optimizer = latest / "optimizer.bin"
        optimizer.write_bytes(optimizer.read_bytes()[: len(optimizer.read_bytes()) // 2])
        reason = f"{optimizer} is truncated or corrupt"
    else:
        (latest / "optimizer.bin").unlink()
        reason = f"{latest / 'optimizer.bin'} is missing"
    before = snapshot(folder)
    code, err = run_cli(
        capsys, "train", str(folder / "training_args.yaml"), "--max-steps", "6", "--resume-from-checkpoint", "latest"
    )
    assert code == 2
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith(f"error: checkpoint {latest} cannot be resumed: {reason}")
    assert line.endswith(
        f"resume from the previous checkpoint with --resume-from-checkpoint {folder / 'checkpoints' / 'checkpoint-2'}"
    )
    assert snapshot(folder) == before


def test_a_checkpoint_without_rng_state_resumes_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "out"
    options = tiny_options(folder, max_steps=4, eval_steps=2, checkpoint_steps=2)
    run_training(*arguments_from_dict(options))
    for state in list_checkpoints(folder)[-1].glob("random_states_*.pkl"):
        state.unlink()
    resumed = run_training(*arguments_from_dict({**options, "max_steps": 6, "resume_from_checkpoint": "latest"}))
    assert resumed["steps"] == 6
    assert any("has no random_states_*.pkl" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------------------------------------
# Resume with changed options
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "listed"),
    [
        (["--block-size", "16"], "block_size 32 -> 16"),
        (["--batch-size", "8"], "batch_size 4 -> 8"),
        (["--rnn-type", "lstm"], "rnn_type 'gru' -> 'lstm'"),
        (["--dataset", "other.txt"], "dataset 'python-docs' -> 'other.txt'"),
        (["--seed", "7"], "seed 1337 -> 7"),
    ],
    ids=["block-size", "batch-size", "model", "data", "seed"],
)
def test_resume_refuses_options_that_shape_the_run(finished_run, tmp_path, capsys, flags, listed):
    folder, _ = finished_run
    (tmp_path / "other.txt").write_text("some other text " * 200)
    before = snapshot(folder)
    code, err = run_cli(
        capsys, "train", str(folder / "training_args.yaml"), "--resume-from-checkpoint", "latest", *flags
    )
    assert code == 2
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith(f"error: --resume-from-checkpoint: {listed} would change the run being resumed")
    assert snapshot(folder) == before


def test_resume_allows_and_records_steps_cadence_and_learning_rate_changes(tmp_path):
    folder = tmp_path / "out"
    options = tiny_options(folder, max_steps=4, eval_steps=2, checkpoint_steps=2)
    run_training(*arguments_from_dict(options))
    changed = {"max_steps": 6, "eval_steps": 3, "learning_rate": 1e-3}
    results = run_training(*arguments_from_dict({**options, **changed, "resume_from_checkpoint": "latest"}))
    assert results["steps"] == 6
    assert results["resumes"] == [
        {"step": 4, "changed": {"learning_rate": [0.003, 0.001], "max_steps": [4, 6], "eval_steps": [2, 3]}}
    ]
    saved = (folder / "training_args.yaml").read_text()
    assert "max_steps: 6" in saved and "eval_steps: 3" in saved  # the arguments of what ran last


# ------------------------------------------------------------------------------------------------------------
# Unwritable paths, full disks
# ------------------------------------------------------------------------------------------------------------


def test_an_output_dir_below_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(capsys, "train", "--output-dir", str(tmp_path / "afile" / "run"), "--max-steps", "2")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: --output-dir {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file, not a folder; "
        "choose another --output-dir"
    )


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_earlier_files(tmp_path, capsys, monkeypatch):
    import errno

    from safetensors.torch import load_file

    import training.train

    folder = tmp_path / "out"
    options = tiny_options(folder, max_steps=8, eval_steps=2, checkpoint_steps=2)
    original, saves = training.train.save_checkpoint, []

    def save_until_the_disk_is_full(accelerator, output_dir, step, *args, **kwargs):
        saves.append(step)
        if step == 4:
            raise OSError(
                errno.ENOSPC, "No space left on device", str(output_dir / "checkpoints" / ".tmp-checkpoint-4")
            )
        return original(accelerator, output_dir, step, *args, **kwargs)

    monkeypatch.setattr(training.train, "save_checkpoint", save_until_the_disk_is_full)
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    code, err = run_cli(capsys, "train", *flags)
    assert code == 1
    [line] = [line for line in err.splitlines() if line.startswith("error")]  # on its own line, after the bar
    assert line == (
        f"error: cannot write {folder / 'checkpoints' / '.tmp-checkpoint-4'}: no space left on device; free space "
        "or pick a path on another disk (files written before, earlier checkpoints and the best model included, are "
        "complete)"
    )
    assert "Traceback" not in err
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2"]
    load_file(folder / "checkpoints" / "checkpoint-2" / "model.safetensors")  # complete and readable
    load_file(folder / "model.safetensors")  # the best model so far


def test_a_full_disk_outside_training_is_one_line_without_the_checkpoint_note(tmp_path, capsys, monkeypatch):
    """Only training writes checkpoints: another command's write error does not speak of them."""
    import errno

    import training.inspect

    def full_disk(argv):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "attention.png"))

    monkeypatch.setattr(training.inspect, "main", full_disk)
    code, err = run_cli(capsys, "inspect", "--model", "m", "--text", "x", "--output-dir", str(tmp_path / "o"))
    assert code == 1
    assert err.strip() == (
        f"error: cannot write {tmp_path / 'o' / 'attention.png'}: no space left on device; free space or pick a "
        "path on another disk"
    )


def test_a_cache_dir_below_a_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    output_dir, cache_dir = tmp_path / "out", tmp_path / "afile" / "blocks"
    code, err = run_cli(capsys, "train", "--output-dir", str(output_dir), "--cache-dir", str(cache_dir))
    assert code == 1 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error")]
    assert line.startswith(
        f"error: cannot write {cache_dir}: not a directory; a file stands where a folder should be: pick another path"
    )
    assert snapshot(tmp_path) == before
