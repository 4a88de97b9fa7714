"""hybrid-lm generate: seeded determinism, streaming, batched == one by one, pipeline() with and without remote code."""

import os
from pathlib import Path

import pytest
import torch
from transformers import TextStreamer, pipeline, set_seed

from tests.isolation import run_without_package
from tests.test_modeling import peaky_model, tiny_config
from training.cli import main as cli_main
from training.generate import GenerateArguments, generation_kwargs, load_model_and_tokenizer
from training.tokenization import build_tokenizer

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
)


def save_tiny_model(
    folder: Path, text: str = SAMPLE_TEXT, rnn_type: str = "gru", layout: str = "all-attention", **overrides
) -> Path:
    """A tiny hybrid model with non-degenerate weights and a char tokenizer, saved as a model folder."""
    tokenizer = build_tokenizer("char", [text], model_max_length=256)
    config = tiny_config(rnn_type, layout, vocab_size=len(tokenizer), **overrides)
    model = peaky_model(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def error_line(err: str) -> str:
    """The one `error: ...` line a failed command ends stderr with (progress bars may come before it)."""
    assert err.endswith("\n"), err
    last = err[:-1].replace("\r", "\n").split("\n")[-1]
    assert last.startswith("error: "), err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    return last


@pytest.fixture
def single_thread():
    """One torch thread per test process: with pytest -n 2 on 2 cores, two threads each spin against each other
    and tiny models train many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("generate") / "model")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`hybrid-lm ARGV` in this process: (exit code, stdout, stderr) of that command alone."""
    capsys.readouterr()
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_same_seed_same_text_and_equal_to_generate(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", "First ", "--max-new-tokens", "24", "--ignore-eos"]
    code, first, _ = run_cli(capsys, *argv, "--seed", "7", "--top-k", "20")
    assert code == 0
    _, again, _ = run_cli(capsys, *argv, "--seed", "7", "--top-k", "20")
    _, other, _ = run_cli(capsys, *argv, "--seed", "8", "--top-k", "20")
    assert first == again
    assert first != other
    # The printed text is exactly what model.generate samples with the same seed and settings.
    model, tokenizer = load_model_and_tokenizer(model_dir)
    args = GenerateArguments(model=str(model_dir), prompt="First ", max_new_tokens=24, ignore_eos=True, top_k=20)
    prompt = torch.tensor([tokenizer("First ", add_special_tokens=False)["input_ids"]])
    set_seed(7)
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), **generation_kwargs(args, tokenizer))
    assert output.shape[1] == prompt.shape[1] + 24
    assert first == "First " + tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True) + "\n"


def test_single_prompt_streams_token_by_token(model_dir, capsys, monkeypatch):
    pieces = []
    original = TextStreamer.on_finalized_text

    def record(self, text, stream_end=False):
        pieces.append(text)
        original(self, text, stream_end)

    monkeypatch.setattr(TextStreamer, "on_finalized_text", record)
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "All",
        "--max-new-tokens",
        "12",
        "--greedy",
        "--ignore-eos",
    )
    assert code == 0
    assert len([piece for piece in pieces if piece]) >= 6, pieces  # printed while generating, not once at the end
    assert out == "All" + "".join(pieces) + "\n"  # the streamer ends the line


def test_prompt_file_batches_equal_prompts_one_by_one(model_dir, tmp_path, capsys):
    prompts = ["First Citizen:", "", "Speak", "You are all resolved rather"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    settings = ["--max-new-tokens", "10", "--greedy", "--ignore-eos"]
    code, batched, _ = run_cli(
        capsys, "generate", "--model", str(model_dir), "--prompt-file", str(prompt_file), *settings
    )
    assert code == 0
    kept = [prompt for prompt in prompts if prompt.strip()]  # blank lines are skipped
    singles = []
    for prompt in kept:
        _, out, _ = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", prompt, *settings)
        singles.append(out.rstrip("\n"))
    expected = "".join(f"### prompt {i}\n{text}\n\n" for i, text in enumerate(singles, start=1))
    assert batched == expected  # left padding does not change any row's text
    assert len({text[len(prompt) :] for text, prompt in zip(singles, kept)}) > 1


def _greedy_text(model_dir: Path, prompt: str, new_tokens: int) -> str:
    model, tokenizer = load_model_and_tokenizer(model_dir)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    output = model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(output[0], skip_special_tokens=True)


def test_pipeline_loads_the_folder_with_the_package_imported(model_dir):
    generator = pipeline("text-generation", model=str(model_dir))
    result = generator("Speak", max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert result[0]["generated_text"] == _greedy_text(model_dir, "Speak", 10)


def test_pipeline_with_trust_remote_code_without_the_package(model_dir, tmp_path):
    code = f"""
    import json
    from transformers import pipeline
    generator = pipeline("text-generation", model={str(model_dir)!r}, trust_remote_code=True)
    result = generator("Speak", max_new_tokens=10, min_new_tokens=10, do_sample=False)
    print(json.dumps({{"text": result[0]["generated_text"], "class": type(generator.model).__module__}}))
    """
    result = run_without_package(code, cwd=tmp_path)
    assert result["class"].startswith("transformers_modules.")  # the code came from the folder
    assert result["text"] == _greedy_text(model_dir, "Speak", 10)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "x", "--prompt-file", "p.txt"], "give exactly one of --prompt TEXT or --prompt-file FILE"),
        (["--prompt", "x", "--greedy", "--num-samples", "2"], "--greedy gives one text per prompt"),
        (["--prompt", "x", "--temperature", "0"], "--temperature must be > 0"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--prompt", "x", "--temperature", "nan"], "option temperature must be a finite number, got nan"),
        (["--prompt", "x", "--seed", "-5"], "--seed must be in [0, 2**32), got -5"),
        (["--prompt", "x", "--max-tokens", "3"], "unrecognized arguments: --max-tokens 3"),
        (["--prompt-file", "missing.txt"], "--prompt-file missing.txt does not exist"),
        (["--prompt-file", "."], "--prompt-file . is a folder: give a text file with one prompt per line"),
    ],
    ids=[
        "both-prompts",
        "greedy-samples",
        "temperature",
        "top-p",
        "temperature-nan",
        "negative-seed",
        "unknown-flag",
        "missing-prompt-file",
        "prompt-file-is-a-folder",
    ],
)
def test_bad_input_is_one_line_error(model_dir, capsys, argv, message):
    code, out, err = run_cli(capsys, "generate", "--model", str(model_dir), *argv)
    assert code == 2
    assert message in error_line(err)
    assert out == ""


def test_missing_model_folder_is_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x")
    assert code == 2
    assert (
        error_line(err)
        == f"error: {tmp_path / 'nowhere'} is not a saved model (no config.json there): pass an output "
        "folder of `hybrid-lm train` or a folder written by save_pretrained"
    )


def test_empty_prompt_starts_a_new_document(model_dir, capsys):
    code, out, _ = run_cli(
        capsys, "generate", "--model", str(model_dir), "--prompt", "", "--max-new-tokens", "8", "--greedy",
        "--ignore-eos",
    )  # fmt: skip
    assert code == 0
    model, tokenizer = load_model_and_tokenizer(model_dir)
    start = torch.tensor([[tokenizer.eos_token_id]])  # what precedes every document in training
    output = model.generate(start, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert out == tokenizer.decode(output[0, 1:], skip_special_tokens=True) + "\n"


def test_prompt_file_with_invalid_utf8_names_the_byte(model_dir, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_bytes(b"First Citizen:\n\xff\xfe second\n")
    code = cli_main(["generate", "--model", str(model_dir), "--prompt-file", str(prompt_file)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        f"error: {prompt_file} is not valid UTF-8 at byte 15: invalid start byte (0xff); re-encode the file as UTF-8, "
        "e.g. with `iconv -f latin1 -t utf-8`"
    )


def test_the_commands_load_models_without_hub_kernels(model_dir, monkeypatch):
    """transformers 5 marks what from_pretrained loads for hub kernels: on a GPU, a switch between train() and eval()
    then fetches compiled activations from the Hub (kernels-community/activation), which fails offline and runs code
    that no folder of ours holds. Every loader of the commands turns that off; the server's model process too."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM
    from transformers.cli.serving.model_manager import ModelLoader

    from training.classify import load_classifier
    from training.serve_loader import HybridLmModelLoader
    from training.train import load_saved_model

    assert AutoModelForCausalLM.from_pretrained(model_dir).use_kernels  # transformers' default, where kernels exist
    model, _ = load_model_and_tokenizer(model_dir)
    classifier, _ = load_classifier(model_dir, ["a", "b"], bidirectional=False, pad_token_id=0)
    accelerator = Accelerator(cpu=True)
    saved = accelerator.unwrap_model(load_saved_model(accelerator, model_dir))
    assert not any(loaded.use_kernels for loaded in (model, classifier, saved))

    seen = []
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    monkeypatch.setattr(
        ModelLoader, "load_model_and_processor", lambda *args: seen.append(os.environ["USE_HUB_KERNELS"])
    )
    loader = HybridLmModelLoader()
    loader.load_model_and_processor(str(model_dir))
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")  # a choice the user made stays
    loader.load_model_and_processor(str(model_dir))
    assert seen == ["NO", "YES"]
    # The loader registered the package's classes with transformers and replaced none of transformers' own.
    import transformers
    from transformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel

    from hybrid_rnn_lm import HybridRnnLmForCausalLM

    assert transformers.GPT2LMHeadModel is GPT2LMHeadModel
    assert transformers.HybridRnnLmForCausalLM is HybridRnnLmForCausalLM
