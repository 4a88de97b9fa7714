"""`hybrid-lm finetune-classify`: fine-tune a saved language model as a text classifier with `transformers.Trainer`.

The classifier starts from the causal checkpoint: its blocks and embeddings are the language model's, only the
`score` head is new. `--bidirectional` turns it into an encoder (bidirectional recurrence, non-causal
attention): each block's reverse-direction RNN weights are new and initialised, its `out_proj` keeps the
pretrained forward columns and gains fresh reverse columns; the log lists them. Accuracy comes from the
`accuracy` metric shipped in training/metrics, loaded by path. The output folder loads with
`AutoModelForSequenceClassification.from_pretrained` (labels in id2label/label2id) and is written only when
training finished.
"""

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from training.arguments import arg, check_seed, check_types
from training.card import write_card
from training.errors import UserError
from training.generate import check_model_folder, check_tokenizer_fits, load_pretrained, parse_command

logger = logging.getLogger(__name__)

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "accuracy"
TABLE_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json"}
MAX_LENGTH_CAP = 512


@dataclass
class ClassifyArguments:
    """Which model, which labelled data, how to train."""

    model: str = arg(help="a saved causal language model folder (output of `hybrid-lm train`)")
    train: str = arg(help="training examples: a .csv or .jsonl file with a text and a label column")
    output_dir: str = arg(help="folder for the fine-tuned classifier (from_pretrained-ready) and results.json")
    validation: str | None = arg(None, "validation examples (.csv/.jsonl); unset = hold out 10%% of --train")
    text_column: str = arg("text", "column holding the text")
    label_column: str = arg("label", "column holding the label (strings or integers)")
    epochs: float = arg(3.0, "passes over the training examples")
    learning_rate: float = arg(1e-3, "peak learning rate (AdamW, linear decay)")
    batch_size: int = arg(16, "examples per batch")
    max_length: int | None = arg(
        None, f"truncate texts to this many tokens; unset = the tokenizer's, at most {MAX_LENGTH_CAP}"
    )
    bidirectional: bool = arg(False, "encoder use: bidirectional RNN and non-causal attention (new reverse weights)")
    seed: int = arg(42, "seed of the new weights and of the data order")
    overwrite_output_dir: bool = arg(False, "replace an existing --output-dir")

    def __post_init__(self):
        check_types(self)
        check_seed(self.seed)
        if self.epochs <= 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning-rate must be > 0, got {self.learning_rate}; pick e.g. 1e-3")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 1:
            raise UserError(f"--max-length must be a positive integer, got {self.max_length}")


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------


@dataclass
class LabelledData:
    train: Dataset  # columns: text, label (label = class id)
    validation: Dataset
    labels: list[str]  # class id -> name


def _has_rows(file: Path, header: bool) -> bool:
    """Whether the file has a non-blank line past its header (reads only that far)."""
    needed = 2 if header else 1
    with file.open("rb") as stream:
        for line in stream:
            needed -= bool(line.strip())
            if needed == 0:
                return True
    return False


def read_table(path: str, flag: str) -> Dataset:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{flag} {path} does not exist: give a .csv or .jsonl file")
    builder = TABLE_FORMATS.get(file.suffix.lower())
    if builder is None:
        raise UserError(f"{flag} {path}: unsupported format {file.suffix or '(none)'}; use a .csv or .jsonl file")
    from datasets import load_dataset

    if not _has_rows(file, header=builder == "csv"):  # the readers fail on these with messages of their own
        raise UserError(f"{flag} {path} holds no examples: add rows with a text and a label")
    try:
        table = load_dataset(builder, data_files=str(file), split="train")
    except Exception as error:  # pyarrow/pandas parse errors have many types; the message names the file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{flag} {path} cannot be read as {file.suffix} ({first_line}); fix the file") from None
    if table.num_rows == 0:
        raise UserError(f"{flag} {path} holds no examples: add rows with a text and a label")
    return table


def check_columns(table: Dataset, args: ClassifyArguments, flag: str, path: str) -> None:
    for option, column in (("--text-column", args.text_column), ("--label-column", args.label_column)):
        if column not in table.column_names:
            raise UserError(
                f"{flag} {path} has no column {column!r} (its columns: {', '.join(table.column_names)}); "
                f"pass the right one with {option}"
            )
    if any(label is None for label in table[args.label_column]):
        raise UserError(f"{flag} {path} has rows without a label in column {args.label_column!r}: fill or drop them")


def label_names(values: list) -> list[str]:
    """Sorted class names: integers in numeric order (0, 1, 2, 10), anything else as sorted strings."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(set(int(v) for v in values))]
    return sorted({str(v) for v in values})


def load_labelled_data(args: ClassifyArguments) -> LabelledData:
    train = read_table(args.train, "--train")
    check_columns(train, args, "--train", args.train)
    labels = label_names(train[args.label_column])
    if len(labels) < 2:
        raise UserError(
            f"--train {args.train} has a single label ({labels[0]!r}) in column {args.label_column!r}: a classifier "
            "needs examples of at least two labels; check --label-column or add examples"
        )
    if args.validation is not None:
        validation = read_table(args.validation, "--validation")
        check_columns(validation, args, "--validation", args.validation)
    else:
        if train.num_rows < 10:
            raise UserError(
                f"--train {args.train} has {train.num_rows} rows, too few to hold 10% out: pass --validation"
            )
        split = train.train_test_split(test_size=0.1, seed=args.seed)
        train, validation = split["train"], split["test"]
    unknown = sorted(set(map(str, validation[args.label_column])) - set(labels))
    if unknown:
        raise UserError(
            f"the validation data has labels the training data never shows ({', '.join(unknown)}); "
            "add training examples for them or remove them from the validation file"
        )
    ids = {name: index for index, name in enumerate(labels)}

    def normalise(table: Dataset) -> Dataset:
        texts = [str(text or "") for text in table[args.text_column]]
        return Dataset.from_dict({"text": texts, "label": [ids[str(v)] for v in table[args.label_column]]})

    return LabelledData(normalise(train), normalise(validation), labels)


def majority_baseline(data: LabelledData) -> tuple[str, float]:
    """Accuracy on the validation data of always predicting the most frequent training label."""
    majority = Counter(data.train["label"]).most_common(1)[0][0]
    accuracy = float(np.mean(np.asarray(data.validation["label"]) == majority))
    return data.labels[majority], accuracy


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------


def load_classifier(folder: Path, labels: list[str], bidirectional: bool, pad_token_id: int):
    """The causal checkpoint with a new classification head (and new reverse weights if bidirectional)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder)
    label_fields = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: index for index, name in enumerate(labels)},
        "pad_token_id": pad_token_id,
    }
    if bidirectional:
        if config.model_type != "hybrid_rnn_lm":
            raise UserError(f"--bidirectional needs a hybrid_rnn_lm model; {folder} holds a {config.model_type} model")
        # Rebuilt, not patched: the config derives is_causal and the cache layout from `bidirectional`.
        config = type(config)(**{**config.to_dict(), "bidirectional": True})
    for name, value in label_fields.items():
        setattr(config, name, value)
    # The new weights are reported below, in words: the classification head, and a bidirectional encoder's
    # reverse-direction weights; any other tensor the folder lacks is refused.
    model, info = load_pretrained(
        folder,
        AutoModelForSequenceClassification,
        new=lambda name: name.startswith("score.") or (bidirectional and "_reverse" in name),
        config=config,
        ignore_mismatched_sizes=bidirectional,
    )
    missing = set(info["missing_keys"])
    new = sorted(missing | {key for key, *_ in info.get("mismatched_keys", [])})
    if bidirectional:
        keep_forward_columns(model, folder)
        logger.warning(
            "bidirectional encoder: %d new tensors initialised (reverse-direction RNN weights, the reverse columns of "
            "each out_proj, the classification head): %s",
            len(new),
            ", ".join(new),
        )
    else:
        logger.warning("new classification head initialised: %s", ", ".join(new))
    return model, new


@torch.no_grad()
def keep_forward_columns(model, folder: Path) -> None:
    """out_proj grew from (H, H) to (H, 2H): put the pretrained forward-direction columns back in the first half."""
    from safetensors import safe_open

    for index, block in enumerate(model.model.layers):
        name = f"model.layers.{index}.rnn.out_proj.weight"
        with safe_open(str(checkpoint_file(folder, name)), framework="pt") as checkpoint:
            pretrained = checkpoint.get_tensor(name)  # (H, H)
        block.rnn.out_proj.weight[:, : pretrained.shape[1]] = pretrained


def checkpoint_file(folder: Path, tensor_name: str) -> Path:
    """The safetensors file holding a tensor, in a single-file or a sharded checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return folder / json.loads(index.read_text())["weight_map"][tensor_name]
    return folder / "model.safetensors"


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def prepare_output_dir(args: ClassifyArguments) -> Path:
    """The output folder, checked before any training: the classifier replaces it whole at the end, so it may hold
    nothing but what this command or a training run writes, and never the model being fine-tuned."""
    from training.train import check_folder_path, output_dir_contents

    output_dir = Path(args.output_dir).expanduser()
    model = Path(args.model).expanduser().resolve()
    if output_dir.resolve() == model or output_dir.resolve() in model.parents:
        raise UserError(
            f"--output-dir {output_dir} holds the model being fine-tuned ({args.model}), which replacing it would "
            "delete; choose another --output-dir"
        )
    check_folder_path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not args.overwrite_output_dir:
            raise UserError(
                f"{output_dir} already exists and is not empty; choose another --output-dir or pass "
                "--overwrite-output-dir"
            )
        others = output_dir_contents(output_dir)[1]
        if others:
            shown = ", ".join(sorted(path.name for path in others)[:5]) + (", ..." if len(others) > 5 else "")
            raise UserError(
                f"--overwrite-output-dir: {output_dir} also holds files that no hybrid-lm command wrote ({shown}); "
                "nothing was deleted: move them away or choose another --output-dir"
            )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return output_dir


def tokenize(data: Dataset, tokenizer, max_length: int) -> Dataset:
    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length, add_special_tokens=False)

    return data.map(encode, batched=True, remove_columns=["text"])


def finetune(args: ClassifyArguments) -> dict:
    """Trains, evaluates, writes the output folder; returns the content of results.json."""
    import evaluate
    from transformers import AutoConfig, DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from training.tokenization import build_tokenizer

    folder = check_model_folder(args.model)
    tokenizer = build_tokenizer(str(folder))
    check_tokenizer_fits(folder, tokenizer, AutoConfig.from_pretrained(folder).vocab_size)
    output_dir = prepare_output_dir(args)
    data = load_labelled_data(args)
    max_length = args.max_length or min(int(tokenizer.model_max_length), MAX_LENGTH_CAP)
    set_seed(args.seed)
    model, new_weights = load_classifier(folder, data.labels, args.bidirectional, tokenizer.pad_token_id)
    accuracy = evaluate.load(str(METRIC_PATH), keep_in_memory=True)

    def compute_metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=-1)
        return accuracy.compute(predictions=predicted.tolist(), references=prediction.label_ids.tolist())

    with tempfile.TemporaryDirectory(prefix=f".tmp-{output_dir.name}-", dir=output_dir.parent) as staging:
        staging = Path(staging)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(staging / "trainer"),
                num_train_epochs=args.epochs,
                learning_rate=args.learning_rate,
                per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=args.batch_size,
                eval_strategy="epoch",
                logging_strategy="epoch",
                save_strategy="no",
                report_to=[],
                seed=args.seed,
                use_cpu=not torch.cuda.is_available(),
            ),
            train_dataset=tokenize(data.train, tokenizer, max_length),
            eval_dataset=tokenize(data.validation, tokenizer, max_length),
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_metrics,
        )
        trainer.train()
        final = trainer.evaluate()
        majority_label, baseline = majority_baseline(data)
        results = {
            "model": str(folder),
            "labels": data.labels,
            "bidirectional": args.bidirectional,
            "train_examples": data.train.num_rows,
            "validation_examples": data.validation.num_rows,
            "epochs": args.epochs,
            "validation_accuracy": final["eval_accuracy"],
            "validation_loss": final["eval_loss"],
            "majority_label": majority_label,
            "majority_baseline_accuracy": baseline,
            "new_weights": new_weights,
            "log_history": trainer.state.log_history,
        }
        shutil.rmtree(staging / "trainer", ignore_errors=True)
        trainer.model.save_pretrained(staging / "classifier")
        tokenizer.save_pretrained(staging / "classifier")
        (staging / "classifier" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging / "classifier", output_dir)
    write_card(output_dir)  # README.md, the classifier's model card (`hybrid-lm push` uploads it)
    return results


def markdown_table(results: dict) -> str:
    rows = [
        ("validation accuracy", f"{results['validation_accuracy']:.4f}"),
        (f"majority baseline (always {results['majority_label']!r})", f"{results['majority_baseline_accuracy']:.4f}"),
        ("validation loss", f"{results['validation_loss']:.4f}"),
        ("examples (train / validation)", f"{results['train_examples']} / {results['validation_examples']}"),
        ("labels", ", ".join(results["labels"])),
    ]
    return "\n".join(["| metric | value |", "| --- | ---: |"] + [f"| {name} | {value} |" for name, value in rows])


def main(argv: list[str]) -> int:
    args = parse_command(
        ClassifyArguments,
        argv,
        "hybrid-lm finetune-classify",
        "Fine-tune a saved language model as a text classifier.",
    )
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    results = finetune(args)
    print(markdown_table(results))
    print(f"\nclassifier saved to {args.output_dir}")
    return 0
