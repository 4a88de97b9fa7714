"""Checkpoints and resume: a run killed with SIGKILL and resumed from `latest` equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import (  # noqa: F401 (single_thread: a fixture)
    REPO_ROOT,
    as_flags,
    documents_folder,
    real_text_file,
    single_thread,
    tiny_options,
)
from training.arguments import arguments_from_dict
from training.checkpoints import list_checkpoints, resolve_checkpoint
from training.errors import UserError
from training.plots import read_metrics
from training.train import run_training

# Dropout, gradient accumulation and a corpus small enough that the run crosses epoch boundaries: every source
# of randomness and every data-position counter a resume has to restore.
RESUME_OPTIONS = {
    "max_steps": 64,  # far past the kill at step 13, even when the machine is slow to notice it
    "eval_steps": 16,
    "checkpoint_steps": 4,
    "checkpoint_limit": 3,
    "log_steps": 3,  # a log line averages steps from both sides of a checkpoint
    "gradient_accumulation_steps": 2,
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
}


def comparable(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without what the wall clock measures (throughput, training time)."""
    return [{k: v for k, v in row.items() if k not in ("tokens_per_second", "train_seconds")} for row in rows]


def assert_same_weights(file_a: Path, file_b: Path) -> None:
    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def start_training(options: dict, cwd: Path) -> subprocess.Popen:
    # Same intra-op thread count as this process, so that float reductions run in the same order on both sides.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "training.cli", "train", *as_flags(options)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(process: subprocess.Popen, metrics: Path, step: int, timeout: float = 120) -> int:
    """Polls metrics.jsonl until a training row reaches `step`; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training exited early:\n{process.communicate()[1][-3000:]}"
        if metrics.is_file():
            lines = [line for line in metrics.read_text().splitlines() if line.endswith("}")]
            steps = [json.loads(line)["step"] for line in lines if "train_loss" in line]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no training step {step} within {timeout} s")


@pytest.mark.xdist_group("resume-kill")
@pytest.mark.parametrize(
    ("stop", "variant"),
    [
        (signal.SIGKILL, None),
        (signal.SIGTERM, None),
        (signal.SIGKILL, "carry-state"),
        (signal.SIGKILL, "carry-state-streams"),
        (signal.SIGKILL, "streaming"),
        (signal.SIGKILL, "streaming-carry-state"),
    ],
    ids=[
        "SIGKILL",
        "SIGTERM",
        "SIGKILL-carry-state",
        "SIGKILL-carry-state-streams",
        "SIGKILL-streaming",
        "SIGKILL-streaming-carry-state",
    ],
)
def test_stopped_run_resumed_from_latest_equals_an_uninterrupted_run(tmp_path, stop, variant):
    """SIGKILL: no handler, no cleanup, the process just stops. SIGTERM (what schedulers send): a checkpoint after
    the current step, the resume command, exit 143. With --carry-state the recurrent state carried into the next
    step is part of the checkpoint (the corpus is a folder of many documents: the state also resets at each EOS),
    with --carry-state-streams the states of every sub-stream and the order they are read in;
    with --streaming the data position is replayed from the stream (shuffle buffer included)."""
    corpus = real_text_file(tmp_path / "data", 2500)  # 17 batches per epoch: 128 micro-batches cross 7 epochs
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    options = tiny_options(straight_dir, dataset=str(corpus), **RESUME_OPTIONS)
    if variant is not None:  # 24 documents, ~270 training blocks: the 128 micro-batches cross epochs
        folder = documents_folder(tmp_path / "documents", 24, 400)
        options.update(dataset=str(folder), carry_state=variant.endswith("carry-state"))
    if variant == "carry-state-streams":  # every row continues a randomly drawn one of its 3 sub-streams
        options.update(carry_state=True, carry_state_streams=3)
    elif variant is not None and variant.startswith("streaming"):  # read lazily, the streams cross epochs
        options.update(streaming=True)
    run_training(*arguments_from_dict(options))

    killed_options = {**options, "output_dir": str(killed_dir)}
    process = start_training(killed_options, tmp_path)
    seen = wait_for_step(process, killed_dir / "metrics.jsonl", 13)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    latest = resolve_checkpoint("latest", killed_dir)
    if stop == signal.SIGTERM:
        assert process.returncode == 143
        [line] = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
        assert f"interrupted at step {latest.name.split('-')[1]} (SIGTERM)" in line
        assert "--resume-from-checkpoint latest" in line
    assert 12 <= int(latest.name.split("-")[1]) < 64, (seen, latest)
    assert not (killed_dir / "results.json").exists()

    resumed = run_training(*arguments_from_dict({**killed_options, "resume_from_checkpoint": "latest"}))

    straight_rows = read_metrics(straight_dir / "metrics.jsonl")
    assert comparable(read_metrics(killed_dir / "metrics.jsonl")) == comparable(straight_rows)
    assert_same_weights(straight_dir / "model.safetensors", killed_dir / "model.safetensors")
    final = "checkpoints/checkpoint-64/model.safetensors"
    assert_same_weights(straight_dir / final, killed_dir / final)
    straight_results = json.loads((straight_dir / "results.json").read_text())
    assert resumed["best_val_loss"] == straight_results["best_val_loss"]
    assert resumed["train_tokens"] == straight_results["train_tokens"]


def test_latest_ignores_a_checkpoint_whose_save_was_killed(tmp_path):
    options = tiny_options(tmp_path / "out", max_steps=4, eval_steps=4, checkpoint_steps=2)
    run_training(*arguments_from_dict(options))
    root = tmp_path / "out" / "checkpoints"
    # What a kill during the save of step 6 leaves: a temporary folder with part of the files.
    half = root / ".tmp-checkpoint-6"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    assert resolve_checkpoint("latest", tmp_path / "out") == root / "checkpoint-4"

    results = run_training(*arguments_from_dict({**options, "max_steps": 6, "resume_from_checkpoint": "latest"}))
    assert results["steps"] == 6
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-4", "checkpoint-6"]
    assert not half.exists()
    load_file(root / "checkpoint-6" / "model.safetensors")  # complete and readable


def test_resume_with_a_different_model_size_names_the_arguments_file(tmp_path):
    options = tiny_options(tmp_path / "out", max_steps=2, eval_steps=2)
    run_training(*arguments_from_dict(options))
    with pytest.raises(
        UserError, match=r"hidden_size 32 -> 64 would change the run being resumed.*training_args\.yaml"
    ):
        run_training(*arguments_from_dict({**options, "hidden_size": 64, "resume_from_checkpoint": "latest"}))


def test_resume_without_checkpoints_is_a_user_error(tmp_path):
    options = tiny_options(tmp_path / "empty", max_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(UserError, match="no checkpoint in .*start a new run without --resume-from-checkpoint"):
        run_training(*arguments_from_dict(options))
    assert not (tmp_path / "empty").exists()


def flatten_like_cudnn(rnn: torch.nn.RNNBase) -> None:
    """What `flatten_parameters` does to a GRU / LSTM / RNN on a GPU: every weight becomes a view into one buffer."""
    weights = [getattr(rnn, name) for name in rnn._flat_weights_names]
    flat = torch.cat([weight.detach().reshape(-1) for weight in weights])
    offset = 0
    for weight in weights:
        weight.data = flat[offset : offset + weight.numel()].view_as(weight)
        offset += weight.numel()


def test_checkpoint_of_weights_in_one_buffer_loads_back_in_place(tmp_path):
    """cuDNN keeps a recurrent layer's weights as views into one buffer, which accelerate's own loading (safetensors'
    load_model) refuses: a run on a GPU could save checkpoints but never resume from them. The trainer's Accelerator
    loads the model itself, into the parameters where they are."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from hybrid_rnn_lm import HybridRnnLmForCausalLM
    from tests.test_modeling import tiny_config
    from training.train import build_accelerator

    def prepared(accelerator):
        torch.manual_seed(0)
        model = HybridRnnLmForCausalLM(tiny_config("gru", "every-2nd", num_hidden_layers=2))
        for layer in model.model.layers:
            flatten_like_cudnn(layer.rnn.rnn)
        optimizer = torch.optim.AdamW(model.parameters())
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, optimizer

    accelerator, _ = build_accelerator(arguments_from_dict(tiny_options(tmp_path / "run"))[2])
    model, _ = prepared(accelerator)  # on a GPU, prepare() moves the model there and cuDNN flattens it again

    def recurrent_storages():
        return [{p.untyped_storage().data_ptr() for p in layer.rnn.rnn.parameters()} for layer in model.model.layers]

    storages = recurrent_storages()
    assert all(len(pointers) == 1 for pointers in storages)  # each layer's weights: views into one buffer
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    accelerator.save_state(str(tmp_path / "checkpoint"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    accelerator.load_state(str(tmp_path / "checkpoint"))
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name
    assert recurrent_storages() == storages  # loaded in place: still views into the same buffers

    # accelerate alone fails on the same checkpoint: the case above is the one a GPU run meets.
    AcceleratorState._reset_state(reset_partial_state=False)
    plain = Accelerator()
    prepared(plain)
    with pytest.raises(RuntimeError, match="None is covering the entire storage"):
        plain.load_state(str(tmp_path / "checkpoint"))
