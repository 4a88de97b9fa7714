"""`hybrid-lm train` end to end: output folder, metrics, plot, arguments, schedules, GPT-2 baseline, bf16 on CPU."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from hybrid_rnn_lm import HybridRnnLmForCausalLM
from tests.isolation import run_without_package
from training.arguments import (
    ARGUMENT_CLASSES,
    DataArguments,
    ModelArguments,
    TrainArguments,
    arguments_from_dict,
    build_parser,
    parse_arguments,
)
from training.evaluation import EvalArguments, evaluate_folder
from training.plots import DPI, FIGURE_SIZE_INCHES, read_metrics
from training.train import build_model_config, run_training

REPO_ROOT = Path(__file__).resolve().parents[1]

# A model and batches small enough that a step takes milliseconds on one CPU core.
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "attention_layers": "2",
    "block_size": 32,
    "batch_size": 4,
    "eval_batches": 2,
    "log_steps": 1,
    "warmup_steps": 2,
    "sample_tokens": 0,
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread, and several test workers share the cores: oversubscribed OpenMP
    threads spin and make a 2-second run take a minute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_options(output_dir: Path, **overrides) -> dict:
    return {**TINY, "output_dir": str(output_dir), **overrides}


def as_flags(options: dict) -> list[str]:
    """{"max_steps": 3} -> ["--max-steps", "3"], the command line of the same run."""
    flags = []
    for name, value in options.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def real_text_file(folder: Path, characters: int, name: str = "corpus.txt") -> Path:
    """A small corpus of real English prose and code: the Python help topics that ship with CPython."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))[:characters]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def documents_folder(folder: Path, count: int, characters: int) -> Path:
    """A corpus of `count` documents of real text, one `characters`-long file each (an EOS between documents)."""
    text = real_text_file(folder.parent / f"{folder.name}-source", count * characters).read_text()
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"doc{index:02d}.txt").write_text(text[characters * index : characters * (index + 1)])
    return folder


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def validation_loss_of_saved_model(folder: Path, options: dict, whole_split: bool = False) -> float:
    """Loads the output folder like a user and evaluates it on the run's evaluation blocks (or all of them)."""
    from training.data import load_corpus, tokenize_corpus

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    corpus = load_corpus(options.get("dataset", "python-docs"))
    blocks = tokenize_corpus(corpus, tokenizer, options["block_size"])["validation"]
    count = len(blocks) if whole_split else options["eval_batches"] * options["batch_size"]
    ids = torch.tensor(blocks[:count]["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum")
    return nll.item() / ids[:, 1:].numel()


# ------------------------------------------------------------------------------------------------------------
# One real run, many properties
# ------------------------------------------------------------------------------------------------------------

RUN_OPTIONS = {
    "max_steps": 24,
    "eval_steps": 8,
    "checkpoint_steps": 8,
    "lr_scheduler": "cosine_with_min_lr",
    "min_lr_rate": 0.1,
    "warmup_steps": 4,
    "sample_tokens": 20,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "out"
    options = tiny_options(folder, **RUN_OPTIONS)
    results = run_training(*arguments_from_dict(options))
    return folder, options, results


def test_output_folder_loads_with_auto_class_and_generates(trained):
    folder, _, results = trained
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(model, HybridRnnLmForCausalLM)
    prompt = tokenizer("The ", add_special_tokens=False, return_tensors="pt").input_ids
    output = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > prompt.shape[1]
    assert results["sample"].startswith("The ")


def test_output_folder_loads_with_remote_code_where_the_package_is_absent(trained, tmp_path):
    folder, _, _ = trained
    code = f"""
    import json, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
    ids = tokenizer("The ", add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(json.dumps({{"class": type(model).__module__, "ids": out[0].tolist()}}))
    """
    isolated = run_without_package(code, cwd=tmp_path)
    assert not isolated["class"].startswith("hybrid_rnn_lm")  # the folder's own copy of the code ran
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The ", add_special_tokens=False, return_tensors="pt").input_ids
    local = AutoModelForCausalLM.from_pretrained(folder).generate(  # one thread here too (single_thread)
        ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert isolated["ids"] == local[0].tolist()


def test_metrics_jsonl_and_results_agree(trained):
    folder, options, results = trained
    rows = read_metrics(folder / "metrics.jsonl")
    train_rows = [row for row in rows if "train_loss" in row]
    eval_rows = [row for row in rows if "val_loss" in row]
    tokens_per_step = options["batch_size"] * options["block_size"]

    assert [row["step"] for row in train_rows] == list(range(1, 25))
    assert [row["step"] for row in eval_rows] == [0, 8, 16, 24]
    for row in train_rows:
        assert set(row) == {"step", "tokens_seen", "train_seconds", "lr", "train_loss", "tokens_per_second"}
        assert row["tokens_seen"] == row["step"] * tokens_per_step and row["tokens_per_second"] > 0
    for row in eval_rows:
        assert set(row) == {
            "step",
            "tokens_seen",
            "train_seconds",
            "val_loss",
            "val_perplexity",
            "val_bits_per_token",
            "val_bits_per_char",
        }
        assert row["val_perplexity"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["val_bits_per_token"] == pytest.approx(row["val_loss"] / math.log(2))
        # Char level: about one token per character (EOS between documents is the only extra token).
        assert row["val_bits_per_char"] == pytest.approx(row["val_bits_per_token"], rel=0.01)

    best = min(eval_rows, key=lambda row: row["val_loss"])
    assert results["best_step"] == best["step"] and results["best_val_loss"] == best["val_loss"]
    assert results["val_perplexity"] == best["val_perplexity"]
    assert results["val_bits_per_char"] == best["val_bits_per_char"]
    assert results["train_tokens"] == 24 * tokens_per_step
    assert results["stopped_reason"] == "max_steps" and results["steps"] == 24
    assert eval_rows[-1]["val_loss"] < eval_rows[0]["val_loss"] - 0.5  # it learned something
    assert json.loads((folder / "results.json").read_text()) == results
    expected_keys = {
        "best_step", "best_val_loss", "val_perplexity", "val_bits_per_token", "val_bits_per_char", "train_tokens",
        "wall_time_s", "tokens_per_second", "num_parameters", "num_non_embedding_parameters", "dataset",
        "tokenizer", "architecture", "stopped_reason",
    }  # fmt: skip
    assert expected_keys <= set(results)
    assert (results["dataset"], results["tokenizer"], results["architecture"]) == ("python-docs", "char", "hybrid")


def test_saved_model_is_the_best_evaluated_one(trained):
    folder, options, results = trained
    assert validation_loss_of_saved_model(folder, options) == pytest.approx(results["best_val_loss"], rel=1e-5)


def test_the_best_model_is_scored_on_the_whole_validation_split_at_the_end(trained):
    folder, options, results = trained
    full = results["full_validation"]
    # Periodic evaluations saw 2 batches; the reported numbers cover every block of the split.
    assert full["blocks"] > options["eval_batches"] * options["batch_size"]
    assert full["loss"] == pytest.approx(validation_loss_of_saved_model(folder, options, whole_split=True), rel=1e-5)
    assert full["perplexity"] == pytest.approx(math.exp(full["loss"]))
    assert full["bits_per_token"] == pytest.approx(full["loss"] / math.log(2))


def test_parameter_counts(trained):
    folder, _, results = trained
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert results["num_parameters"] == model.num_parameters()
    embedding = model.get_input_embeddings().weight.numel()  # tied with the head: counted once
    assert results["num_non_embedding_parameters"] == model.num_parameters() - embedding


def test_loss_curve_png(trained):
    folder, _, _ = trained
    width, height = png_size(folder / "loss_curve.png")
    assert (width, height) == (FIGURE_SIZE_INCHES[0] * DPI, FIGURE_SIZE_INCHES[1] * DPI)


def test_learning_rate_follows_warmup_then_cosine_to_the_floor(trained):
    folder, options, _ = trained
    peak, warmup, steps, floor = TrainArguments().learning_rate, 4, 24, 0.1
    for row in read_metrics(folder / "metrics.jsonl"):
        if "lr" not in row:
            continue
        step = row["step"] - 1  # the lr a logged step trained with
        if step < warmup:
            expected = peak * step / warmup
        else:
            progress = (step - warmup) / (steps - warmup)
            expected = peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert row["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-12), row


def test_training_args_yaml_reruns_the_same_arguments(trained):
    folder, options, _ = trained
    again = parse_arguments([str(folder / "training_args.yaml")])
    assert again == arguments_from_dict(options)


def test_checkpoints_are_rotated_to_the_limit(trained):
    folder, _, _ = trained
    names = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert names == ["checkpoint-16", "checkpoint-24"]  # limit 2 of 8, 16, 24; no temporary folders left


def test_model_card_is_written(trained):
    folder, _, _ = trained
    assert "model-index" in (folder / "README.md").read_text()


# ------------------------------------------------------------------------------------------------------------
# Other runs
# ------------------------------------------------------------------------------------------------------------


def test_early_stopping_keeps_the_best_model(tmp_path):
    # Train on "ab" repeated, validate on "aa" repeated: the better it learns a->b, the worse validation gets.
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("ab" * 2000)
    (data / "validation.txt").write_text("aa" * 400)
    options = tiny_options(
        tmp_path / "out", dataset=str(data), max_steps=200, eval_steps=3, early_stopping_patience=2, learning_rate=1e-2
    )
    results = run_training(*arguments_from_dict(options))
    evals = [row for row in read_metrics(tmp_path / "out" / "metrics.jsonl") if "val_loss" in row]
    assert results["stopped_reason"] == "early_stopping" and results["steps"] < 200
    assert results["best_step"] < results["steps"]
    assert [row["val_loss"] for row in evals].index(results["best_val_loss"]) == len(evals) - 3  # patience 2
    assert validation_loss_of_saved_model(tmp_path / "out", options) == pytest.approx(
        results["best_val_loss"], rel=1e-5
    )


def test_epochs_set_the_number_of_steps_from_the_data(tmp_path):
    corpus = real_text_file(tmp_path / "data", 3000)
    options = tiny_options(tmp_path / "out", dataset=str(corpus), epochs=1.5, gradient_accumulation_steps=2)
    results = run_training(*arguments_from_dict(options))
    from training.data import load_corpus, tokenize_corpus

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    blocks = len(tokenize_corpus(load_corpus(str(corpus)), tokenizer, 32)["train"])
    batches_per_epoch = blocks // options["batch_size"]
    assert results["steps"] == math.ceil(1.5 * batches_per_epoch / 2)
    assert results["train_tokens"] == results["steps"] * 2 * options["batch_size"] * 32


def test_gpt2_baseline_trains_in_the_same_loop(tmp_path, caplog):
    options = tiny_options(tmp_path / "gpt2", architecture="gpt2", max_steps=6, eval_steps=3, sample_tokens=50)
    with caplog.at_level("WARNING", logger="training.train"):
        results = run_training(
            *arguments_from_dict({**options, "rnn_type": "lstm", "attention_window": 8, "use_residual": False})
        )
    # The options of the hybrid model that this run cannot use are named once.
    ignored = [record.message for record in caplog.records if "ignores the hybrid model's options" in record.message]
    assert ignored == [
        "--architecture gpt2 ignores the hybrid model's options --rnn-type lstm, --attention-window 8, --no-use-residual"
    ]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    assert isinstance(model, GPT2LMHeadModel)
    assert (model.config.n_embd, model.config.n_layer, model.config.n_head) == (32, 2, 2)
    assert model.config.activation_function == "gelu_new"  # unset --hidden-act: GPT-2's own
    assert results["architecture"] == "gpt2" and results["num_parameters"] == model.num_parameters()
    # No state to carry: the best model is also read in sliding windows half a block apart, as `hybrid-lm eval
    # --stride 16` reads it, every validation token scored.
    sliding = results["full_validation"]["sliding"]
    eval_args = EvalArguments(model=str(tmp_path / "gpt2"), stride=16)
    assert sliding == {**evaluate_folder(eval_args)["sliding"], "stride": 16}
    assert "stream" not in results["full_validation"]
    # The sample stops at GPT-2's 32 positions instead of failing.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    assert len(tokenizer(results["sample"], add_special_tokens=False).input_ids) <= 32


def test_model_config_builds_the_model_and_names_the_size_options_it_replaces(tmp_path, caplog):
    from hybrid_rnn_lm import HybridRnnLmConfig

    config_dir = tmp_path / "config"
    HybridRnnLmConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=2, rnn_type="mingru", intermediate_size=96
    ).save_pretrained(config_dir)
    options = tiny_options(tmp_path / "run", model_config=str(config_dir), max_steps=2, eval_steps=2, eval_batches=1)
    with caplog.at_level("WARNING", logger="training.train"):
        run_training(*arguments_from_dict(options))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.rnn_type) == (48, 1, "mingru")
    replaced = [record.message for record in caplog.records if "replaces the options" in record.message]
    assert replaced == [  # TINY's size options, which the file overrides
        f"--model-config {config_dir} replaces the options --hidden-size 32, --num-hidden-layers 2, "
        "--num-attention-heads 2"
    ]


@pytest.mark.parametrize(
    ("hidden_act", "hybrid_act", "gpt2_act"), [(None, "relu2", "gelu_new"), ("gelu", "gelu", "gelu")]
)
def test_hidden_act_sets_the_mlp_activation_of_either_architecture(hidden_act, hybrid_act, gpt2_act):
    """Unset: squared ReLU for the hybrid (the config's own default, for loading older models, is GELU) and GPT-2's
    own gelu_new."""
    hybrid = build_model_config(ModelArguments(hidden_act=hidden_act), vocab_size=40, block_size=32)
    gpt2 = build_model_config(ModelArguments(architecture="gpt2", hidden_act=hidden_act), vocab_size=40, block_size=32)
    assert (hybrid.hidden_act, gpt2.activation_function) == (hybrid_act, gpt2_act)


@pytest.mark.parametrize("native", [True, False], ids=["avx512-or-amx", "no-bf16-instructions"])
def test_bf16_on_a_cpu_without_bf16_matrix_instructions_is_warned_about(native, monkeypatch, caplog):
    from training.train import check_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    with caplog.at_level("WARNING", logger="training.train"):
        check_mixed_precision("bf16")
        check_mixed_precision("no")
    warned = [record.message for record in caplog.records if "bf16 matrix instructions" in record.message]
    if native:
        assert warned == []
    else:
        assert len(warned) == 1 and "--mixed-precision no is faster here" in warned[0]


def test_bf16_autocast_on_cpu_trains_and_saves_float32_weights(tmp_path):
    options = tiny_options(tmp_path / "bf16", mixed_precision="bf16", max_steps=2, eval_steps=2, eval_batches=1)
    results = run_training(*arguments_from_dict(options))
    assert results["stopped_reason"] == "max_steps" and math.isfinite(results["best_val_loss"])
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}


# ------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--help"])
    assert exit_info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside hyphenated words
    for cls in ARGUMENT_CLASSES:
        for field in cls.__dataclass_fields__.values():
            assert f"--{field.name.replace('_', '-')}" in text, field.name
            assert "".join(field.metadata["help"].split()) in text, field.name


def test_dashes_underscores_and_yaml_give_the_same_arguments(tmp_path):
    dashed = parse_arguments(
        ["--max-steps", "7", "--hidden-size", "48", "--no-use-residual", "--attention-layers", "0,1"]
    )
    underscored = parse_arguments(
        ["--max_steps", "7", "--hidden_size", "48", "--no_use_residual", "--attention_layers", "0,1"]
    )
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 3\nhidden_size: 48\nuse_residual: false\nattention_layers: [0, 1]\n")
    from_yaml = parse_arguments([str(config), "--max-steps", "7"])  # flags after the file override it
    assert dashed == underscored == from_yaml
    model, _, train = dashed
    assert (train.max_steps, model.hidden_size, model.use_residual) == (7, 48, False)


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "training" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_parse(config):
    model, data, train = parse_arguments([str(config)])
    assert isinstance(model, ModelArguments) and isinstance(data, DataArguments) and isinstance(train, TrainArguments)


def test_defaults_describe_the_default_run():
    model, data, train = parse_arguments([])
    assert (data.dataset, data.tokenizer, model.architecture) == ("python-docs", "char", "hybrid")
    assert build_parser().prog == "hybrid-lm train"


def test_second_run_on_the_same_data_reuses_the_token_blocks(tmp_path, caplog):
    corpus = real_text_file(tmp_path / "data", 30_000)
    cache = tmp_path / "blocks"
    options = dict(dataset=str(corpus), cache_dir=str(cache), max_steps=2, eval_steps=2)
    with caplog.at_level("INFO", logger="training.train"):
        first = run_training(*arguments_from_dict(tiny_options(tmp_path / "first", **options)))
        assert f"token blocks cached in {cache}" in caplog.text
        caplog.clear()
        second = run_training(*arguments_from_dict(tiny_options(tmp_path / "second", **options)))
        assert f"token blocks loaded from {cache}" in caplog.text
    assert any(cache.iterdir())
    # Same blocks, same seed: the cached run trains exactly like the first.
    assert second["best_val_loss"] == first["best_val_loss"]


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "training" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_config_files_parse(path):
    model_args, data_args, train_args = parse_arguments([str(path)])
    assert model_args.architecture in ("hybrid", "gpt2") and data_args.block_size > 0
    assert (train_args.max_steps or 0) > 0 or (train_args.epochs or 0) > 0


def test_default_config_file_is_the_default_run():
    from training.arguments import DEFAULT_MAX_STEPS, arguments_to_dict

    written_out = arguments_to_dict(
        *parse_arguments([str(REPO_ROOT / "training" / "configs" / "python-docs-char.yaml")])
    )
    defaults = arguments_to_dict(*parse_arguments([]))
    defaults["max_steps"] = defaults["max_steps"] or DEFAULT_MAX_STEPS  # unset = DEFAULT_MAX_STEPS
    differences = {name for name in written_out if written_out[name] != defaults[name]} - {"output_dir"}
    assert not differences, {name: (written_out[name], defaults[name]) for name in differences}


def test_a_train_loss_line_is_the_mean_of_the_steps_since_the_previous_line(tmp_path):
    corpus = real_text_file(tmp_path / "data", 30_000)
    common = dict(dataset=str(corpus), max_steps=9, eval_steps=9, cache_dir="none")
    every_step = run_training(*arguments_from_dict(tiny_options(tmp_path / "every", log_steps=1, **common)))
    every_third = run_training(*arguments_from_dict(tiny_options(tmp_path / "third", log_steps=3, **common)))
    step_losses = {
        row["step"]: row["train_loss"]
        for row in read_metrics(Path(every_step["output_dir"]) / "metrics.jsonl")
        if "train_loss" in row
    }
    windows = [row for row in read_metrics(Path(every_third["output_dir"]) / "metrics.jsonl") if "train_loss" in row]
    assert [row["step"] for row in windows] == [3, 6, 9]
    for row in windows:
        expected = sum(step_losses[s] for s in range(row["step"] - 2, row["step"] + 1)) / 3
        assert row["train_loss"] == pytest.approx(expected, rel=1e-6)


def test_a_test_text_is_scored_whole_by_the_saved_model(tmp_path):
    from training.data import load_whole_text
    from training.train import tokenize_test_text

    corpus = real_text_file(tmp_path, 60_000)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(corpus.read_text()[-6_000:].upper() + "\nA line of its own.\n")
    output_dir = tmp_path / "out"
    options = tiny_options(output_dir, dataset=str(corpus), max_steps=6, test_dataset=str(held_out))
    test = run_training(*arguments_from_dict(options))["test"]

    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    blocks = tokenize_test_text(load_whole_text(str(held_out)), tokenizer, TINY["block_size"])["test"]
    ids = torch.tensor(blocks["input_ids"], dtype=torch.long)
    with torch.no_grad():  # the mean over every predicted token of every block, one block at a time
        losses = [model(input_ids=row[None], labels=row[None]).loss for row in ids]
    assert test["dataset"] == "held_out.txt"
    assert test["tokens_evaluated"] == len(ids) * (TINY["block_size"] - 1)
    assert test["loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)


def test_a_test_text_shorter_than_a_block_is_refused_before_training(tmp_path, capsys):
    from tests.test_generate_cli import error_line, run_cli

    corpus = real_text_file(tmp_path, 30_000)
    (tmp_path / "short.txt").write_text("Too short.\n")
    output_dir = tmp_path / "out"
    options = tiny_options(output_dir, dataset=str(corpus), max_steps=2, test_dataset=str(tmp_path / "short.txt"))
    code, out, err = run_cli(capsys, "train", *as_flags(options))
    assert code == 2
    assert "the block size (32 tokens) is longer than the test split, which has" in error_line(err)
    assert error_line(err).endswith("or more data (a longer text)")
    assert not output_dir.exists()  # nothing trained, nothing written
