"""Training throughput of the hybrid model for every recurrent cell against transformers' GPT-2 of the same size.

    python benchmarks/training_throughput.py                 # 12 x 64 and 12 x 256, one thread (~7 min, 2 cores)
    python benchmarks/training_throughput.py --threads 2 --shapes 12x64
    python benchmarks/training_throughput.py --chunk-sizes 8,16,32,64,128   # the scan's chunk size, mingru hybrid
    python benchmarks/training_throughput.py --precisions bf16   # bfloat16 autocast only (--mixed-precision bf16)
    python benchmarks/training_throughput.py --rnn-types mingru --intermediate-size 448   # another MLP width
    python benchmarks/training_throughput.py --rnn-types mingru --hidden-act gelu,relu2   # the MLP's activation
    python benchmarks/training_throughput.py --quick         # a tiny run that only shows the table's shape
    python benchmarks/training_throughput.py --device cuda --shapes 12x256,64x1024   # on a GPU

One training step is what `hybrid-lm train` does: forward with labels, backward, AdamW step, on random token ids of
a character-sized vocabulary (65). All models run in one process, in interleaved rounds (the order rotates every
round), so that the load of a shared machine falls on all of them alike; each figure is the median over rounds.
Absolute tokens/s move with the machine's load; the ratios measured side by side hold.

The reference is GPT-2 at nanoGPT's CPU size (4 layers x 128, 4 heads). Every hybrid has nanoGPT's depth budget
(3 blocks, attention in block 2, 4 heads, as the default model) and the width whose parameter count is closest
to GPT-2's within 10%, a multiple of 16 where one fits; the table prints both counts. GFLOP/s counts the floating-point work of one
step (torch's FlopCounterMode: matrix products, attention, the fused cells' gate products) per second, beside the
peak of one matrix product of the same precision measured in the same run.

Every shape is measured in float32 and under bfloat16 autocast (what `hybrid-lm train --mixed-precision bf16` does:
the matrix products in bf16, weights, optimizer state, norms and the recurrent scan in float32); on a CPU without
bf16 matrix instructions (no AVX-512 / AMX), where bf16 runs in slow generic code, in float32 alone unless
--precisions asks for bf16. Both models of a
row share its precision; the ratio never compares a bf16 model with a float32 one.
"""

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

from hybrid_rnn_lm import HybridRnnLmConfig, HybridRnnLmForCausalLM
from hybrid_rnn_lm.configuration_hybrid_rnn_lm import RNN_TYPES
from training.arguments import check_script_minimums, script_device

VOCAB_SIZE = 65  # Tiny Shakespeare's characters
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
GPT2_LAYERS, GPT2_WIDTH, HEADS = 4, 128, 4  # nanoGPT's CPU recipe
HYBRID_LAYERS, HYBRID_ATTENTION = 3, 2  # the default hybrid: 3 blocks, attention in every 2nd (block 1)
CPU = torch.device("cpu")


@dataclass
class Model:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    parameters: int


def gpt2(block_size: int, activation: str | None = None) -> GPT2LMHeadModel:
    """nanoGPT's CPU GPT-2; `activation` replaces its MLP's gelu_new (None: transformers' default)."""
    extra = {} if activation is None else {"activation_function": activation}
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=GPT2_WIDTH,
        n_layer=GPT2_LAYERS,
        n_head=HEADS,
        n_positions=block_size,
        resid_pdrop=0.0,  # GPT2Config's defaults are 0.1: training runs (and the hybrid) use no dropout
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        **extra,
    )
    return GPT2LMHeadModel(config)


def hybrid(
    rnn_type: str,
    width: int,
    chunk_size: int | None = None,
    intermediate_size: int | None = None,
    activation: str | None = None,
) -> HybridRnnLmForCausalLM:
    """The default hybrid's shape at this width; `intermediate_size` is the MLP width (None: the config's 4 x width),
    `activation` the MLP's activation (None: the config's GELU)."""
    extra = {} if chunk_size is None else {"scan_chunk_size": chunk_size}
    if activation is not None:
        extra["hidden_act"] = activation
    config = HybridRnnLmConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=intermediate_size,
        num_hidden_layers=HYBRID_LAYERS,
        rnn_type=rnn_type,
        num_attention_heads=HEADS,
        attention_layers=HYBRID_ATTENTION,
        **extra,
    )
    return HybridRnnLmForCausalLM(config)


def mlp_label(intermediate_size: int | None, activations: list[str]) -> str:
    width = "4 x width" if intermediate_size is None else str(intermediate_size)
    return f"{width}, {' / '.join(activations)}"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_width(rnn_type: str, target: int, intermediate_size: int | None = None) -> int:
    """The width whose hybrid (with this MLP width, or 4 x width) has the parameter count closest to `target`, within
    10%, preferring multiples of 16 (the matrix kernels run markedly slower on widths such as 148; GPT-2's 128 is
    one), else of 8."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        counts = {
            width: parameter_count(hybrid(rnn_type, width, intermediate_size=intermediate_size))
            for width in range(32, 513, 8)
        }
    close = [width for width, count in counts.items() if abs(count - target) <= 0.1 * target]
    candidates = [width for width in close if width % 16 == 0] or close or list(counts)
    return min(candidates, key=lambda width: abs(counts[width] - target))


def with_optimizer(name: str, model: torch.nn.Module, device: torch.device) -> Model:
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)  # as the trainer
    return Model(name, model, optimizer, parameter_count(model))


def autocast(precision: str, device: torch.device):
    """The trainer's --mixed-precision: bf16 autocast on the model's device, or nothing for float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timer reads the work's end and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(entry: Model, ids: torch.Tensor, precision: str = "fp32") -> None:
    with autocast(precision, ids.device):
        loss = entry.model(input_ids=ids, labels=ids).loss
    loss.backward()
    entry.optimizer.step()
    entry.optimizer.zero_grad(set_to_none=True)


def step_flops(entry: Model, ids: torch.Tensor) -> int:
    """Floating-point operations of one forward + backward (the optimizer's elementwise work is left out)."""
    with FlopCounterMode(display=False) as counter:
        entry.model(input_ids=ids, labels=ids).loss.backward()
    entry.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak_gflops(
    device: torch.device, repeats: int = 10, precision: str = "fp32", size: int | None = None
) -> float:
    """Best GFLOP/s of a square matrix product in `precision` (CPU: on the current thread count); by default
    1024 x 1024 on a CPU, 8192 x 8192 on a GPU."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(size, size, dtype=PRECISIONS[precision], device=device) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def measure(
    models: list[Model],
    batch: int,
    block: int,
    rounds: int,
    steps: int,
    warmup: int,
    precision: str = "fp32",
    device: torch.device = CPU,
) -> dict[str, float]:
    """Median tokens/s of each model over `rounds` interleaved rounds of `steps` training steps."""
    ids = torch.randint(0, VOCAB_SIZE, (batch, block), generator=torch.Generator().manual_seed(0)).to(device)
    for entry in models:
        for _ in range(warmup):
            training_step(entry, ids, precision)
    samples = {entry.name: [] for entry in models}
    bar = tqdm(total=rounds * len(models), desc=f"{batch}x{block} {precision}", unit="run", leave=False)
    for round_index in range(rounds):
        shift = round_index % len(models)
        for entry in models[shift:] + models[:shift]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                training_step(entry, ids, precision)
            synchronize(device)
            samples[entry.name].append(steps * batch * block / (time.perf_counter() - start))
            bar.update(1)
    bar.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (TF32 matrix products off)"
    return f"{torch.get_num_threads()} thread(s)"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        batch, _, block = item.strip().partition("x")
        if not (batch.isdigit() and block.isdigit()) or int(batch) < 1 or int(block) < 2:
            raise SystemExit(f"error: --shapes {text!r}: each shape is BATCHxBLOCK, e.g. 12x64,12x256")
        shapes.append((int(batch), int(block)))
    return shapes


def throughput_table(args, shapes) -> str:
    reference_name = f"GPT-2 ({GPT2_LAYERS} x {GPT2_WIDTH})"
    if args.gpt2_act is not None:
        reference_name = f"GPT-2 ({GPT2_LAYERS} x {GPT2_WIDTH}, {args.gpt2_act})"
    target = parameter_count(gpt2(shapes[0][1]))
    mlp = args.intermediate_size
    widths = {rnn_type: matched_width(rnn_type, target, mlp) for rnn_type in args.rnn_types}
    # --quick: a small product, a few times (a CPU without bf16 instructions takes seconds for one 1024 x 1024).
    peak_shape = dict(size=128, repeats=2) if args.quick else {}
    peaks = {
        precision: matmul_peak_gflops(args.device, precision=precision, **peak_shape) for precision in args.precisions
    }
    peak_text = ", ".join(f"{precision} {peak:.1f}" for precision, peak in peaks.items())
    if "bf16" in args.precisions and args.cpu_without_bf16:
        peak_text += " (this CPU has no bf16 matrix instructions: bf16 runs in generic code)"
    if args.bf16_left_out:
        peak_text += " (bf16 left out: this CPU has no bf16 matrix instructions; --precisions fp32,bf16 times it)"
    lines = [
        f"torch {torch.__version__}, {device_label(args.device)}; matmul peak GFLOP/s: {peak_text}; "
        f"{args.rounds} interleaved rounds of {args.steps} steps, medians; "
        f"hybrid MLP width, activation: {mlp_label(mlp, args.hidden_act)}",
        "",
        "| model | width | params | batch x block | precision | tokens/s | vs GPT-2 | GFLOP/s | % of matmul peak |",
        "|---|--:|--:|---|---|--:|--:|--:|--:|",
    ]
    for batch, block in shapes:
        torch.manual_seed(0)
        models = [with_optimizer(reference_name, gpt2(block, args.gpt2_act), args.device)]
        for rnn_type, width in widths.items():
            for activation in args.hidden_act:  # the activation is named in the row when there are several
                cell = rnn_type if len(args.hidden_act) == 1 else f"{rnn_type} {activation}"
                model = hybrid(rnn_type, width, intermediate_size=mlp, activation=activation)
                models.append(with_optimizer(f"hybrid {cell} ({HYBRID_LAYERS} x {width})", model, args.device))
        ids = torch.randint(0, VOCAB_SIZE, (batch, block), device=args.device)
        flops = {entry.name: step_flops(entry, ids) for entry in models}
        for precision in args.precisions:
            speed = measure(models, batch, block, args.rounds, args.steps, args.warmup, precision, args.device)
            for entry in models:
                width = GPT2_WIDTH if entry.name == reference_name else int(entry.name.split(" x ")[-1].rstrip(")"))
                gflops = flops[entry.name] * speed[entry.name] / (batch * block) / 1e9
                lines.append(
                    f"| {entry.name} | {width} | {entry.parameters:,} | {batch} x {block} | {precision} | "
                    f"{speed[entry.name]:,.0f} | {speed[entry.name] / speed[reference_name]:.2f}x | {gflops:.2f} | "
                    f"{100 * gflops / peaks[precision]:.0f}% |"
                )
    return "\n".join(lines)


def chunk_size_table(args, shapes) -> str:
    """tokens/s of the mingru hybrid (width matched to GPT-2) for each scan chunk size."""
    width = matched_width("mingru", parameter_count(gpt2(shapes[0][1])), args.intermediate_size)
    lines = [
        f"scan chunk size, mingru hybrid ({HYBRID_LAYERS} x {width}, MLP width, activation "
        f"{mlp_label(args.intermediate_size, args.hidden_act)}), "
        f"{device_label(args.device)}",
        "",
        "| chunk size | " + " | ".join(f"{b} x {t} tokens/s" for b, t in shapes) + " |",
        "|--:|" + "--:|" * len(shapes),
    ]
    results = {}
    for batch, block in shapes:
        models = []
        for chunk in args.chunk_sizes:
            torch.manual_seed(0)
            model = hybrid(
                "mingru",
                width,
                chunk_size=chunk,
                intermediate_size=args.intermediate_size,
                activation=args.hidden_act[0],
            )
            models.append(with_optimizer(str(chunk), model, args.device))
        results[(batch, block)] = measure(
            models, batch, block, args.rounds, args.steps, args.warmup, device=args.device
        )
    for chunk in args.chunk_sizes:
        row = " | ".join(f"{results[shape][str(chunk)]:,.0f}" for shape in shapes)
        lines.append(f"| {chunk} | {row} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="12x64,12x256", help="batch x block sizes, comma separated")
    parser.add_argument("--rnn-types", default=",".join(RNN_TYPES), help="hybrid cells to measure, comma separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (training runs use 1 by default)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; figures are medians over them")
    parser.add_argument("--steps", type=int, default=4, help="training steps per model and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument(
        "--precisions",
        default=None,
        help="fp32 and/or bf16 (autocast, as --mixed-precision bf16), comma separated (default: both, or fp32 alone "
        "on a CPU without bf16 matrix instructions, where bf16 runs in slow generic code)",
    )
    parser.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="MLP width of every hybrid (default: 4 x width); the width is then matched to GPT-2's parameters",
    )
    parser.add_argument(
        "--hidden-act",
        default=HybridRnnLmConfig().hidden_act,
        help="MLP activation(s) of the hybrids, names of transformers' ACT2FN, comma separated (relu2 = squared ReLU); "
        "several give a row each, in the same interleaved rounds (default: the config's gelu)",
    )
    parser.add_argument(
        "--gpt2-act",
        default=None,
        help="MLP activation of the GPT-2 reference (default: transformers' gelu_new), to compare like with like",
    )
    parser.add_argument("--chunk-sizes", default=None, help="instead: compare these scan chunk sizes (mingru)")
    parser.add_argument("--device", default="cpu", help="cpu, or a GPU: cuda, cuda:1, ... (float32 without TF32)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks that it runs")
    args = parser.parse_args(argv)
    check_script_minimums(args, threads=1, rounds=1, steps=1, warmup=0)
    args.rnn_types = [name.strip() for name in args.rnn_types.split(",") if name.strip()]
    unknown = [name for name in args.rnn_types if name not in RNN_TYPES]
    if unknown:
        raise SystemExit(f"error: --rnn-types {','.join(unknown)}: not a cell; choose from {', '.join(RNN_TYPES)}")
    if args.precisions is not None:
        args.precisions = [name.strip() for name in args.precisions.split(",") if name.strip()]
        if not args.precisions or any(name not in PRECISIONS for name in args.precisions):
            raise SystemExit(f"error: --precisions {','.join(args.precisions)}: choose from {', '.join(PRECISIONS)}")
    if args.intermediate_size is not None and args.intermediate_size < 1:
        raise SystemExit(f"error: --intermediate-size {args.intermediate_size}: the MLP width must be at least 1")
    args.hidden_act = [name.strip() for name in args.hidden_act.split(",") if name.strip()]
    if not args.hidden_act:
        raise SystemExit("error: --hidden-act is empty: give one activation or more, e.g. gelu,relu2")
    unknown = [name for name in (*args.hidden_act, args.gpt2_act) if name is not None and name not in ACT2FN]
    if unknown:
        raise SystemExit(
            f"error: activation {unknown[0]!r} is not in transformers' ACT2FN; choose from {', '.join(ACT2FN)}"
        )
    if args.quick:
        args.shapes, args.rounds, args.steps, args.warmup = "2x16", 1, 1, 0
    if args.chunk_sizes is not None and len(args.hidden_act) > 1:
        raise SystemExit("error: --chunk-sizes times one model per chunk size: give one --hidden-act")
    if args.chunk_sizes is not None:
        try:
            args.chunk_sizes = [int(size) for size in args.chunk_sizes.split(",")]
        except ValueError:
            raise SystemExit(f"error: --chunk-sizes {args.chunk_sizes!r}: give integers, e.g. 4,8,16") from None
        check_script_minimums(args, chunk_sizes=1)
    args.device = script_device(args.device)
    args.cpu_without_bf16 = args.device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    args.bf16_left_out = args.precisions is None and args.cpu_without_bf16
    if args.precisions is None:
        args.precisions = ["fp32"] if args.bf16_left_out else list(PRECISIONS)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes)
    table = throughput_table(args, shapes) if args.chunk_sizes is None else chunk_size_table(args, shapes)
    print(table)


if __name__ == "__main__":
    main()
