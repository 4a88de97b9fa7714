"""The training loop: set lr -> evaluate/checkpoint -> micro-steps -> clip -> step -> log, on accelerate.

Everything a resumed run needs besides model, optimizer and RNG states lives in `TrainingProgress`, which is
saved in every checkpoint; the learning rate is a pure function of the step and the data position is
(epoch, batches consumed), so a resumed run replays an uninterrupted one exactly.
"""

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training.arguments import TrainArguments


@dataclass
class TrainingProgress:
    """Loop state saved with every checkpoint, as JSON (training_progress.json)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` this process has consumed
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    train_seconds: float = 0.0  # wall time inside training steps, evaluations and checkpoints excluded
    unlogged_losses: list[float] = field(default_factory=list)  # steps since the last log line
    resumes: list[dict] = field(default_factory=list)  # {"step", "changed": {option: [before, after]}} per resume

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class LoopParts:
    """What the loop drives; the callables keep file and tracker details out of it."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_dataloader: DataLoader
    lr_multiplier: Callable[[int], float]  # step -> fraction of the peak learning rate
    evaluate: Callable[[], dict]  # -> {"val_loss": ..., ...}
    save_best_model: Callable[[], None]
    save_checkpoint: Callable[[int], None]
    log: Callable[[dict], None]  # one metrics.jsonl row
    stop_requested: Callable[[], bool]  # Ctrl-C seen (on any process)
    tokens_per_step: int
    resumed: bool = False
    on_batch: Callable[[int, torch.Tensor], None] | None = None  # (step, input_ids) of every micro-batch
    carried: object | None = None  # training.streams.CarriedState under --carry-state
    batches: Iterator[dict] | None = None  # micro-batches read by the caller (--carry-state, --streaming)
    selection_metric: str = "val_loss"  # the evaluation number that picks the best model
    last_loss: float = field(default=math.nan)
    non_finite: str = ""  # what was not finite when the run stopped for it, in words


def train_loop(parts: LoopParts, progress: TrainingProgress, args: TrainArguments, max_steps: int) -> str:
    """Trains up to `max_steps` (or the time budget); returns why it stopped: max_steps, time_budget, early_stopping,
    interrupted, or non_finite_loss / _gradient / _evaluation / _weights (nothing written from that point on)."""
    accelerator, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    batches = parts.batches or batch_stream(parts.train_dataloader, accelerator, progress)
    start_step = progress.step
    budget_seconds = None if args.max_train_minutes is None else 60.0 * args.max_train_minutes
    window_seconds = 0.0  # training time only: evaluation and checkpoints do not count
    with tqdm(
        total=None if max_steps == UNBOUNDED_STEPS else max_steps,
        initial=start_step,
        desc="training",
        unit="step",
        disable=not accelerator.is_main_process,
    ) as bar:  # closed on any exit, so that an error message starts its own line
        while True:
            step = progress.step
            # Under a time budget the main process's clock decides, so that every process stops at the same step and
            # follows the same learning rate.
            train_seconds = progress.train_seconds
            if budget_seconds is not None:
                train_seconds = _main_process_value(accelerator, train_seconds)
            at_end = step >= max_steps or (budget_seconds is not None and train_seconds >= budget_seconds)
            # 1. Learning rate: a function of the step only (and of the time spent, under a time budget), so a resumed
            #    run follows the same schedule.
            position = schedule_position(step, train_seconds, budget_seconds, max_steps, args.warmup_steps)
            lr = args.learning_rate * parts.lr_multiplier(position)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 2. Evaluate, keep the best model, stop or checkpoint. A resumed run does not redo what its checkpoint holds.
            stop_reason = None
            if not (parts.resumed and step == start_step):
                if step % args.eval_steps == 0 or at_end:
                    metrics = parts.evaluate()
                    parts.log(
                        {
                            "step": step,
                            "tokens_seen": progress.tokens_seen,
                            "train_seconds": progress.train_seconds,
                            **metrics,
                        }
                    )
                    if not math.isfinite(metrics[parts.selection_metric]):  # no best model, no checkpoint
                        parts.non_finite = f"the validation loss is {metrics[parts.selection_metric]}"
                        stop_reason = "non_finite_evaluation"
                        break
                    if metrics[parts.selection_metric] < progress.best_val_loss:
                        progress.best_val_loss, progress.best_step = metrics[parts.selection_metric], step
                        progress.evals_without_improvement = 0
                        parts.save_best_model()
                    else:
                        progress.evals_without_improvement += 1
                    patience = args.early_stopping_patience
                    if patience is not None and progress.evals_without_improvement >= patience:
                        stop_reason = "early_stopping"
                if at_end:
                    stop_reason = "max_steps" if step >= max_steps else "time_budget"
                if stop_reason or (args.checkpoint_steps and step > 0 and step % args.checkpoint_steps == 0):
                    if not _weights_are_finite(model):
                        parts.non_finite = "the weights are not finite after the last optimizer step"
                        stop_reason = "non_finite_weights"
                        break
                    parts.save_checkpoint(step)
            elif at_end:
                stop_reason = "max_steps" if step >= max_steps else "time_budget"
            if stop_reason:
                break
            if parts.stop_requested():
                if step != start_step or not parts.resumed:
                    parts.save_checkpoint(step)
                stop_reason = "interrupted"
                break

            # 3. Forward/backward over the micro-batches; accelerate all-reduces gradients on the last one only.
            step_started = time.perf_counter()
            model.train()
            step_loss = torch.zeros((), device=accelerator.device)
            for _ in range(args.gradient_accumulation_steps):
                batch = next(batches)
                input_ids = batch["input_ids"]
                if parts.on_batch is not None:
                    parts.on_batch(step, input_ids)
                with accelerator.accumulate(model):
                    if parts.carried is None:
                        loss = model(input_ids=input_ids, labels=input_ids).loss
                    else:  # truncated BPTT: start from the state the previous micro-step of these rows ended in
                        loss = _carried_step(model, batch, parts.carried)
                    accelerator.backward(loss)  # divided by the accumulation steps inside
                step_loss += loss.detach() / args.gradient_accumulation_steps
            step_loss = accelerator.reduce(step_loss, reduction="mean")

            # 4. Clip; a non-finite loss or gradient stops before the optimizer can spread it into the weights.
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm) if args.max_grad_norm else None
            )
            parts.last_loss = step_loss.item()
            if not math.isfinite(parts.last_loss):
                parts.non_finite, stop_reason = f"the loss is {parts.last_loss}", "non_finite_loss"
            elif grad_norm is not None and not torch.isfinite(grad_norm):
                parts.non_finite, stop_reason = f"the gradient norm is {grad_norm.item()}", "non_finite_gradient"
            if stop_reason:
                optimizer.zero_grad(set_to_none=True)
                break

            # 5. Step.
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens_seen += parts.tokens_per_step
            step_seconds = time.perf_counter() - step_started
            progress.train_seconds += step_seconds
            window_seconds += step_seconds

            # 6. Log: mean loss and throughput over the steps since the last log line.
            losses = progress.unlogged_losses
            losses.append(parts.last_loss)
            if progress.step % args.log_steps == 0 or progress.step == max_steps:
                tokens_per_second = len(losses) * parts.tokens_per_step / max(window_seconds, 1e-9)
                train_loss = sum(losses) / len(losses)
                parts.log(
                    {
                        "step": progress.step,
                        "tokens_seen": progress.tokens_seen,
                        "train_seconds": progress.train_seconds,
                        "lr": lr,
                        "train_loss": train_loss,
                        "tokens_per_second": tokens_per_second,
                    }
                )
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
                losses.clear()
                window_seconds = 0.0  # training time only: evaluation and checkpoints do not count
            bar.update(1)
    return stop_reason


def _carried_step(model, batch: dict, carried) -> torch.Tensor:
    if batch["fresh"]:  # a new epoch: the streams start again from the beginning, from a zero state
        carried.states = None
    streams = batch.get("streams")  # the sub-stream each row continues (--carry-state-streams)
    output = model(
        input_ids=batch["input_ids"],
        labels=batch["input_ids"],
        position_ids=batch["position_ids"],  # restart at 0 after each EOS: the state resets there
        recurrent_states=carried.take(streams),
        output_recurrent_states=True,
    )
    carried.put(streams, output.recurrent_states)
    return output.loss


UNBOUNDED_STEPS = 10**12  # max_steps of a run limited by --max-train-minutes alone


def schedule_position(
    step: int, train_seconds: float, budget_seconds: float | None, max_steps: int, warmup_steps: int
) -> float:
    """The step at which to read the learning-rate schedule.

    Without a time budget, the step itself. With one, after warmup, the schedule moves on by whichever comes first,
    steps or time: a run stopped by its budget has still decayed its learning rate to the end of the schedule.
    """
    if budget_seconds is None or step < warmup_steps:
        return step
    time_fraction = min(1.0, train_seconds / budget_seconds)
    return max(step, warmup_steps + (max_steps - warmup_steps) * time_fraction)


def _weights_are_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters())


def _main_process_value(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast

    return broadcast(torch.tensor([value], device=accelerator.device, dtype=torch.float64)).item()


def batch_stream(dataloader: DataLoader, accelerator: Accelerator, progress: TrainingProgress) -> Iterator[dict]:
    """Endless micro-batches, epoch after epoch, starting at `progress`'s (epoch, batches_in_epoch) position."""
    while True:
        # The seedable sampler shuffles with seed + epoch: any process, any restart, same order.
        dataloader.set_epoch(progress.epoch)
        skip = progress.batches_in_epoch
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in loader:
            progress.batches_in_epoch += 1
            yield batch
        progress.epoch += 1
        progress.batches_in_epoch = 0


@torch.no_grad()
def evaluate_model(
    accelerator: Accelerator, model: torch.nn.Module, dataloader: DataLoader, metric, characters_per_token=None
) -> dict:
    """Validation loss, perplexity and bits, pooled over every token of `dataloader` on every process."""
    was_training = model.training
    model.eval()
    for batch in dataloader:
        input_ids = batch["input_ids"]  # (B, T)
        logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
        token_nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
        )  # (B, T-1)
        # Per sequence, so that gather_for_metrics can drop the padding samples of an uneven last batch.
        sequence_nll = accelerator.gather_for_metrics(token_nll.sum(dim=1).double())
        metric.add_batch(nll_sum=sequence_nll.tolist(), num_tokens=[token_nll.shape[1]] * len(sequence_nll))
    result = metric.compute(characters_per_token=characters_per_token)
    model.train(was_training)
    metrics = {
        "val_loss": result["loss"],
        "val_perplexity": result["perplexity"],
        "val_bits_per_token": result["bits_per_token"],
    }
    if result["bits_per_character"] is not None:
        metrics["val_bits_per_char"] = result["bits_per_character"]
    return metrics
