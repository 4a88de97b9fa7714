"""The benchmark scripts run (in their tiny modes) and print their tables; their figures are not asserted."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from hybrid_rnn_lm.configuration_hybrid_rnn_lm import RNN_TYPES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str, monkeypatch=None):
    """A benchmark script as a module; `monkeypatch` registers it in sys.modules while it runs, which dataclasses of
    a script with `from __future__ import annotations` need."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_training_throughput_prints_a_row_per_cell_and_the_gpt2_reference(capsys):
    """Every cell and GPT-2, in float32 and under bf16 autocast; each precision's ratio is to its own GPT-2 row."""
    benchmark = load("training_throughput")
    benchmark.main(["--quick", "--precisions", "fp32,bf16"])
    out = capsys.readouterr().out
    header = (
        "| model | width | params | batch x block | precision | tokens/s | vs GPT-2 | GFLOP/s | % of matmul peak |"
    )
    assert header in out
    rows = [line for line in out.splitlines() if line.startswith("| GPT-2") or line.startswith("| hybrid")]
    assert len(rows) == 2 * (1 + len(RNN_TYPES))
    for precision, group in zip(["fp32", "bf16"], (rows[: len(rows) // 2], rows[len(rows) // 2 :])):
        assert {row.split("|")[5].strip() for row in group} == {precision}
        assert group[0].startswith("| GPT-2") and group[0].split("|")[7].strip() == "1.00x"
        assert [row.split("|")[1].split()[1] for row in group[1:]] == list(RNN_TYPES)


@pytest.mark.parametrize("native", [True, False], ids=["bf16-instructions", "none"])
def test_training_throughput_times_bf16_by_default_only_where_the_cpu_has_bf16_instructions(
    native, capsys, monkeypatch
):
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    benchmark = load("training_throughput")
    benchmark.main(["--quick", "--rnn-types", "mingru"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| GPT-2") or line.startswith("| hybrid")]
    assert [row.split("|")[5].strip() for row in rows] == (["fp32"] * 2 + ["bf16"] * 2 if native else ["fp32"] * 2)
    assert ("bf16 left out: this CPU has no bf16 matrix instructions" in out) is not native


def test_training_throughput_matches_parameters_within_ten_percent():
    benchmark = load("training_throughput")
    target = benchmark.parameter_count(benchmark.gpt2(64))
    for rnn_type in RNN_TYPES:
        width = benchmark.matched_width(rnn_type, target)
        count = benchmark.parameter_count(benchmark.hybrid(rnn_type, width))
        assert abs(count - target) <= 0.1 * target, (rnn_type, width, count, target)


def test_training_throughput_times_another_mlp_width_at_the_matched_parameter_count(capsys):
    """--intermediate-size fixes every hybrid's MLP width; the width is matched to GPT-2 with that MLP."""
    benchmark = load("training_throughput")
    target = benchmark.parameter_count(benchmark.gpt2(64))
    width = benchmark.matched_width("mingru", target, intermediate_size=448)
    model = benchmark.hybrid("mingru", width, intermediate_size=448)
    assert model.config.intermediate_size == 448 and width != benchmark.matched_width("mingru", target)
    assert abs(benchmark.parameter_count(model) - target) <= 0.1 * target
    benchmark.main(["--quick", "--rnn-types", "mingru", "--precisions", "fp32", "--intermediate-size", "448"])
    out = capsys.readouterr().out
    assert "hybrid MLP width, activation: 448, gelu" in out and f"| hybrid mingru (3 x {width}) | {width} |" in out
    with pytest.raises(SystemExit, match="--intermediate-size 0: the MLP width must be at least 1"):
        benchmark.main(["--quick", "--intermediate-size", "0"])


def test_training_throughput_times_other_activations_for_the_hybrids_and_for_gpt2(capsys):
    """--hidden-act sets the hybrids' MLP activation (several: a row each, in the same rounds), --gpt2-act the
    reference's; the table names them."""
    benchmark = load("training_throughput")
    assert benchmark.hybrid("mingru", 64, activation="relu2").config.hidden_act == "relu2"
    assert benchmark.gpt2(64, "relu2").config.activation_function == "relu2"
    assert benchmark.gpt2(64).config.activation_function == "gelu_new"
    benchmark.main(["--quick", "--rnn-types", "mingru,gru", "--precisions", "fp32", "--hidden-act", "gelu,relu2"])
    out = capsys.readouterr().out
    assert "hybrid MLP width, activation: 4 x width, gelu / relu2" in out and "| GPT-2 (4 x 128) |" in out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| hybrid")]
    assert [row.split(" (")[0] for row in rows] == [
        "hybrid mingru gelu",
        "hybrid mingru relu2",
        "hybrid gru gelu",
        "hybrid gru relu2",
    ]
    benchmark.main(["--quick", "--rnn-types", "mingru", "--precisions", "fp32", "--gpt2-act", "relu2"])
    out = capsys.readouterr().out
    assert "hybrid MLP width, activation: 4 x width, gelu" in out and "| GPT-2 (4 x 128, relu2) | 128 |" in out
    with pytest.raises(SystemExit, match="activation 'swiglu' is not in transformers' ACT2FN"):
        benchmark.main(["--quick", "--hidden-act", "relu2,swiglu"])
    with pytest.raises(SystemExit, match="--chunk-sizes times one model per chunk size: give one --hidden-act"):
        benchmark.main(["--quick", "--hidden-act", "gelu,relu2", "--chunk-sizes", "4,8"])


def test_training_throughput_rejects_an_unknown_cell():
    benchmark = load("training_throughput")
    with pytest.raises(SystemExit, match="--rnn-types transformer: not a cell"):
        benchmark.main(["--quick", "--rnn-types", "transformer"])


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu0", "--device 'gpu0' is not a device; use cpu, cuda or cuda:N"),
        ("meta", "--device meta: this benchmark runs on cpu or cuda"),
        ("cuda", "--device cuda: no CUDA GPU is available here; use --device cpu"),
    ],
)
def test_training_throughput_rejects_a_device_it_cannot_run_on(device, message, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    benchmark = load("training_throughput")
    with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}$"):
        benchmark.main(["--quick", "--device", device])


def test_training_throughput_rejects_an_unknown_precision():
    benchmark = load("training_throughput")
    with pytest.raises(SystemExit, match="--precisions fp16: choose from fp32, bf16"):
        benchmark.main(["--quick", "--precisions", "fp16"])


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("training_throughput", ["--threads", "0"], "--threads 0: must be at least 1"),
        ("training_throughput", ["--rounds", "0"], "--rounds 0: must be at least 1"),
        ("training_throughput", ["--warmup", "-1"], "--warmup -1: must be at least 0"),
        ("training_throughput", ["--chunk-sizes", "4,eight"], "--chunk-sizes '4,eight': give integers, e.g. 4,8,16"),
        ("generation_benchmark", ["--contexts", "128", "0"], "--contexts 0: must be at least 1"),
        ("generation_benchmark", ["--new-tokens", "0"], "--new-tokens 0: must be at least 1"),
        (
            "loss_by_position",
            ["--model", "a=b", "--dataset", "x", "--output-dir", "o", "--positions", "1"],
            "--positions 1: must be at least 2",
        ),
        ("generation_benchmark", ["--device", "gpu0"], "--device 'gpu0' is not a device; use cpu, cuda or cuda:N"),
        (
            "generation_benchmark",
            ["--quick", "--contexts", "4096"],
            "--quick measures contexts up to 1024 tokens; --contexts [4096] has none",
        ),
        (
            "loss_by_position",
            ["--model", "gru", "--dataset", "x", "--output-dir", "o"],
            "--model 'gru': give LABEL=FOLDER, e.g. --model gru=runs/gru",
        ),
        (
            "loss_by_position",
            ["--model", "gru=nowhere", "--dataset", "x", "--output-dir", "o"],
            "--model gru=nowhere: nowhere has no training_args.yaml (the block size the model was trained at); pass "
            "an output folder of `hybrid-lm train`",
        ),
        ("tokenization_throughput", ["--block-size", "1"], "--block-size 1: must be at least 2"),
        ("tokenization_throughput", ["--bpe-vocab-size", "10"], "--bpe-vocab-size 10: must be at least 259"),
    ],
)
def test_the_benchmarks_refuse_bad_arguments_in_one_line_before_any_work(script, argv, message, monkeypatch, tmp_path):
    """Before the checks these ended in tracebacks (torch's set_num_threads, an empty median, an empty prompt, a
    missing file) or, for loss_by_position, an empty output folder."""
    monkeypatch.chdir(tmp_path)  # nothing may be written, even a folder
    monkeypatch.setattr("sys.argv", [f"{script}.py", *argv])
    benchmark = load(script, monkeypatch)
    with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}$"):
        benchmark.main() if script == "generation_benchmark" else benchmark.main(argv)
    assert not list(tmp_path.iterdir())
