"""Generation cost of the hybrid model (full and sliding-window attention) against GPT-2 of the same size.

    python benchmarks/generation_benchmark.py            # contexts 128, 1024, 4096; batch 1 and 8 (~3-5 min, 2 cores)
    python benchmarks/generation_benchmark.py --quick    # contexts 128 and 1024, batch 1 and 8 (well under a minute)
    python benchmarks/generation_benchmark.py --device cuda --output-dir benchmarks/results

For every (model, context length, batch size): a random prompt of that many tokens is prefilled through the
cache, then --new-tokens tokens are decoded greedily one forward at a time, exactly what `generate()` does.
Reported:

- prefill_ms: the prompt forward pass;
- ms_per_token: mean wall time of one decode step (one new token for each sequence of the batch);
- cache_mb: bytes of every tensor held in the cache after the last step (keys/values, recurrent states);
- peak_mb: peak memory above the level before the prompt was built. CPU: the process's peak resident set
  (VmHWM from /proc/self/status, reset through /proc/self/clear_refs before each setting, after malloc_trim
  returned freed memory to the system; tracemalloc is not used because it does not see torch's allocations).
  It includes the prompt, activations and logits of the prefill, so it is larger than the cache. CUDA:
  torch.cuda.max_memory_allocated.

All models use random weights (latency and memory do not depend on the values), float32, sdpa attention.
GPT-2 gets the same width and heads and the number of layers whose non-embedding parameter count is closest to
ours (its position table grows with the longest context, so it is left out of the match; both counts are printed).
"""

import argparse
import ctypes
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from hybrid_rnn_lm import HybridRnnLmConfig, HybridRnnLmForCausalLM
from training.arguments import check_script_minimums, script_device
from training.train import count_parameters

VOCAB_SIZE = 256  # byte-sized vocabulary: embeddings stay small next to the blocks, as in a char-level model
HIDDEN_SIZE = 256
NUM_LAYERS = 4
NUM_HEADS = 4
WINDOW = 256


@dataclass
class Setting:
    model: str
    context: int
    batch: int


@dataclass
class Measurement:
    model: str
    context: int
    batch: int
    prefill_ms: float
    ms_per_token: float
    cache_mb: float
    peak_mb: float


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------


def hybrid(window: int | None) -> HybridRnnLmForCausalLM:
    config = HybridRnnLmConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        rnn_type="gru",
        num_attention_heads=NUM_HEADS,
        attention_layers="all",
        attention_window=window,
    )
    return HybridRnnLmForCausalLM(config)


def gpt2(layers: int, positions: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=HIDDEN_SIZE,
        n_layer=layers,
        n_head=NUM_HEADS,
        n_positions=positions,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def non_embedding_parameters(model) -> int:
    """Counted as in every run's results.json."""
    return count_parameters(model)["num_non_embedding_parameters"]


def matched_gpt2(target: int, positions: int) -> GPT2LMHeadModel:
    """The GPT-2 depth whose non-embedding parameter count is closest to `target`."""
    per_layer = non_embedding_parameters(gpt2(2, 8)) - non_embedding_parameters(gpt2(1, 8))
    fixed = non_embedding_parameters(gpt2(1, 8)) - per_layer  # final norm
    layers = max(1, round((target - fixed) / per_layer))
    return gpt2(layers, positions)


def build_models(max_positions: int) -> dict[str, torch.nn.Module]:
    ours = hybrid(None)
    return {
        "hybrid (full attention)": ours,
        f"hybrid (window {WINDOW})": hybrid(WINDOW),
        "GPT-2": matched_gpt2(non_embedding_parameters(ours), max_positions),
    }


# ------------------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------------------


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache holds (keys/values of each layer and recurrent states)."""
    seen, total = set(), 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for layer in cache.layers:
        visit(list(vars(layer).values()))
    return total


class PeakMemory:
    """Peak memory above the current level: process RSS on CPU, the caching allocator on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _return_freed_memory()  # else new tensors reuse freed pages and never raise the RSS
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kb("VmRSS") * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kb("VmHWM") * 1024 - self.base


def _return_freed_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then be under-counted
        pass


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model, setting: Setting, new_tokens: int, device: torch.device) -> Measurement:
    memory = PeakMemory(device)
    memory.start()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB_SIZE, (setting.batch, setting.context), generator=generator).to(device)

    synchronize(device)
    started = time.perf_counter()
    output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    synchronize(device)
    prefill = time.perf_counter() - started

    steps = []
    for _ in range(new_tokens):
        next_ids = output.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1): greedy, as generate() would pick
        synchronize(device)
        started = time.perf_counter()
        output = model(input_ids=next_ids, cache=output.cache, use_cache=True, logits_to_keep=1)
        synchronize(device)
        steps.append(time.perf_counter() - started)
    return Measurement(
        model=setting.model,
        context=setting.context,
        batch=setting.batch,
        prefill_ms=prefill * 1e3,
        ms_per_token=statistics.fmean(steps) * 1e3,
        cache_mb=cache_bytes(output.cache) / 2**20,
        peak_mb=memory.peak_bytes() / 2**20,
    )


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def markdown_tables(results: list[Measurement], parameters: dict[str, tuple[int, int]]) -> str:
    lines = ["| model | parameters | non-embedding |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {total:,} | {core:,} |" for name, (total, core) in parameters.items()]
    lines += [
        "",
        "| model | context | batch | prefill ms | ms / token | cache MB | peak MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in results:
        lines.append(
            f"| {m.model} | {m.context} | {m.batch} | {m.prefill_ms:.1f} | {m.ms_per_token:.2f} | "
            f"{m.cache_mb:.2f} | {m.peak_mb:.1f} |"
        )
    lines += ["", "Ratios ours / GPT-2 (below 1: ours is cheaper):", ""]
    lines += [
        "| model | context | batch | ms / token | cache | peak memory |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    baseline = {(m.context, m.batch): m for m in results if m.model == "GPT-2"}
    for m in results:
        reference = baseline.get((m.context, m.batch))
        if m.model == "GPT-2" or reference is None:
            continue
        lines.append(
            f"| {m.model} | {m.context} | {m.batch} | {m.ms_per_token / reference.ms_per_token:.2f} | "
            f"{m.cache_mb / reference.cache_mb:.3f} | {_ratio(m.peak_mb, reference.peak_mb)} |"
        )
    return "\n".join(lines)


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs > 1.0 else "n/a"  # a peak under 1 MB is noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="contexts 128 and 1024 only")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096], help="prompt lengths")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="sequences per batch")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per setting")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; on a shared machine more threads spin against other processes and timings "
        "become noise, so the default is 1 (pass the core count on a dedicated machine)",
    )
    parser.add_argument("--output-dir", default=None, help="also write results.json and results.md here")
    args = parser.parse_args()
    check_script_minimums(args, contexts=1, batch_sizes=1, new_tokens=1, threads=1)
    torch.set_num_threads(args.threads)
    contexts = [c for c in args.contexts if c <= 1024] if args.quick else args.contexts
    if not contexts:
        raise SystemExit(f"error: --quick measures contexts up to 1024 tokens; --contexts {args.contexts} has none")
    device = script_device(args.device)
    torch.manual_seed(0)
    models = {name: model.to(device).eval() for name, model in build_models(max(contexts) + args.new_tokens).items()}
    parameters = {name: (model.num_parameters(), non_embedding_parameters(model)) for name, model in models.items()}
    for model in models.values():  # first calls pay for lazy initialisation: keep it out of the numbers
        measure(model, Setting("warm-up", 8, 1), 2, device)

    settings = [Setting(name, c, b) for c in contexts for b in args.batch_sizes for name in models]
    results = []
    for setting in tqdm(settings, desc="benchmark", unit="setting"):
        results.append(measure(models[setting.model], setting, args.new_tokens, device))
    where = f"{device.type}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
    report = f"Generation benchmark ({where}; {args.new_tokens} new tokens per setting)\n\n"
    report += markdown_tables(results, parameters)
    print(report)
    if args.output_dir:
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.md").write_text(report + "\n")
        (folder / "results.json").write_text(json.dumps([asdict(m) for m in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
