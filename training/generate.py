"""`hybrid-lm generate`: text from a saved model, streamed token by token for one prompt, batched for a file.

One prompt (`--prompt`) streams to the terminal as it is produced; `--prompt-file` (one prompt per line) runs in
left-padded batches and prints each prompt's samples at the end. Prompts are encoded without special tokens
(a trailing EOS would end generation at once); an empty prompt starts from EOS, the token that precedes every
document in training. The same `--seed` gives the same text.

This module also holds what the other commands that read a saved model share: `load_model_and_tokenizer`,
`check_model_folder` and `parse_command`.
"""

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, TextStreamer, set_seed
from transformers import logging as transformers_logging

from training.arguments import CommandParser, arg, check_seed, check_types
from training.errors import UserError
from training.model_files import (
    LOCAL_CODE_ONLY,
    check_safetensors,
    classifier_class,
    refuse_missing_weights,
    weight_files,
)
from training.tokenization import build_tokenizer

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Shared by the commands that read a saved model
# --------------------------------------------------------------------------------------------------------


def parse_command(argument_class: type, argv: list[str], prog: str, description: str):
    """Flags -> one argument dataclass; unknown flags and bad values are one-line UserErrors."""
    parser = CommandParser(
        argument_class, prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    arguments, unknown = parser.parse_args_into_dataclasses(
        args=list(argv), look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return arguments


SUPPORTED_MODEL_TYPES = ("hybrid_rnn_lm", "gpt2")  # this package's model, and the GPT-2 baseline it trains
OWN_CODE_FILES = ("configuration_hybrid_rnn_lm", "modeling_hybrid_rnn_lm")


def check_model_folder(path: str | Path) -> Path:
    """A folder these commands can load: its config, its weights and their header are checked, one line for each
    problem, before any weight is read. Code named by the folder's auto_map is never run."""
    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{folder} is not a saved model (no config.json there): pass an output folder of `hybrid-lm train` "
            "or a folder written by save_pretrained"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{config_file} is not valid JSON ({error}); restore it or save the model again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None:
        raise UserError(
            f"{config_file} names no model_type, so it is not a saved model's config; restore it or save the model again"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{config_file} describes a {model_type!r} model; these commands read hybrid_rnn_lm models and the gpt2 "
            "baselines `hybrid-lm train` writes: pass such a folder"
        )
    foreign = sorted(
        str(target)
        for target in (config.get("auto_map") or {}).values()
        if str(target).rsplit("--", 1)[-1].split(".")[0] not in OWN_CODE_FILES
    )
    if foreign:
        raise UserError(
            f"{config_file}: auto_map points to code this package does not ship ({', '.join(foreign)}); code from a "
            "model folder is never run: remove those auto_map entries or save the model again"
        )
    for name in weight_files(folder):  # safetensors, or a one-line refusal (pickles are never loaded)
        if name.endswith(".safetensors"):
            check_safetensors(folder / name)
    if (folder / "metrics.jsonl").is_file() and not (folder / "results.json").is_file():
        logger.warning(
            "%s is the folder of an unfinished training run (no results.json): the weights are its best model so "
            "far, not the end of training",
            folder,
        )
    import hybrid_rnn_lm  # noqa: F401  (registers the model with the Auto classes)

    return folder


def load_model_and_tokenizer(
    path: str | Path, model_class=AutoModelForCausalLM, **model_kwargs
) -> tuple[PreTrainedModel, object]:
    """A saved model (eval mode) and the tokenizer saved beside it; a causal LM refuses a bidirectional encoder.
    `device_map="meta"` runs every check without reading a weight."""
    folder = check_model_folder(path)
    config = AutoConfig.from_pretrained(folder)
    if model_class is AutoModelForCausalLM and getattr(config, "bidirectional", False):
        raise UserError(
            f"{folder} holds a bidirectional encoder (config.bidirectional=True), which sees the future and cannot "
            "generate or score text left to right; pass a causal language model folder"
        )
    classifier = classifier_class(config.architectures)
    if model_class is AutoModelForCausalLM and classifier:
        logger.warning(
            "%s holds a text classifier (%s): its text comes from the output layer tied to the input embeddings, "
            "which the classification fine-tuning changed; for text, pass the language model it was fine-tuned from",
            folder,
            classifier,
        )
    model, _ = load_pretrained(folder, model_class, **model_kwargs)
    tokenizer = build_tokenizer(str(folder))
    check_tokenizer_fits(folder, tokenizer, model.config.vocab_size)
    return model.eval(), tokenizer


def load_pretrained(
    folder: Path, model_class=AutoModelForCausalLM, new=lambda name: False, **model_kwargs
) -> tuple[PreTrainedModel, dict]:
    """`model_class.from_pretrained(folder)`, quietly, and its loading info; weights that do not fit, or that lack a
    tensor the model needs (one that `new(name)` does not call new, such as a fresh classification head), are a
    one-line UserError."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()  # "unused weights" notes are expected when loading a sub-model
    transformers_logging.disable_progress_bar()  # a per-tensor bar is noise for a small local file
    try:
        model, info = model_class.from_pretrained(
            folder, use_safetensors=True, output_loading_info=True, **LOCAL_CODE_ONLY, **model_kwargs
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(
            f"{folder}: the weights do not fit config.json ({_first_line(error)}); save the model again"
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
    refuse_missing_weights(folder, [name for name in info["missing_keys"] if not new(name)])
    return model, info


def check_tokenizer_fits(folder: Path, tokenizer, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise UserError(
            f"{folder}: the tokenizer has {len(tokenizer):,} tokens, more than the model's vocab_size "
            f"{vocab_size:,}; save the tokenizer the model was trained with (or resize the embeddings)"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------------


@dataclass
class GenerateArguments:
    """What to generate from, and how to sample."""

    model: str = arg(help="a saved model folder (output of `hybrid-lm train` or save_pretrained)")
    prompt: str | None = arg(None, "the prompt; an empty string starts a new document")
    prompt_file: str | None = arg(None, "a text file with one prompt per line (blank lines skipped), run in batches")
    max_new_tokens: int = arg(200, "tokens to generate per sample (fewer if EOS comes first)")
    temperature: float = arg(0.8, "sampling temperature; lower is more conservative")
    top_k: int | None = arg(None, "sample only among the k most likely tokens; unset = all")
    top_p: float | None = arg(None, "sample only within the smallest set of tokens whose probability reaches p")
    repetition_penalty: float = arg(1.0, "> 1 discourages repeating tokens already in the text")
    num_samples: int = arg(1, "samples per prompt")
    seed: int | None = arg(None, "random seed: the same seed gives the same text; unset = different every run")
    greedy: bool = arg(False, "always take the most likely token (no sampling; ignores temperature/top-k/top-p)")
    ignore_eos: bool = arg(False, "generate exactly --max-new-tokens, never stopping at the end-of-document token")
    batch_size: int = arg(16, "prompts per batch with --prompt-file")

    def __post_init__(self):
        check_types(self)
        check_seed(self.seed)
        if (self.prompt is None) == (self.prompt_file is None):
            raise UserError("give exactly one of --prompt TEXT or --prompt-file FILE")
        for name in ("max_new_tokens", "num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.greedy and self.num_samples > 1:
            raise UserError("--greedy gives one text per prompt: drop --greedy to sample several, or --num-samples")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}; use --greedy for deterministic text")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}; 1.0 disables it")


@dataclass
class Generation:
    prompt: str
    samples: list[str]  # prompt + continuation, one per sample


def generation_kwargs(args: GenerateArguments, tokenizer) -> dict:
    kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "repetition_penalty": args.repetition_penalty,
    }
    if args.ignore_eos:
        kwargs["min_new_tokens"] = args.max_new_tokens  # EOS is masked out until then
    if args.greedy:
        return {**kwargs, "do_sample": False}
    # top_k=0 and top_p=1.0 switch those filters off (the generation config would otherwise apply top_k=50).
    return {
        **kwargs,
        "do_sample": True,
        "temperature": args.temperature,
        "top_k": args.top_k or 0,
        "top_p": args.top_p or 1.0,
    }


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    unknown = tokenizer.unk_token_id
    if unknown is not None and unknown in ids:
        missing = sorted({c for c in prompt if tokenizer(c, add_special_tokens=False)["input_ids"] == [unknown]})
        logger.warning(
            "the prompt has characters the tokenizer does not know (%s): they become %s",
            "".join(missing),
            tokenizer.unk_token,
        )
    # An empty prompt starts where every training document starts: right after an EOS.
    return ids or [tokenizer.eos_token_id]


def decode_continuation(tokenizer, prompt: str, output_ids: torch.Tensor, prompt_length: int) -> str:
    return prompt + tokenizer.decode(output_ids[prompt_length:], skip_special_tokens=True)


@torch.no_grad()
def stream_samples(model, tokenizer, prompt: str, args: GenerateArguments) -> Generation:
    """One prompt: each sample is printed to stdout token by token while it is generated."""
    out = sys.stdout  # looked up now, where TextStreamer prints too
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=model.device)
    samples = []
    for index in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---", file=out, flush=True)
        print(prompt, end="", file=out, flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), streamer=streamer, **generation_kwargs(args, tokenizer)
        )
        samples.append(decode_continuation(tokenizer, prompt, output[0], ids.shape[1]))
    return Generation(prompt, samples)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], args: GenerateArguments) -> list[Generation]:
    """Several prompts in one left-padded batch (padding never changes a row's result)."""
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    batch = tokenizer.pad({"input_ids": encoded}, padding_side="left", return_tensors="pt").to(model.device)
    output = model.generate(**batch, num_return_sequences=args.num_samples, **generation_kwargs(args, tokenizer))
    width = batch["input_ids"].shape[1]
    rows = output.view(len(prompts), args.num_samples, -1)  # (prompts, samples, width + new)
    return [
        Generation(prompt, [decode_continuation(tokenizer, prompt, row, width) for row in rows[i]])
        for i, prompt in enumerate(prompts)
    ]


def read_prompts(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        problem = "is a folder" if file.is_dir() else "does not exist"
        raise UserError(f"--prompt-file {path} {problem}: give a text file with one prompt per line")
    from training.data import check_utf8

    check_utf8(file)  # the byte offset of the first invalid byte, not a UnicodeDecodeError traceback
    prompts = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompt-file {path} holds no prompts: write one prompt per line")
    return prompts


def run(args: GenerateArguments) -> list[Generation]:
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.seed is not None:
        set_seed(args.seed)
    if args.prompt is not None:
        return [stream_samples(model, tokenizer, args.prompt, args)]
    prompts = read_prompts(args.prompt_file)
    results = []
    for start in range(0, len(prompts), args.batch_size):
        results += generate_batch(model, tokenizer, prompts[start : start + args.batch_size], args)
    for number, result in enumerate(results, start=1):
        for index, sample in enumerate(result.samples, start=1):
            suffix = f", sample {index}" if args.num_samples > 1 else ""
            print(f"### prompt {number}{suffix}\n{sample}\n", flush=True)
    return results


def main(argv: list[str]) -> int:
    args = parse_command(GenerateArguments, argv, "hybrid-lm generate", "Generate text from a saved model.")
    run(args)
    return 0
