"""`hybrid-lm eval`: validation loss, perplexity and bits of a saved model on a corpus.

The numbers come from the training loop's own evaluation (`training.loop.evaluate_model` with the
`language_modeling` metric loaded by path) over the same blocks the training run used, so a run's best
validation loss is reproduced exactly. Dataset, block size and batch size default to the run's
`training_args.yaml` when the model folder has one.

Bits per character = total nats / characters / ln 2, with the split's character-per-token ratio (for
`--max-batches` it is the whole split's ratio, as in training).

Block by block, the first token of every block and the last partial block are not scored. For a hybrid model the
split is also read as streams with the recurrent state carried from block to block (unless `--no-carry-state`):
that reading scores every token of the split once, as lm-eval's rolling log-likelihood does. `--stride N` adds, for
any model, the sliding-window reading of Hugging Face's perplexity guide: overlapping windows of a block, N tokens
apart, each token scored once with at least block size - N tokens before it. It is GPT-2's counterpart of the
streamed reading, so that a model with a carried state is not compared with one scored block by block.
"""

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training.arguments import BLOCK_SIZE_ONE, arg, check_types
from training.errors import UserError
from training.generate import load_model_and_tokenizer, parse_command
from training.model_files import holds_json_object_with

SPLITS = ("validation", "train")
DEFAULT_BLOCK_SIZE = 128
DEFAULT_BATCH_SIZE = 16


@dataclass
class EvalArguments:
    """Which model, which data, how much of it."""

    model: str = arg(help="a saved model folder (output of `hybrid-lm train` or save_pretrained)")
    dataset: str | None = arg(
        None, "a text file, folder or glob, a Hub dataset or python-docs; unset = the run's dataset"
    )
    dataset_config: str | None = arg(None, "configuration of a Hub dataset; unset = the run's")
    text_column: str | None = arg(None, "column holding the text in tabular data; unset = the run's, else text")
    validation_fraction: float | None = arg(
        None, "held-out share when the data has no validation split; unset = the run's, else 0.1"
    )
    split: str = arg("validation", f"split to evaluate: {', '.join(SPLITS)}")
    block_size: int | None = arg(None, f"tokens per sequence; unset = the run's, else {DEFAULT_BLOCK_SIZE}")
    batch_size: int | None = arg(None, f"sequences per batch; unset = the run's, else {DEFAULT_BATCH_SIZE}")
    max_batches: int | None = arg(None, "evaluate only the first this many batches; unset or 0 = the whole split")
    output: str | None = arg(
        None, "also write the results as JSON to this file (an existing file only if it holds earlier eval results)"
    )
    stride: int | None = arg(
        None,
        "also read the split as overlapping windows of --block-size tokens, this many apart, each token scored once "
        "with at least block size - stride tokens before it (sliding-window perplexity; any model, GPT-2 included: "
        "its counterpart of the hybrid's streamed reading); 1 <= stride < block size",
    )
    carry_state: bool = arg(
        True,
        "hybrid models: also read the split as streams with the recurrent state carried from block to block, which "
        "scores every token once, the last partial block included, as lm-eval's rolling log-likelihood does "
        "(--no-carry-state: block by block only); GPT-2 has no state and is scored block by block",
    )

    def __post_init__(self):
        check_types(self)
        if self.split not in SPLITS:
            raise UserError(f"--split {self.split!r} is not known; choose one of: {', '.join(SPLITS)}")
        for name in ("block_size", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.block_size == 1:
            raise UserError(BLOCK_SIZE_ONE)
        if self.stride is not None and self.stride < 1:
            raise UserError(f"--stride must be a positive integer, got {self.stride}")
        if self.max_batches is not None and self.max_batches < 0:
            raise UserError(f"--max-batches must be >= 0, got {self.max_batches}")
        if self.validation_fraction is not None and not 0.0 < self.validation_fraction < 1.0:
            raise UserError(f"--validation-fraction must be in (0, 1), got {self.validation_fraction}")


@dataclass
class DataSettings:
    """What `hybrid-lm train` would read: flags first, then the run's training_args.yaml, then defaults."""

    dataset: str
    dataset_config: str | None
    text_column: str
    validation_fraction: float
    block_size: int
    batch_size: int


def resolve_settings(args: EvalArguments, model_dir: Path) -> DataSettings:
    run = read_training_args(model_dir)

    def pick(name: str, default):
        value = getattr(args, name)
        return value if value is not None else run.get(name, default)

    dataset = pick("dataset", None)
    if dataset is None:
        raise UserError(
            f"--dataset is needed: {model_dir} has no training_args.yaml naming the data it was trained on; "
            "pass a text file, folder, Hub dataset or python-docs"
        )
    return DataSettings(
        dataset=str(dataset),
        dataset_config=pick("dataset_config", None),
        text_column=pick("text_column", "text"),
        validation_fraction=pick("validation_fraction", 0.1),
        block_size=pick("block_size", DEFAULT_BLOCK_SIZE),
        batch_size=pick("batch_size", DEFAULT_BATCH_SIZE),
    )


def read_training_args(model_dir: Path) -> dict:
    path = model_dir / "training_args.yaml"
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML ({error}); fix it or pass --dataset/--block-size") from None
    return values if isinstance(values, dict) else {}


def check_block_size(model, block_size: int) -> None:
    limit = getattr(model.config, "n_positions", None)  # GPT-2 baselines have a position table; ours has none
    if limit is not None and block_size > limit:
        raise UserError(
            f"--block-size {block_size} exceeds this model's {limit} positions; use --block-size <= {limit}"
        )


def evaluate_folder(args: EvalArguments) -> dict:
    """Loads the model and the data, runs the training loop's evaluation, returns the metrics."""
    from training.data import collate_blocks, load_corpus, split_token_stream, tokenize_corpus
    from training.loop import evaluate_model
    from training.streams import evaluate_sliding, evaluate_stream
    from training.train import load_metric

    model, tokenizer = load_model_and_tokenizer(args.model)
    model_dir = Path(args.model).expanduser()
    settings = resolve_settings(args, model_dir)
    check_block_size(model, settings.block_size)
    if args.stride is not None and args.stride >= settings.block_size:
        raise UserError(
            f"--stride {args.stride} is not smaller than the block size {settings.block_size}: a window of "
            f"{settings.block_size} tokens scores {settings.block_size - 1} predictions, so some tokens would never "
            f"be scored; use --stride <= {settings.block_size - 1}"
        )
    corpus = load_corpus(
        settings.dataset,
        dataset_config=settings.dataset_config,
        text_column=settings.text_column,
        validation_fraction=settings.validation_fraction,
    )
    tokenized = tokenize_corpus(type(corpus)({args.split: corpus[args.split]}), tokenizer, settings.block_size)
    blocks = tokenized[args.split]
    if args.max_batches:  # the first blocks, as the training run's evaluation takes them
        blocks = blocks.select(range(min(args.max_batches * settings.batch_size, len(blocks))))
    accelerator = Accelerator()
    dataloader = DataLoader(blocks, batch_size=settings.batch_size, collate_fn=collate_blocks)
    model, dataloader = accelerator.prepare(model, dataloader)
    stats = tokenized.stats[args.split]
    batches = tqdm(dataloader, desc=f"evaluating {args.split}", unit="batch", disable=not accelerator.is_main_process)
    metric = load_metric(accelerator)
    metrics = evaluate_model(accelerator, model, batches, metric, stats.characters_per_token)
    carry = args.carry_state and model.config.model_type == "hybrid_rnn_lm"
    streamed = sliding = None
    if carry or args.stride is not None:  # readings of the whole token stream, every token scored once
        stream = split_token_stream(corpus[args.split], tokenizer)
        if args.max_batches:  # the tokens of the blocks scored above
            stream = stream[: len(blocks) * settings.block_size]
        common = {
            "block_size": settings.block_size,
            "rows": settings.batch_size,
            "characters_per_token": stats.characters_per_token,
            "metric": metric,
        }
    if carry:
        # The state resets after an EOS only for a model trained that way (--carry-state); block-wise training runs
        # the state straight through the EOS between documents, and so does this reading.
        run = read_training_args(model_dir)
        reset = bool(run.get("carry_state", False)) and not bool(run.get("carry_state_across_documents", False))
        streamed = evaluate_stream(
            accelerator, model, stream, eos_id=tokenizer.eos_token_id, reset_documents=reset, **common
        )
    if args.stride is not None:
        sliding = evaluate_sliding(
            accelerator, model, stream, stride=args.stride, prefix_id=tokenizer.eos_token_id, **common
        )
    return {
        "model": str(model_dir),
        "dataset": settings.dataset,
        "split": args.split,
        "block_size": settings.block_size,
        "blocks": len(blocks),
        "tokens_evaluated": len(blocks) * (settings.block_size - 1),
        "loss": metrics["val_loss"],
        "perplexity": metrics["val_perplexity"],
        "bits_per_token": metrics["val_bits_per_token"],
        "bits_per_character": metrics.get("val_bits_per_char"),
        "stream": streamed,  # --carry-state: {loss, perplexity, bits_per_token, bits_per_character, tokens}
        "sliding": sliding,  # --stride: the same keys and "stride"
    }


def markdown_table(results: dict) -> str:
    readings = [(f"block by block ({results['blocks']} x {results['block_size']})", None)]
    if results.get("stream"):
        readings.append(("streamed, state carried", results["stream"]))
    if results.get("sliding"):
        readings.append((f"sliding window, stride {results['sliding']['stride']}", results["sliding"]))
    title = f"{results['model']} on {results['dataset']} ({results['split']})"
    if len(readings) == 1:
        rows = [(name, values[0]) for name, values in _table_rows(results, readings)]
        rows.append(("blocks x block size", f"{results['blocks']} x {results['block_size']}"))
        lines = [f"### {title}", "", "| metric | value |", "| --- | ---: |"]
        return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])
    header = "| metric | " + " | ".join(name for name, _ in readings) + " |"
    lines = [f"### {title}", "", header, "| --- |" + " ---: |" * len(readings)]
    return "\n".join(
        lines + [f"| {name} | " + " | ".join(values) + " |" for name, values in _table_rows(results, readings)]
    )


def _table_rows(results: dict, readings) -> list[tuple[str, list[str]]]:
    """The metric rows of `markdown_table`, one value per reading (None: the block-by-block numbers)."""

    def bits(value):
        return "n/a" if value is None else f"{value:.6f}"

    columns = []
    for _, reading in readings:
        if reading is None:
            reading = {key: results[key] for key in ("loss", "perplexity", "bits_per_token", "bits_per_character")}
            reading["tokens"] = results["tokens_evaluated"]
        columns.append(reading)
    single = len(readings) == 1
    rows = [
        ("loss (nats/token)", [f"{c['loss']:.6f}" for c in columns]),
        ("perplexity", [f"{c['perplexity']:.4f}" for c in columns]),
        ("bits per token", [f"{c['bits_per_token']:.6f}" for c in columns]),
        ("bits per character", [bits(c["bits_per_character"]) for c in columns]),
        ("tokens evaluated" if single else "tokens scored", [f"{c['tokens']:,}" for c in columns]),
    ]
    return rows


def write_json_atomically(path: str | Path, data: dict) -> None:
    """The file is complete or absent: written beside its destination, then renamed over it."""
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise UserError(f"--output {path}: folder {target.parent} does not exist; create it or pick another path")
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(json.dumps(data, indent=2) + "\n")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_output(path: str, model_folder: str) -> None:
    """Checked before the evaluation runs: results written to a folder, to a missing folder or over a file of the
    evaluated model (its config.json, weights, tokenizer or run records) would be lost, or lose the model."""
    from training.train import is_run_output

    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"--output {path} is a folder; pass a file path such as {target / 'eval.json'}")
    if not target.parent.is_dir():
        raise UserError(f"--output {path}: its folder does not exist; create it or pick another path")
    if is_run_output(target) and target.parent.resolve() == Path(model_folder).expanduser().resolve():
        raise UserError(
            f"--output {path} would replace the evaluated model's own {target.name}; pick another file, e.g. "
            f"{target.parent / 'eval.json'}"
        )
    if target.exists() and not is_eval_result(target):
        raise UserError(
            f"--output {path} exists and is not the result of a previous `hybrid-lm eval`, which alone is replaced; "
            "pick a new file, or move that one away first"
        )


def is_eval_result(path: Path) -> bool:
    """Whether a file holds what `hybrid-lm eval --output` writes (a JSON object with its keys)."""
    return holds_json_object_with(path, {"model", "dataset", "split", "block_size", "loss"})


def main(argv: list[str]) -> int:
    args = parse_command(
        EvalArguments, argv, "hybrid-lm eval", "Validation loss, perplexity and bits of a saved model on a corpus."
    )
    if args.output is not None:
        check_output(args.output, args.model)
    results = evaluate_folder(args)
    print(markdown_table(results))
    if args.output is not None:
        write_json_atomically(args.output, results)
        print(f"\nresults written to {args.output}")
    return 0
