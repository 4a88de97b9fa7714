"""What goes wrong: a diverging loss, Ctrl-C, bad arguments. One-line errors, exit codes, nothing half-written."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_hardening import snapshot
from tests.test_train import REPO_ROOT, as_flags, single_thread, tiny_options  # noqa: F401
from training.arguments import arguments_from_dict
from training.checkpoints import list_checkpoints
from training.cli import main as cli_main
from training.plots import read_metrics
from training.train import run_training


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error")]


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    options = tiny_options(tmp_path / "out", max_steps=4, eval_steps=4, checkpoint_steps=2, lr_scheduler="constant")
    run_training(*arguments_from_dict(options))
    good = load_file(tmp_path / "out" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    capsys.readouterr()

    # Resumed with an absurd learning rate: one step blows the weights up, the next loss is not finite.
    diverging = {**options, "max_steps": 50, "checkpoint_steps": 100, "learning_rate": 1e6, "max_grad_norm": 0}
    code = cli_main(["train", *as_flags(diverging), "--resume-from-checkpoint", "latest"])

    assert code == 1
    [message] = error_lines(capsys.readouterr().err)
    assert "(not finite)" in message and "no checkpoint was written after it" in message
    assert str(tmp_path / "out" / "checkpoints" / "checkpoint-4") in message and "--learning-rate" in message
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-2", "checkpoint-4"]
    kept = load_file(tmp_path / "out" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(kept[name], good[name]) for name in good)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["stopped_reason"] == "non_finite_loss"
    assert all(
        math.isfinite(row["train_loss"])
        for row in read_metrics(tmp_path / "out" / "metrics.jsonl")
        if "train_loss" in row
    )
    best = load_file(tmp_path / "out" / "model.safetensors")  # the best model, from before the divergence
    assert all(torch.isfinite(tensor).all() for tensor in best.values())


@pytest.mark.xdist_group("resume-kill")
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    output_dir = tmp_path / "out"
    options = tiny_options(
        output_dir, max_steps=100_000, eval_steps=1000, checkpoint_steps=1000, lr_scheduler="constant"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "train", *as_flags(options)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while (
        not (output_dir / "metrics.jsonl").is_file() or "train_loss" not in (output_dir / "metrics.jsonl").read_text()
    ):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130
    [line] = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
    step = int(line.split()[3].rstrip(":"))
    assert "--resume-from-checkpoint latest" in line
    assert [p.name for p in list_checkpoints(output_dir)] == [f"checkpoint-{step}"]
    assert not (output_dir / "results.json").exists()

    resumed = run_training(
        *arguments_from_dict({**options, "max_steps": step + 2, "resume_from_checkpoint": "latest"})
    )
    assert resumed["steps"] == step + 2 and resumed["stopped_reason"] == "max_steps"


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only where there is no CUDA GPU")


BAD_ARGUMENTS = {
    "unknown-flag": (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag 1"),
    "not-a-number": (["--max-steps", "many"], "invalid int value: 'many'"),
    "bad-choice": (["--rnn-type", "transformer"], "invalid choice: 'transformer'"),
    "block-size-1": (["--block-size", "1"], "--block-size 1 leaves nothing to predict"),
    "steps-and-epochs": (["--max-steps", "5", "--epochs", "1"], "pass only one of them"),
    "heads-do-not-divide": (["--hidden-size", "32", "--num-attention-heads", "3"], "does not divide --hidden-size 32"),
    "attention-layer-out-of-range": (
        ["--attention-layers", "0,9"],
        "--attention-layers 0,9 names block(s) 9, but --num-hidden-layers 3 has blocks 0..2; name blocks in that range",
    ),
    "fewer-blocks-than-the-default-attention-spacing": (
        ["--num-hidden-layers", "1"],
        "--attention-layers 2 (every 2nd block) needs at least 2 blocks, but --num-hidden-layers is 1; pass a smaller "
        "--attention-layers (1 = every block, none = no attention) or more layers",
    ),
    "attention-spacing-zero": (
        ["--attention-layers", "0"],
        "--attention-layers 0: a number k means every k-th block and must be >= 1; for block 0 alone write '0,'",
    ),
    "unknown-activation": (
        ["--hidden-act", "swiglu"],
        "--hidden-act 'swiglu' is not an activation transformers knows",
    ),
    "unknown-scheduler": (["--lr-scheduler", "sawtooth"], "'sawtooth' is not known; choose one of: linear"),
    "unknown-tracker": (["--report-to", "carrier-pigeon"], "not a tracker accelerate knows"),
    "missing-dataset": (["--dataset", "missing/corpus.txt"], "does not exist"),
    "missing-tokenizer": (["--tokenizer", "no-such-tokenizer"], "unknown tokenizer 'no-such-tokenizer'"),
    "missing-model-config": (["--model-config", "nowhere"], "no config.json there"),
    "model-too-large": (
        ["--hidden-size", "65536", "--intermediate-size", "262144", "--num-hidden-layers", "4"],
        "parameters, whose training state needs about 4673.3 GB, more than the",
    ),
    "negative-weight-decay": (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    "learning-rate-nan": (["--learning-rate", "nan"], "option learning_rate must be a finite number, got nan"),
    "time-budget-inf": (["--max-train-minutes", "inf"], "option max_train_minutes must be a finite number, got inf"),
    "seed-out-of-range": (["--seed", str(2**32)], "--seed must be in [0, 2**32), got 4294967296"),
    "negative-seed": (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    "fp16-on-cpu": pytest.param(["--mixed-precision", "fp16"], "needs a CUDA GPU", marks=NO_CUDA),
}


@pytest.mark.parametrize(("flags", "expected"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_give_one_error_line_and_write_nothing(tmp_path, capsys, flags, expected):
    output_dir = tmp_path / "out"
    (tmp_path / "keep.txt").write_text("a file that was there before")
    before = snapshot(tmp_path)
    code = cli_main(["train", "--output-dir", str(output_dir), *flags])
    captured = capsys.readouterr()
    assert code == 2
    [message] = error_lines(captured.err)
    assert expected in message and captured.err.strip().endswith(message)
    assert "Traceback" not in captured.err
    assert not output_dir.exists() and snapshot(tmp_path) == before


YAML_PROBLEMS = {
    "unknown-key": ("max_steps: 3\nlearning_rat: 0.1\n", "unknown option(s) learning_rat"),
    "not-a-mapping": ("- max_steps\n- 3\n", "must hold a mapping of option names"),
    "wrong-type": ("max_steps: [1, 2]\n", "option max_steps must be int or null, got [1, 2]"),
    "invalid-yaml": ("max_steps: [1, 2\n", "is not valid YAML"),
}


@pytest.mark.parametrize(("content", "expected"), YAML_PROBLEMS.values(), ids=YAML_PROBLEMS.keys())
def test_bad_yaml_files_give_one_error_line(tmp_path, capsys, content, expected):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    before = snapshot(tmp_path)
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    [message] = error_lines(err)
    assert expected in message and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_missing_yaml_file(tmp_path, capsys):
    assert cli_main(["train", str(tmp_path / "absent.yaml")]) == 2
    [message] = error_lines(capsys.readouterr().err)
    assert "absent.yaml does not exist" in message


def test_an_earlier_run_is_not_overwritten_without_asking(tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    assert cli_main(["train", "--output-dir", str(output_dir), "--max-steps", "1"]) == 2
    [message] = error_lines(capsys.readouterr().err)
    assert "already holds a training run" in message and "--resume-from-checkpoint latest" in message
    assert (output_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert sorted(p.name for p in output_dir.iterdir()) == ["metrics.jsonl"]


def test_tensorboard_tracker_writes_event_files_and_survives_overwrite(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tmp_path / "out"
    options = tiny_options(folder, max_steps=3, eval_steps=3, report_to="tensorboard")
    run_training(*arguments_from_dict(options))
    first = sorted((folder / "logs").rglob("events.out.tfevents.*"))
    run_training(*arguments_from_dict({**options, "overwrite_output_dir": True}))
    files = sorted((folder / "logs").rglob("events.out.tfevents.*"))
    assert files and not set(first) & set(files)  # the old run's logs were replaced, the new ones kept
    [scalar_file] = [path for path in files if path.parent == folder / "logs" / "out"]  # hparams go to a subfolder
    events = EventAccumulator(str(scalar_file)).Reload()
    scalars = events.Tags()["scalars"]
    assert {"train_loss", "val_loss", "lr"} <= set(scalars)
    logged = {row["step"]: row for row in read_metrics(folder / "metrics.jsonl") if "train_loss" in row}
    assert [event.step for event in events.Scalars("train_loss")] == sorted(logged)
    for event in events.Scalars("train_loss"):
        assert event.value == pytest.approx(logged[event.step]["train_loss"], rel=1e-6)


@pytest.mark.parametrize("what", ["gradient", "evaluation", "weights"])
def test_non_finite_gradient_evaluation_or_weights_stop_before_anything_is_written(tmp_path, monkeypatch, what):
    """Whatever turns non-finite first, no checkpoint and no best model are written from that point, and the message
    says which it was and names the last good checkpoint."""
    import accelerate

    import training.train

    options = tiny_options(tmp_path / "out", max_steps=12, eval_steps=4, checkpoint_steps=4, lr_scheduler="constant")
    if what == "gradient":  # from the 6th optimizer step on, the gradient norm is infinite (the loss stays finite)
        original = accelerate.Accelerator.clip_grad_norm_
        calls = []

        def clip(self, *args, **kwargs):
            calls.append(1)
            norm = original(self, *args, **kwargs)
            return norm if len(calls) < 6 else torch.full_like(norm, math.inf)

        monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", clip)
        expected, reason, step = "the gradient norm is inf (not finite)", "non_finite_gradient", 6
    elif what == "evaluation":  # the evaluation at step 8 gives NaN
        original = training.train.evaluate_model
        evaluations = []

        def evaluate(*args, **kwargs):
            evaluations.append(1)
            metrics = original(*args, **kwargs)
            return {**metrics, "val_loss": math.nan} if len(evaluations) == 3 else metrics

        monkeypatch.setattr(training.train, "evaluate_model", evaluate)
        expected, reason, step = "the validation loss is nan (not finite)", "non_finite_evaluation", 8
    else:  # the 8th optimizer step leaves an infinite weight behind, found when checkpoint-8 is due
        options["eval_steps"] = 12
        original = torch.optim.AdamW.step
        steps = []

        def step_and_break(self, *args, **kwargs):
            steps.append(1)
            result = original(self, *args, **kwargs)
            if len(steps) == 8:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].view(-1)[0] = math.inf
            return result

        monkeypatch.setattr(torch.optim.AdamW, "step", step_and_break)
        expected, reason, step = "the weights are not finite after the last optimizer step", "non_finite_weights", 8
    results = run_training(*arguments_from_dict(options))
    assert results["stopped_reason"] == reason
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-4"]
    assert results["message"].startswith(f"training stopped at step {step}: {expected}")
    assert f"the last good one is {tmp_path / 'out' / 'checkpoints' / 'checkpoint-4'}" in results["message"]
    best = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in best.values())
    assert "full_validation" not in results


def test_a_tracker_that_is_not_installed_is_one_error_line(tmp_path, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)  # as where it is missing
    output_dir = tmp_path / "out"
    code = cli_main(["train", "--output-dir", str(output_dir), "--report-to", "tensorboard"])
    [message] = error_lines(capsys.readouterr().err)
    assert code == 2 and "the tensorboard package is not installed; `pip install tensorboard`" in message
    assert not output_dir.exists()
