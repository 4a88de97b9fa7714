"""hybrid-lm eval: reproduces the training run's validation loss, matches a direct computation, clear errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_generate_cli import error_line, run_cli, save_tiny_model, single_thread  # noqa: F401
from training.arguments import arguments_from_dict
from training.data import load_corpus, tokenize_corpus
from training.generate import load_model_and_tokenizer
from training.train import run_training

pytestmark = pytest.mark.usefixtures("single_thread")

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def shakespeare_slice(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"real data missing: {SHAKESPEARE} (the shared tinyshakespeare corpus beside the checkout)")
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000])
    return path


@pytest.mark.xdist_group("training")
def test_eval_reproduces_the_training_validation_loss(shakespeare_slice, tmp_path, capsys):
    run_dir = tmp_path / "run"
    options = {
        "dataset": str(shakespeare_slice),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "block_size": 32,
        "batch_size": 8,
        "max_steps": 6,
        "eval_steps": 3,
        "eval_batches": 0,  # the whole validation split, as eval does by default
        "warmup_steps": 1,
        "learning_rate": 1e-2,
        "sample_tokens": 0,
        "checkpoint_steps": 0,
        "output_dir": str(run_dir),
    }
    results = run_training(*arguments_from_dict(options))
    output = tmp_path / "eval.json"
    # Dataset, block size and batch size come from the run's training_args.yaml.
    code, out, err = run_cli(capsys, "eval", "--model", str(run_dir), "--output", str(output))
    assert code == 0, err
    measured = json.loads(output.read_text())
    assert measured["dataset"] == str(shakespeare_slice) and measured["block_size"] == 32
    assert measured["loss"] == pytest.approx(results["best_val_loss"], abs=1e-5)
    assert measured["perplexity"] == pytest.approx(results["val_perplexity"], rel=1e-5)
    assert measured["bits_per_token"] == pytest.approx(results["val_bits_per_token"], abs=1e-5)
    assert measured["bits_per_character"] == pytest.approx(results["val_bits_per_char"], abs=1e-5)
    assert f"| loss (nats/token) | {measured['loss']:.6f} |" in out
    # The run's own full-split evaluation of its best model says the same.
    assert measured["loss"] == pytest.approx(results["full_validation"]["loss"], abs=1e-5)
    assert measured["blocks"] == results["full_validation"]["blocks"]


def test_eval_on_another_corpus_matches_a_direct_computation(tmp_path, capsys):
    documents = [
        "Speak, speak. You are all resolved rather to die than to famish?",
        "First, you know Caius Marcius is chief enemy to the people.",
        "We know't, we know't. Let us kill him, and we'll have corn at our own price.",
    ] * 8
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"body": text}) + "\n" for text in documents))
    model_dir = save_tiny_model(tmp_path / "model", text=" ".join(documents))
    argv = ["--dataset", str(corpus_file), "--text-column", "body", "--validation-fraction", "0.25"]
    argv += ["--block-size", "16", "--batch-size", "3", "--max-batches", "2"]
    code, _, err = run_cli(capsys, "eval", "--model", str(model_dir), *argv, "--output", str(tmp_path / "e.json"))
    assert code == 0, err
    measured = json.loads((tmp_path / "e.json").read_text())

    model, tokenizer = load_model_and_tokenizer(model_dir)
    corpus = load_corpus(str(corpus_file), text_column="body", validation_fraction=0.25)
    tokenized = tokenize_corpus(corpus, tokenizer, 16)
    ids = torch.tensor(tokenized["validation"]["input_ids"][:6], dtype=torch.long)  # 2 batches of 3 blocks
    with torch.no_grad():
        logits = model(ids).logits
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum").item()
    tokens = ids[:, 1:].numel()
    stats = tokenized.stats["validation"]
    assert measured["tokens_evaluated"] == tokens == 6 * 15
    assert measured["loss"] == pytest.approx(nll / tokens, abs=1e-5)
    assert measured["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    expected_bpc = nll / tokens * stats.tokens / stats.characters / math.log(2)
    assert measured["bits_per_character"] == pytest.approx(expected_bpc, abs=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--dataset is needed: {model} has no training_args.yaml naming the data it was trained on"),
        (
            ["--dataset", "python-docs", "--split", "test"],
            "--split 'test' is not known; choose one of: validation, train",
        ),
        (
            ["--dataset", "{corpus}", "--block-size", "5000"],
            "the block size (5000 tokens) is longer than the validation split",
        ),
        (["--dataset", "python-docs", "--output", "{missing}/e.json"], "its folder does not exist"),
        (["--dataset", "{corpus}", "--block-size", "1"], "--block-size 1 leaves nothing to predict"),
        (["--dataset", "{corpus}", "--stride", "0"], "--stride must be a positive integer, got 0"),
        (
            ["--dataset", "{corpus}", "--block-size", "16", "--stride", "16"],
            "--stride 16 is not smaller than the block size 16: a window of 16 tokens scores 15 predictions, so some "
            "tokens would never be scored; use --stride <= 15",
        ),
    ],
    ids=[
        "no-dataset",
        "unknown-split",
        "block-too-large",
        "output-folder-missing",
        "block-size-1",
        "stride-0",
        "stride-too-large",
    ],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, argv, message):
    model_dir = save_tiny_model(tmp_path / "model")
    corpus = tmp_path / "small.txt"
    corpus.write_text("Speak, speak.\n" * 40)
    fill = {"model": model_dir, "corpus": corpus, "missing": tmp_path / "missing"}
    argv = [item.format(**fill) for item in argv]
    code, out, err = run_cli(capsys, "eval", "--model", str(model_dir), *argv)
    assert code == 2
    assert message.format(**fill) in error_line(err)
    assert not (tmp_path / "missing").exists()


def test_an_output_file_is_replaced_only_when_it_holds_a_previous_result(tmp_path, capsys):
    """Results go over an earlier eval's results; any other existing file (another model's config.json, notes) stays."""
    model_dir = save_tiny_model(tmp_path / "model")
    other_dir = save_tiny_model(tmp_path / "other")
    corpus = tmp_path / "small.txt"
    corpus.write_text("Speak, speak.\n" * 40)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for target in (other_dir / "config.json", notes):
        before = target.read_bytes()
        code, out, err = run_cli(
            capsys, "eval", "--model", str(model_dir), "--dataset", str(corpus), "--output", str(target)
        )
        assert code == 2 and "perplexity" not in out
        assert error_line(err) == (
            f"error: --output {target} exists and is not the result of a previous `hybrid-lm eval`, which alone is "
            "replaced; pick a new file, or move that one away first"
        )
        assert target.read_bytes() == before
    results = tmp_path / "eval.json"
    for block_size in ("16", "8"):  # the second run replaces the first one's results
        code, _, err = run_cli(
            capsys, "eval", "--model", str(model_dir), "--dataset", str(corpus), "--output", str(results),
            "--block-size", block_size,
        )  # fmt: skip
        assert code == 0, err
        assert json.loads(results.read_text())["block_size"] == int(block_size)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("{model}", "--output {model} is a folder; pass a file path such as {model}/eval.json"),
        ("{model}/config.json", "would replace the evaluated model's own config.json; pick another file"),
        ("{model}/model.safetensors", "would replace the evaluated model's own model.safetensors"),
    ],
    ids=["folder", "model-config", "model-weights"],
)
def test_an_output_that_would_lose_the_results_or_the_model_is_refused_before_evaluating(
    tmp_path, capsys, output, message
):
    model_dir = save_tiny_model(tmp_path / "model")
    before = {path.name: path.read_bytes() for path in model_dir.iterdir()}
    corpus = tmp_path / "small.txt"
    corpus.write_text("Speak, speak.\n" * 40)
    output = output.format(model=model_dir)
    code, out, err = run_cli(capsys, "eval", "--model", str(model_dir), "--dataset", str(corpus), "--output", output)
    assert code == 2
    assert message.format(model=model_dir) in error_line(err)
    assert "perplexity" not in out  # refused before evaluating
    assert {path.name: path.read_bytes() for path in model_dir.iterdir()} == before


@pytest.mark.parametrize(("count", "block", "stride"), [(50, 8, 3), (50, 8, 7), (50, 8, 1), (42, 8, 2), (5, 8, 4)])
def test_sliding_windows_score_every_token_once_with_at_least_block_minus_stride_context(count, block, stride):
    from training.streams import sliding_layout

    stream = np.arange(1, count + 1)  # token i + 1 is the i-th target: its value says where it is
    layout = sliding_layout(stream, block, stride, prefix_id=0)
    full = np.concatenate([[0], stream])
    inputs, targets, scored = layout.inputs.numpy(), layout.targets.numpy(), layout.scored.numpy()
    assert inputs.shape[1] == min(block - 1, count)  # a block of `block` tokens: block - 1 predictions
    np.testing.assert_array_equal(targets, inputs + 1)  # each position predicts the next token of the stream
    assert sorted(targets[scored].tolist()) == full[1:].tolist()  # every token scored exactly once
    for window, mask in zip(inputs, scored):
        assert (np.diff(window) == 1).all()  # a window is a contiguous piece of the stream
        context = np.arange(1, len(window) + 1)[mask]  # tokens read before each scored prediction
        first_window = window[0] == 0
        assert first_window or context.min() >= block - stride


@pytest.mark.parametrize("architecture", ["hybrid", "gpt2"])
def test_sliding_evaluation_with_stride_1_gives_every_token_its_longest_context(architecture):
    """Stride 1 is the obviously correct reading: each token predicted from the block_size - 1 tokens before it (all
    of them near the start), one forward pass per token, as a training block of block_size tokens predicts its last."""
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel

    from hybrid_rnn_lm import HybridRnnLmConfig, HybridRnnLmForCausalLM
    from training.streams import evaluate_sliding

    torch.manual_seed(0)
    if architecture == "gpt2":
        config = GPT2Config(vocab_size=11, n_embd=16, n_layer=2, n_head=2, n_positions=8)
        model = GPT2LMHeadModel(config)
    else:
        config = HybridRnnLmConfig(vocab_size=11, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
        model = HybridRnnLmForCausalLM(config)
    model.eval()
    stream = np.random.default_rng(0).integers(0, 10, size=29)
    full = torch.tensor(np.concatenate([[10], stream]))  # 10: the prefix (EOS) id
    block = 8
    total = 0.0
    with torch.no_grad():
        for target in range(len(stream)):
            context = full[max(0, target + 2 - block) : target + 1]
            logits = model(input_ids=context[None]).logits[0, -1]
            total += F.cross_entropy(logits, full[target + 1]).item()
    reference = total / len(stream)
    for stride, rows in ((1, 5), (3, 4), (7, 16)):
        result = evaluate_sliding(
            Accelerator(), model, stream, block_size=block, stride=stride, rows=rows, prefix_id=10
        )
        assert result["tokens"] == len(stream)
        if stride == 1:
            assert result["loss"] == pytest.approx(reference, abs=1e-5)
        else:  # less context for some tokens than at stride 1
            assert result["loss"] != pytest.approx(reference, abs=1e-5)
    if architecture == "gpt2":  # a block's last position never predicts in training: the reading never uses it
        with torch.no_grad():
            model.transformer.wpe.weight[block - 1] = 1e3
        result = evaluate_sliding(Accelerator(), model, stream, block_size=block, stride=1, rows=5, prefix_id=10)
        assert result["loss"] == pytest.approx(reference, abs=1e-5)


def test_eval_stride_adds_a_sliding_window_column(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Speak, speak. You are all resolved rather to die than to famish?\n" * 30)
    model_dir = save_tiny_model(tmp_path / "model", text=corpus.read_text())
    argv = ["--dataset", str(corpus), "--block-size", "16", "--batch-size", "4", "--stride", "8"]
    code, out, err = run_cli(capsys, "eval", "--model", str(model_dir), *argv, "--output", str(tmp_path / "e.json"))
    assert code == 0, err
    measured = json.loads((tmp_path / "e.json").read_text())
    sliding, stream = measured["sliding"], measured["stream"]
    assert sliding["stride"] == 8 and sliding["tokens"] == stream["tokens"]  # every token of the split, once
    assert "| metric | block by block" in out and "| streamed, state carried | sliding window, stride 8 |" in out
    assert f"| loss (nats/token) | {measured['loss']:.6f} | {stream['loss']:.6f} | {sliding['loss']:.6f} |" in out
