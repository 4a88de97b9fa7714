"""hybrid-lm eval: reproduces the training run's validation loss, matches a direct computation, clear errors."""

import json
import math
from pathlib import Path

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
        (["--dataset", "{corpus}", "--block-size", "5000"], "block_size 5000 is larger than the validation split"),
        (["--dataset", "python-docs", "--output", "{missing}/e.json"], "its folder does not exist"),
    ],
    ids=["no-dataset", "unknown-split", "block-too-large", "output-folder-missing"],
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
