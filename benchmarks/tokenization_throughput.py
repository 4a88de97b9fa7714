"""Tokenization throughput of the data pipeline, next to what a training step consumes.

Tiny Shakespeare is cut into documents at blank lines and repeated to about `--megabytes` MB; each tokenizer
(char, byte-level BPE) then runs through `tokenize_corpus` exactly as training uses it (documents joined with
EOS, cut into blocks, saved to the on-disk cache). Printed as Markdown tables:

    python benchmarks/tokenization_throughput.py --megabytes 50 --num-proc 2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, disable_progress_bars

from training.arguments import check_script_minimums
from training.data import tokenize_corpus
from training.tokenization import BYTE_ALPHABET_SIZE, SPECIAL_TOKENS, build_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@dataclass
class TokenizationResult:
    kind: str
    vocab_size: int
    num_proc: int
    megabytes: float
    documents: int
    tokens: int
    tokenizer_training_s: float
    first_run_s: float
    cached_run_s: float

    @property
    def megabytes_per_second(self) -> float:
        return self.megabytes / self.first_run_s

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.first_run_s


def repeated_documents(text: str, megabytes: float) -> list[str]:
    """Blank-line separated passages of `text`, repeated until they hold `megabytes` MB of UTF-8."""
    passages = [passage for passage in text.split("\n\n") if passage]
    copies = max(1, math.ceil(megabytes * 1e6 / len(text.encode())))
    return passages * copies


def measure_tokenization(kind: str, text: str, documents: list[str], args) -> TokenizationResult:
    started = time.perf_counter()
    tokenizer = build_tokenizer(kind, [text], vocab_size=args.bpe_vocab_size if kind == "bpe" else None)
    training_s = time.perf_counter() - started
    corpus = DatasetDict({"train": Dataset.from_dict({"text": documents})})
    with tempfile.TemporaryDirectory(prefix="tokenization-benchmark-") as cache_dir:
        started = time.perf_counter()
        blocks = tokenize_corpus(corpus, tokenizer, args.block_size, num_proc=args.num_proc, cache_dir=cache_dir)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = tokenize_corpus(corpus, tokenizer, args.block_size, num_proc=args.num_proc, cache_dir=cache_dir)
        cached_s = time.perf_counter() - started
        assert not blocks.cache_hit and cached.cache_hit
    stats = blocks.stats["train"]
    megabytes = sum(len(document.encode()) for document in documents) / 1e6
    return TokenizationResult(
        kind, len(tokenizer), args.num_proc, megabytes, stats.documents, stats.tokens, training_s, first_s, cached_s
    )


def training_defaults() -> dict:
    """Model size, block size and batch size of a plain `hybrid-lm train`."""
    defaults = {
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "rnn_type": "gru",
        "num_attention_heads": 4,
        "attention_layers": 2,
        "block_size": 128,
        "batch_size": 16,
    }
    try:
        from training.arguments import DataArguments, ModelArguments, TrainArguments
    except ImportError:
        return defaults
    for cls in (ModelArguments, DataArguments, TrainArguments):
        for field in dataclasses.fields(cls):
            if field.name in defaults and field.default is not dataclasses.MISSING:
                defaults[field.name] = field.default
    attention = str(defaults["attention_layers"])
    defaults["attention_layers"] = int(attention) if attention.isdigit() else attention
    return defaults


def measure_training_step(vocab_size: int, steps: int) -> dict:
    """Tokens per second of forward + backward + AdamW step at the default model size (this machine, fp32)."""
    import torch

    from hybrid_rnn_lm import HybridRnnLmConfig, HybridRnnLmForCausalLM

    settings = training_defaults()
    block_size, batch_size = settings.pop("block_size"), settings.pop("batch_size")
    torch.manual_seed(0)
    model = HybridRnnLmForCausalLM(HybridRnnLmConfig(vocab_size=vocab_size, **settings))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, vocab_size, (batch_size, block_size))

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return {
        "parameters": parameters,
        "batch": f"{batch_size} x {block_size}",
        "step_s": seconds,
        "tokens_per_second": batch_size * block_size / seconds,
        "settings": settings,
    }


def markdown_tables(results: list[TokenizationResult], step: dict | None) -> str:
    lines = [
        "| tokenizer | vocab | num_proc | corpus MB | documents | tokens | tokenizer training s | "
        "tokenize s | MB/s | tokens/s | cached reload s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.kind} | {result.vocab_size} | {result.num_proc} | {result.megabytes:.1f} | "
            f"{result.documents:,} | {result.tokens:,} | {result.tokenizer_training_s:.2f} | {result.first_run_s:.1f} | "
            f"{result.megabytes_per_second:.2f} | {result.tokens_per_second:,.0f} | {result.cached_run_s:.2f} |"
        )
    if step is not None:
        settings = ", ".join(f"{name}={value}" for name, value in step["settings"].items())
        lines += [
            "",
            "| training step (default model) | parameters | batch | s / step | tokens/s |",
            "|---|---:|---:|---:|---:|",
            f"| {settings} | {step['parameters']:,} | {step['batch']} | {step['step_s']:.3f} | "
            f"{step['tokens_per_second']:,.0f} |",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="source text (default: Tiny Shakespeare)")
    parser.add_argument("--megabytes", type=float, default=50.0, help="corpus size after repetition")
    parser.add_argument("--num-proc", type=int, default=1, help="processes for tokenize_corpus")
    parser.add_argument("--kinds", nargs="+", default=["char", "bpe"], choices=["char", "bpe"])
    parser.add_argument("--bpe-vocab-size", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=1024, help="block size of the tokenized corpus")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps; 0 skips the model")
    args = parser.parse_args(argv)
    smallest_bpe = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)  # the tokenizer's own floor
    check_script_minimums(args, num_proc=1, bpe_vocab_size=smallest_bpe, block_size=2, train_steps=0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.text.is_file():
        print(f"error: {args.text} not found; pass --text with a UTF-8 text file", file=sys.stderr)
        return 2
    disable_progress_bars()  # timed work only; the table is the output
    text = args.text.read_text(encoding="utf-8")
    documents = repeated_documents(text, args.megabytes)
    results = [measure_tokenization(kind, text, documents, args) for kind in args.kinds]
    step = measure_training_step(results[0].vocab_size, args.train_steps) if args.train_steps > 0 else None
    print(markdown_tables(results, step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
