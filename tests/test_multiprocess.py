"""Two CPU processes under a real `accelerate launch`: sharded data, one saved model, a misconfigured launch."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_train import REPO_ROOT, as_flags, documents_folder, tiny_options
from training.plots import read_metrics

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"

# What each process runs: the same run_training as `hybrid-lm train`, recording the batches it trained on.
DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from accelerate import PartialState

    from training.arguments import arguments_from_dict
    from training.train import run_training

    options, record_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
    batches = []
    results = run_training(*arguments_from_dict(options), on_batch=lambda step, ids: batches.append(ids.tolist()))
    rank = PartialState().process_index
    record = {"batches": batches, "num_processes": results["num_processes"]}
    (record_dir / f"rank-{rank}.json").write_text(json.dumps(record))
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], cwd: Path, use_cpu: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    command = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args,
    ]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.xdist_group("accelerate-launch")
def test_two_cpu_processes_train_on_different_batches_and_save_one_model(tmp_path):
    output_dir = tmp_path / "run"
    options = tiny_options(output_dir, max_steps=6, eval_steps=3, checkpoint_steps=3, sample_tokens=10)
    (tmp_path / "driver.py").write_text(DRIVER)
    result = launch(["driver.py", json.dumps(options), str(tmp_path)], cwd=tmp_path, use_cpu=True)
    assert result.returncode == 0, result.stderr[-4000:]

    records = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["num_processes"] for record in records] == [2, 2]
    seen = [{tuple(row) for batch in record["batches"] for row in batch} for record in records]
    assert all(len(record["batches"]) == 6 for record in records)
    assert len(seen[0]) == len(seen[1]) == 6 * options["batch_size"]
    assert not seen[0] & seen[1], "both processes trained on the same blocks"

    # One model, written once, by the main process; the metrics file is not written twice.
    assert len(list(output_dir.rglob("config.json"))) == 1
    assert sorted(p.name for p in output_dir.glob("*.safetensors")) == ["model.safetensors"]
    checkpoint = output_dir / "checkpoints" / "checkpoint-6"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["num_processes"] == 2
    assert results["train_tokens"] == 6 * 2 * options["batch_size"] * options["block_size"]
    train_steps = [row["step"] for row in read_metrics(output_dir / "metrics.jsonl") if "train_loss" in row]
    assert train_steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.xdist_group("accelerate-launch")
def test_a_launch_that_silently_gives_single_processes_fails_loudly(tmp_path):
    # Without ACCELERATE_USE_CPU, `--multi_gpu` on a machine without GPUs starts independent single processes.
    output_dir = tmp_path / "run"
    args = ["-m", "training.train", *as_flags(tiny_options(output_dir, max_steps=2))]
    result = launch(args, cwd=tmp_path, use_cpu=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("WORLD_SIZE=2 but this process trains alone" in line for line in errors)
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu" in errors[0]
    assert not output_dir.exists()


@pytest.mark.xdist_group("accelerate-launch")
def test_two_processes_carry_state_on_disjoint_contiguous_streams(tmp_path):
    """--carry-state under DDP: process p owns rows p * B .. p * B + B - 1 of the global batch; row r reads blocks
    r * L, r * L + 1, ...; each process checkpoints its own carried state; streamed evaluation pools both."""
    import numpy as np

    from training.data import load_corpus, split_token_stream, tokenize_corpus
    from training.tokenization import build_tokenizer

    folder = documents_folder(tmp_path / "documents", 40, 500)  # an EOS resets the state within the run
    output_dir = tmp_path / "run"
    options = tiny_options(
        output_dir, dataset=str(folder), max_steps=6, eval_steps=3, checkpoint_steps=3, carry_state=True
    )
    (tmp_path / "driver.py").write_text(DRIVER)
    result = launch(["driver.py", json.dumps(options), str(tmp_path)], cwd=tmp_path, use_cpu=True)
    assert result.returncode == 0, result.stderr[-4000:]

    tokenizer = build_tokenizer(str(output_dir))
    corpus = load_corpus(str(folder))
    blocks = np.asarray(tokenize_corpus(corpus, tokenizer, options["block_size"])["train"]["input_ids"])
    rows = options["batch_size"]
    length = len(blocks) // (2 * rows)
    for rank in (0, 1):
        batches = json.loads((tmp_path / f"rank-{rank}.json").read_text())["batches"]
        assert len(batches) == 6
        for step, batch in enumerate(batches):
            expected = blocks[(rank * rows + np.arange(rows)) * length + step]
            assert np.array_equal(np.asarray(batch), expected), (rank, step)
    checkpoint = output_dir / "checkpoints" / "checkpoint-6"
    assert sorted(p.name for p in checkpoint.glob("carried_state-*")) == [
        "carried_state-0.safetensors",
        "carried_state-1.safetensors",
    ]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["full_validation"]["stream"]["tokens"] == len(split_token_stream(corpus["validation"], tokenizer))


@pytest.mark.xdist_group("accelerate-launch")
def test_two_processes_stream_disjoint_shares_of_a_streamed_corpus(tmp_path):
    """--streaming under DDP: split_dataset_by_node gives each process its own share of the stream."""
    folder = documents_folder(tmp_path / "documents", 40, 500)
    output_dir = tmp_path / "run"
    options = tiny_options(output_dir, dataset=str(folder), streaming=True, max_steps=6, eval_steps=3)
    (tmp_path / "driver.py").write_text(DRIVER)
    result = launch(["driver.py", json.dumps(options), str(tmp_path)], cwd=tmp_path, use_cpu=True)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    seen = [{tuple(row) for batch in record["batches"] for row in batch} for record in records]
    assert all(len(record["batches"]) == 6 for record in records)
    assert len(seen[0]) == len(seen[1]) == 6 * options["batch_size"]
    assert not seen[0] & seen[1], "both processes trained on the same blocks"
