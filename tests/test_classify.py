"""hybrid-lm finetune-classify: starts from the causal checkpoint, beats the majority baseline, saves a loadable
classifier; bidirectional encoders get new reverse weights and are refused as causal LMs; clear input errors."""

import csv
import json
import random
import re
from pathlib import Path

import evaluate
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hybrid_rnn_lm import HybridRnnLmForCausalLM, HybridRnnLmForSequenceClassification
from tests.test_generate_cli import error_line, run_cli, save_tiny_model, single_thread  # noqa: F401
from tests.test_modeling import tiny_config
from training.classify import METRIC_PATH, load_classifier

pytestmark = pytest.mark.usefixtures("single_thread")

FILLER = "the a movie film plot actor scene story music ending was is very quite rather".split()


def reviews(count: int, seed: int) -> list[dict]:
    """Separable data: the label is whether "good" or "bad" appears, among random filler words; ~60% positive."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = "positive" if rng.random() < 0.6 else "negative"
        before = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 4)))
        after = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 2)))
        rows.append({"text": f"{before} {'good' if label == 'positive' else 'bad'} {after}".strip(), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("classify")
    train, validation = reviews(160, seed=1), reviews(60, seed=2)
    text = " ".join(row["text"] for row in train + validation)
    return {
        "model": save_tiny_model(folder / "model", text=text),
        "train": write_csv(folder / "train.csv", train),
        "validation": write_jsonl(folder / "validation.jsonl", validation),
    }


def finetune_args(data, output_dir: Path, *extra: str) -> list[str]:
    return [
        "finetune-classify", "--model", str(data["model"]), "--train", str(data["train"]),
        "--validation", str(data["validation"]), "--output-dir", str(output_dir),
        "--epochs", "3", "--learning-rate", "3e-3", *extra,
    ]  # fmt: skip


def accuracy_of(folder: Path, rows: list[dict]) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer([row["text"] for row in rows], add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    return sum(model.config.id2label[p] == row["label"] for p, row in zip(predicted, rows)) / len(rows)


@pytest.mark.xdist_group("training")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_finetuned_classifier_beats_the_majority_baseline(data, tmp_path, capsys, caplog, bidirectional):
    output_dir = tmp_path / "classifier"
    code, out, err = run_cli(capsys, *finetune_args(data, output_dir, *(["--bidirectional"] if bidirectional else [])))
    assert code == 0, err
    results = json.loads((output_dir / "results.json").read_text())
    validation = [json.loads(line) for line in data["validation"].read_text().splitlines()]
    majority = sum(row["label"] == "positive" for row in validation) / len(validation)
    assert results["majority_label"] == "positive"
    assert results["majority_baseline_accuracy"] == pytest.approx(majority)
    assert results["validation_accuracy"] >= majority + 0.2, results
    assert f"| validation accuracy | {results['validation_accuracy']:.4f} |" in out
    # The folder loads like any classifier, with the label names, and predicts as reported.
    config = AutoModelForSequenceClassification.from_pretrained(output_dir).config
    assert config.id2label == {0: "negative", 1: "positive"} and config.label2id == {"negative": 0, "positive": 1}
    assert config.bidirectional is bidirectional
    assert accuracy_of(output_dir, validation) == pytest.approx(results["validation_accuracy"])
    if bidirectional:
        assert "model.layers.0.rnn.rnn.weight_hh_l0_reverse" in caplog.text  # the log names the new weights
        assert "model.layers.0.rnn.rnn.weight_hh_l0_reverse" in results["new_weights"]
    check_classifier_card(output_dir, results, validation, bidirectional)


def check_classifier_card(folder: Path, results: dict, validation: list[dict], bidirectional: bool) -> None:
    """The folder's README.md is a classifier's card, and its snippet, run as written where the package cannot be
    imported, classifies the card's example as the model does."""
    from huggingface_hub import ModelCard

    from tests.isolation import run_without_package

    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "text-classification" and "text-classification" in card.data.tags
    assert "2 labels: `negative`, `positive`" in card.text
    assert ("in both directions" in card.text) is bidirectional
    accuracy = f"| Validation accuracy | {results['validation_accuracy']:.4f} |"
    baseline = f"| Majority-label baseline (always `positive`) | {results['majority_baseline_accuracy']:.4f} |"
    assert accuracy in card.text and baseline in card.text
    assert f"| Training examples | {results['train_examples']:,} |" in card.text
    assert f"language model `{Path(results['model']).name}`" in card.text
    assert validation[0]["text"] not in card.text  # the card publishes no example of the user's data
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    code = (
        "import contextlib, io, json\n"
        "printed = io.StringIO()\n"
        "with contextlib.redirect_stdout(printed):\n"
        + "".join(f"    {line}\n" for line in snippet.splitlines())
        + "print(json.dumps({'printed': printed.getvalue()}))\n"
    )
    printed = run_without_package(code, cwd=folder.parent)["printed"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    example = re.search(r"print\(classifier\((.*)\)\)", snippet).group(1)
    ids = AutoTokenizer.from_pretrained(folder)(json.loads(example), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probabilities = model(input_ids=ids).logits.softmax(-1)[0]
    label = model.config.id2label[int(probabilities.argmax())]
    assert printed.startswith(f"[{{'label': '{label}', 'score': ") and printed.strip().endswith("}]"), printed
    score = float(printed.split("'score': ")[1].split("}")[0])
    assert score == pytest.approx(float(probabilities.max()), abs=1e-5)


def lm_state(data) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(data["model"]).state_dict()


def test_classifier_starts_from_the_causal_checkpoint(data):
    lm = lm_state(data)
    model, new = load_classifier(data["model"], ["a", "b", "c"], bidirectional=False, pad_token_id=0)
    state = model.state_dict()
    assert new == ["score.weight"]
    backbone = [name for name in state if name.startswith("model.")]
    assert backbone and set(backbone) == {name for name in lm if name.startswith("model.")}
    for name in backbone:
        assert torch.equal(state[name], lm[name]), name
    assert state["score.weight"].shape == (3, model.config.hidden_size)
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_bidirectional_encoder_keeps_forward_weights_and_initialises_reverse_ones(data):
    lm = lm_state(data)
    model, new = load_classifier(data["model"], ["a", "b"], bidirectional=True, pad_token_id=0)
    state, hidden = model.state_dict(), model.config.hidden_size
    assert model.config.bidirectional and not model.config.is_causal
    reverse = [name for name in state if name.endswith("_reverse")]
    assert len(reverse) == 4 * model.config.num_hidden_layers  # weight_ih, weight_hh, bias_ih, bias_hh per block
    assert set(reverse) <= set(new)
    for name in reverse:  # initialised: finite, and the weights are not all zero
        assert torch.isfinite(state[name]).all(), name
    assert all(state[name].abs().sum() > 0 for name in reverse if "weight" in name)
    for index in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{index}.rnn"
        out_proj = state[f"{prefix}.out_proj.weight"]
        assert out_proj.shape == (hidden, 2 * hidden)
        assert torch.equal(out_proj[:, :hidden], lm[f"{prefix}.out_proj.weight"])  # forward columns kept
        assert torch.equal(state[f"{prefix}.rnn.weight_hh_l0"], lm[f"{prefix}.rnn.weight_hh_l0"])


def test_bidirectional_encoder_is_refused_as_a_causal_lm(data, tmp_path, capsys):
    config = tiny_config("gru", "all-attention", bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional=True cannot be used for a causal language model"):
        HybridRnnLmForCausalLM(config)
    encoder_dir = tmp_path / "encoder"
    HybridRnnLmForSequenceClassification(config).save_pretrained(encoder_dir)
    AutoTokenizer.from_pretrained(data["model"]).save_pretrained(encoder_dir)
    with pytest.raises(ValueError, match="bidirectional=True cannot be used for a causal language model"):
        AutoModelForCausalLM.from_pretrained(encoder_dir)
    for command in (["generate", "--prompt", "good"], ["eval", "--dataset", str(data["train"])], ["serve"]):
        code, _, err = run_cli(capsys, command[0], "--model", str(encoder_dir), *command[1:])
        assert code == 2
        assert error_line(err) == (
            f"error: {encoder_dir} holds a bidirectional encoder (config.bidirectional=True), which sees the future "
            "and cannot generate or score text left to right; pass a causal language model folder"
        )


def test_a_causal_classifier_as_a_language_model_comes_with_a_warning(data, tmp_path, capsys, caplog):
    """generate / eval on a classifier's folder run its backbone with the tied output layer, and say so."""
    classifier_dir = tmp_path / "classifier"
    model, _ = load_classifier(data["model"], ["a", "b"], bidirectional=False, pad_token_id=0)
    model.save_pretrained(classifier_dir)
    AutoTokenizer.from_pretrained(data["model"]).save_pretrained(classifier_dir)
    code, out, err = run_cli(capsys, "generate", "--model", str(classifier_dir), "--prompt", "good", "--greedy")
    assert code == 0, err
    warning = (
        f"{classifier_dir} holds a text classifier (HybridRnnLmForSequenceClassification): its text comes from the "
        "output layer tied to the input embeddings, which the classification fine-tuning changed; for text, pass the "
        "language model it was fine-tuned from"
    )
    assert warning in caplog.text
    caplog.clear()
    code, _, err = run_cli(capsys, "generate", "--model", str(data["model"]), "--prompt", "good", "--greedy")
    assert code == 0 and "text classifier" not in caplog.text
    # Saved from Python, without finetune-classify's results.json: still a classifier's card, which says so.
    code, _, err = run_cli(capsys, "card", str(classifier_dir))
    assert code == 0, err
    card = (classifier_dir / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "2 labels: `a`, `b`" in card
    assert "holds no record of its fine-tuning" in card and "No evaluation results were recorded" in card


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label_column": "sentiment"}, "has no column 'sentiment' (its columns: text, label); pass the right one "
         "with --label-column"),
        ({"text_column": "review"}, "has no column 'review' (its columns: text, label); pass the right one with "
         "--text-column"),
        ({"one_label": True}, "has a single label ('positive') in column 'label': a classifier needs examples of at "
         "least two labels"),
        ({"unknown_validation_label": True}, "the validation data has labels the training data never shows (neutral)"),
        ({"train_suffix": ".xlsx"}, "unsupported format .xlsx; use a .csv or .jsonl file"),
        ({"header_only": True}, "holds no examples: add rows with a text and a label"),
        ({"empty_validation": True}, "holds no examples: add rows with a text and a label"),
    ],
    ids=["missing-label-column", "missing-text-column", "one-label", "unknown-validation-label", "bad-format",
         "csv-header-without-rows", "empty-jsonl"],
)  # fmt: skip
def test_bad_input_is_one_line_error_and_writes_nothing(data, tmp_path, capsys, change, message):
    rows = reviews(30, seed=3)
    if change.get("one_label"):
        rows = [{**row, "label": "positive"} for row in rows]
    train = write_csv(tmp_path / f"train{change.get('train_suffix', '.csv')}", rows)
    if change.get("header_only"):
        train.write_text("text,label\n\n")
    validation = reviews(10, seed=4)
    if change.get("unknown_validation_label"):
        validation[0]["label"] = "neutral"
    validation_file = write_jsonl(tmp_path / "validation.jsonl", validation)
    if change.get("empty_validation"):
        validation_file.write_text("\n")
    output_dir = tmp_path / "out"
    argv = ["finetune-classify", "--model", str(data["model"]), "--train", str(train)]
    argv += ["--validation", str(validation_file), "--output-dir", str(output_dir)]
    for option in ("label_column", "text_column"):
        if option in change:
            argv += [f"--{option.replace('_', '-')}", change[option]]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in error_line(err)
    assert not output_dir.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "nan"], "option epochs must be a finite number, got nan"),
        (["--learning-rate", "inf"], "option learning_rate must be a finite number, got inf"),
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--seed", str(2**32)], "--seed must be in [0, 2**32), got 4294967296"),
    ],
    ids=["epochs-nan", "learning-rate-inf", "negative-seed", "seed-too-large"],
)
def test_bad_training_options_are_one_line_errors_before_anything_loads(tmp_path, capsys, flags, message):
    model_dir = save_tiny_model(tmp_path / "model")
    train = write_csv(tmp_path / "train.csv", reviews(30, seed=3))
    output_dir = tmp_path / "out"
    argv = ["finetune-classify", "--model", str(model_dir), "--train", str(train), "--output-dir", str(output_dir)]
    code, _, err = run_cli(capsys, *argv, *flags)
    assert code == 2
    assert message in error_line(err)
    assert not output_dir.exists()


def test_overwrite_replaces_a_classifier_but_never_the_model_or_files_it_did_not_write(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "runs" / "model")
    train = write_csv(tmp_path / "train.csv", reviews(30, seed=3))

    def finetune(output_dir: Path, model: Path = model_dir) -> tuple[int, str]:
        argv = ["finetune-classify", "--model", str(model), "--train", str(train), "--output-dir", str(output_dir)]
        code, _, err = run_cli(capsys, *argv, "--epochs", "1", "--overwrite-output-dir")
        return code, err

    def contents(folder: Path) -> dict[str, bytes]:
        return {str(path): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}

    before = contents(tmp_path / "runs")
    for output_dir in (model_dir, tmp_path / "runs"):  # the model itself, and a folder above it
        code, err = finetune(output_dir)
        assert code == 2
        assert error_line(err) == (
            f"error: --output-dir {output_dir} holds the model being fine-tuned ({model_dir}), which replacing it "
            "would delete; choose another --output-dir"
        )
    assert contents(tmp_path / "runs") == before

    foreign = tmp_path / "out" / "notes.txt"
    foreign.parent.mkdir()
    foreign.write_text("mine")
    code, err = finetune(foreign.parent)
    assert code == 2
    assert "also holds files that no hybrid-lm command wrote (notes.txt); nothing was deleted" in error_line(err)
    assert foreign.read_text() == "mine"

    classifier = tmp_path / "classifier"
    assert finetune(classifier)[0] == 0
    first = contents(classifier)
    assert finetune(classifier)[0] == 0  # a previous classifier is replaced
    assert contents(classifier).keys() == first.keys()


def test_accuracy_metric_loads_by_path_and_counts_correctly():
    metric = evaluate.load(str(METRIC_PATH))
    assert metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}
    weighted = metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], sample_weight=[1, 1, 2, 0])
    assert weighted == {"accuracy": 0.5}
    assert metric.compute(predictions=[2, 2, 1], references=[2, 0, 1], normalize=False) == {"accuracy": 2.0}
