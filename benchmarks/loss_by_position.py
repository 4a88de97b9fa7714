"""Mean validation loss against position in long sequences: how much history each model uses.

    python benchmarks/loss_by_position.py --dataset ../shared/data/tinyshakespeare/input.txt \
        --model blocks=results/carry-state/runs/gru-blocks-seed1337 \
        --model carried=results/carry-state/runs/gru-carry-seed1337 \
        --model gpt2=results/carry-state/runs/gpt2-seed1337 --output-dir results/carry-state

The validation split's token stream (the corpus and split as `hybrid-lm train` makes them) is cut into sequences of
--positions tokens. A hybrid model reads each sequence in blocks of its training block size with the recurrent state
carried from block to block (attention sees the current block); GPT-2 reads the first n_positions tokens (its
context ends there). Position t is the prediction of token t from tokens 0..t-1. Writes loss_by_position.png (mean
loss over log-spaced position bins) and loss_by_position.md (the same numbers as a table).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.arguments import check_script_minimums  # noqa: E402
from training.data import load_corpus, split_token_stream  # noqa: E402
from training.errors import UserError  # noqa: E402
from training.generate import load_model_and_tokenizer  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BIN_EDGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@torch.no_grad()
def position_losses(model, sequences: torch.Tensor, block_size: int, batch_size: int) -> torch.Tensor:
    """(N, L) token ids -> (L - 1,) mean loss at positions 1..L-1, read as the model can (see the module doc)."""
    limit = getattr(model.config, "n_positions", None)  # GPT-2: its context is its block
    length = sequences.shape[1] if limit is None else min(sequences.shape[1], limit)
    total = torch.zeros(length - 1, dtype=torch.float64)
    for first in tqdm(range(0, len(sequences), batch_size), desc="sequences", leave=False):
        ids = sequences[first : first + batch_size, :length]
        if limit is not None:
            logits = model(ids, use_cache=False).logits[:, :-1]
        else:
            states, pieces = None, []
            for start in range(0, length, block_size):
                output = model(
                    ids[:, start : start + block_size], recurrent_states=states, output_recurrent_states=True
                )
                states = [state.detach() for state in output.recurrent_states]
                pieces.append(output.logits)
            logits = torch.cat(pieces, dim=1)[:, :-1]
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (n, L - 1)
        total += nll.double().sum(dim=0)
    return total / len(sequences)


def binned(losses: torch.Tensor) -> list[tuple[int, int, float]]:
    """(first, last, mean loss) over positions first..last for each bin [2^k, 2^(k+1)) that has positions."""
    rows = []
    for low, high in zip(BIN_EDGES, BIN_EDGES[1:]):
        if low > len(losses):
            break
        part = losses[low - 1 : min(high - 1, len(losses))]  # positions low..high-1 are indices low-1..
        rows.append((low, low + len(part) - 1, float(part.mean())))
    return rows


def _position_curves(args: argparse.Namespace, models: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The mean loss at every position for each (label, folder), over the validation split cut into sequences."""
    validation = load_corpus(args.dataset, validation_fraction=args.validation_fraction)["validation"]
    curves = {}
    for label, folder in models:
        model, tokenizer = load_model_and_tokenizer(folder)
        model.eval()
        stream = split_token_stream(validation, tokenizer)
        count = len(stream) // args.positions
        if count == 0:
            raise UserError(
                f"the validation split of {args.dataset} has {len(stream)} tokens for {label}, fewer than "
                f"--positions {args.positions}; pass --positions {max(len(stream), 2)} or less, or more data"
            )
        sequences = torch.as_tensor(stream[: count * args.positions].reshape(count, args.positions), dtype=torch.long)
        training = yaml.safe_load((Path(folder) / "training_args.yaml").read_text())
        curves[label] = position_losses(model, sequences, training["block_size"], args.batch_size)
        print(f"{label}: {count} sequences of {args.positions} tokens, mean loss {float(curves[label].mean()):.4f}")
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="LABEL=FOLDER (repeat for several models)")
    parser.add_argument("--dataset", required=True, help="the corpus the models were trained on")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--positions", type=int, default=1024, help="tokens per evaluated sequence")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    check_script_minimums(args, positions=2, batch_size=1, threads=1)
    models = [spec.partition("=")[::2] for spec in args.model]
    for spec, (label, folder) in zip(args.model, models):
        if not label or not folder:
            raise SystemExit(f"error: --model {spec!r}: give LABEL=FOLDER, e.g. --model gru=runs/gru")
        if not (Path(folder) / "training_args.yaml").is_file():
            raise SystemExit(
                f"error: --model {spec}: {folder} has no training_args.yaml (the block size the model was trained "
                "at); pass an output folder of `hybrid-lm train`"
            )
    torch.set_num_threads(args.threads)
    try:
        curves = _position_curves(args, models)
    except UserError as error:  # a corpus or model folder that cannot be read: the commands' own message
        raise SystemExit(f"error: {error}") from None
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    figure, axes = plt.subplots(figsize=(8, 5), layout="constrained")
    for label, losses in curves.items():
        rows = binned(losses)
        centres = [math.sqrt(first * last) for first, last, _ in rows]
        axes.plot(centres, [loss for _, _, loss in rows], marker="o", label=f"{label} (to position {len(losses)})")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("position in the sequence (tokens of history)")
    axes.set_ylabel("mean validation loss (nats/token)")
    axes.set_title(f"loss against position, {Path(args.dataset).name} validation split", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(output_dir / "loss_by_position.png", dpi=100)

    bins = binned(max(curves.values(), key=len))
    header = "| model | " + " | ".join(f"{first}-{last}" for first, last, _ in bins) + " |"
    lines = [
        f"Mean validation loss (nats/token) by position, {Path(args.dataset).name}, sequences of {args.positions} "
        "tokens (position t: token t predicted from tokens 0..t-1).",
        "",
        header,
        "|---|" + "---:|" * len(bins),
    ]
    for label, losses in curves.items():
        cells = [f"{loss:.4f}" for _, _, loss in binned(losses)]
        lines.append(f"| {label} | " + " | ".join(cells + ["-"] * (len(bins) - len(cells))) + " |")
    (output_dir / "loss_by_position.md").write_text("\n".join(lines) + "\n")
    (output_dir / "loss_by_position.json").write_text(
        json.dumps({label: losses.tolist() for label, losses in curves.items()}) + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
