"""--max-train-minutes: the run stops at the first step past the budget, records it, and a resume keeps the time."""

import json

import pytest

from tests.test_train import read_metrics, single_thread, tiny_options  # noqa: F401
from training.arguments import TrainArguments, arguments_from_dict
from training.errors import UserError
from training.loop import UNBOUNDED_STEPS, schedule_position
from training.train import run_training

pytestmark = pytest.mark.usefixtures("single_thread")

BUDGET_MINUTES = 0.003  # 0.18 s: a few dozen steps of the tiny model


def test_schedule_position_follows_steps_or_time_whichever_is_further():
    # No budget: the step itself, warmup included.
    assert schedule_position(3, 100.0, None, 10, 2) == 3
    # During warmup, steps only.
    assert schedule_position(1, 50.0, 60.0, 100, 2) == 1
    # After warmup: half the budget spent -> half way through the decay, unless the steps are further.
    assert schedule_position(10, 30.0, 60.0, 102, 2) == pytest.approx(2 + 100 * 0.5)
    assert schedule_position(90, 30.0, 60.0, 102, 2) == 90
    # A time-only run (max_steps unbounded) ends its schedule exactly with the budget.
    assert schedule_position(5, 60.0, 60.0, UNBOUNDED_STEPS, 2) == UNBOUNDED_STEPS
    assert schedule_position(5, 90.0, 60.0, UNBOUNDED_STEPS, 2) == UNBOUNDED_STEPS


def test_time_budget_stops_the_run_and_a_resume_keeps_the_time_spent(tmp_path):
    folder = tmp_path / "out"
    options = tiny_options(
        folder, max_train_minutes=BUDGET_MINUTES, eval_steps=1000, checkpoint_steps=0, lr_scheduler="linear"
    )
    first = run_training(*arguments_from_dict(options))
    budget = 60 * BUDGET_MINUTES
    assert first["stopped_reason"] == "time_budget"
    assert first["train_seconds"] >= budget
    rows = read_metrics(folder / "metrics.jsonl")
    train_rows = [row for row in rows if "train_loss" in row]
    assert first["steps"] == len(train_rows) == train_rows[-1]["step"] > 3
    # It stopped at the first step past the budget: the step before it was still inside.
    last_step_seconds = 1 / (train_rows[-1]["tokens_per_second"] / (4 * 32))
    assert first["train_seconds"] - last_step_seconds < budget
    # The final evaluation and checkpoint happen at the step reached; the schedule decayed to its end.
    assert [row["step"] for row in rows if "val_loss" in row] == [0, first["steps"]]
    assert (folder / "checkpoints" / f"checkpoint-{first['steps']}").is_dir()
    # After warmup, the linear schedule runs over the budget: a step's lr is (1 - time spent before it / budget) of
    # the peak, so it reaches zero with the budget.
    peak = TrainArguments().learning_rate
    for before, row in zip(train_rows, train_rows[1:]):
        if row["step"] > options["warmup_steps"] + 1:
            assert row["lr"] == pytest.approx(peak * (1 - before["train_seconds"] / budget), rel=1e-9)
    assert json.loads((folder / "results.json").read_text())["steps"] == first["steps"]

    # Resumed with twice the budget: only the remaining half is trained.
    resumed = run_training(
        *arguments_from_dict({**options, "max_train_minutes": 2 * BUDGET_MINUTES, "resume_from_checkpoint": "latest"})
    )
    assert resumed["stopped_reason"] == "time_budget" and resumed["steps"] > first["steps"]
    assert resumed["train_seconds"] >= 2 * budget
    assert resumed["train_seconds"] - first["train_seconds"] < 1.5 * budget


def test_time_budget_must_be_a_positive_number():
    with pytest.raises(UserError, match="--max-train-minutes must be a positive number, got -1"):
        arguments_from_dict({"max_train_minutes": -1})
