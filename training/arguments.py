"""Arguments of `hybrid-lm train`: three typed dataclasses, parsed from flags or from one YAML file.

`hybrid-lm train --hidden-size 128 --max-steps 500` and `hybrid-lm train run.yaml [--max-steps 10]` are the
same thing: the YAML keys are the field names below, and flags given after the YAML file override it. Every
run writes its exact arguments to `<output_dir>/training_args.yaml`, which this parser reads back.
"""

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser

from training.errors import UserError

# LambdaLR schedules from transformers.get_scheduler ("reduce_lr_on_plateau" and "greedy" react to metrics).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
DEFAULT_MAX_STEPS = 500
# Squared ReLU learned more per step than GELU (the config's default) for the GRU and minGRU hybrids, at the same
# speed (results/activation).
DEFAULT_HYBRID_ACTIVATION = "relu2"


def arg(default=MISSING, help: str = "", **kwargs):
    """A dataclass field whose help text shows in `--help`; without a default the flag is required."""
    if default is MISSING:
        return field(metadata={"help": help, **kwargs})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelArguments:
    """Which model to build and how large."""

    architecture: Literal["hybrid", "gpt2"] = arg(
        "hybrid", "hybrid: the recurrent + attention model; gpt2: transformers' GPT-2 at the same size, as a baseline"
    )
    model_config: str | None = arg(
        None, "a config.json (or a folder holding one) to build the model from; replaces the size flags below"
    )
    hidden_size: int = arg(160, "width of the residual stream and of the recurrent state")
    num_hidden_layers: int = arg(3, "number of blocks")
    rnn_type: Literal["rnn", "gru", "lstm", "mingru", "minlstm"] = arg(
        "gru",
        "recurrent cell of every block (hybrid only): rnn, gru, lstm (torch's fused cells, a loop over time) or "
        "mingru, minlstm (gates from the input only, trained with a parallel scan)",
    )
    num_attention_heads: int = arg(4, "attention heads; must divide --hidden-size")
    attention_layers: str = arg(
        "2", "blocks with attention (hybrid only): all, none, k (every k-th block) or a comma list of indices (0,2)"
    )
    attention_window: int | None = arg(None, "sliding attention window in tokens (hybrid only); unset = full causal")
    intermediate_size: int | None = arg(
        192,
        "MLP width; null in a config file = 4 x --hidden-size. The default pairs a wide recurrent state with a narrow "
        "MLP, which learns more per step than 128 / 512 at the same size (results/gru-width)",
    )
    hidden_act: str | None = arg(
        None,
        "the MLP's activation, any name of transformers' ACT2FN (gelu, relu, relu2 = squared ReLU, silu, ...); unset = "
        f"{DEFAULT_HYBRID_ACTIVATION} for the hybrid (it learns the most per step, results/activation) and GPT-2's own "
        "gelu_new",
    )
    hidden_dropout: float = arg(0.0, "dropout on embeddings and sub-layer outputs")
    attention_dropout: float = arg(0.0, "dropout on attention probabilities")
    use_residual: bool = arg(True, "residual connections around every sub-layer (--no-use-residual: ablation)")
    init_embeddings: str | None = arg(
        None,
        "a word2vec or GloVe text file (one word and its vector per line, word2vec's count/dimension header line "
        "optional) whose vectors initialise the input embeddings (and the tied output embeddings) of the tokens it "
        "holds; the other tokens keep the normal initialisation. Its dimension must equal --hidden-size",
    )
    freeze_embeddings: bool = arg(
        False, "keep the input embeddings (and so the tied output embeddings) fixed during training"
    )

    def __post_init__(self):
        check_types(self)
        given, layers = str(self.attention_layers), parse_attention_layers(str(self.attention_layers))
        # One spelling per layout (YAML may hold an int or a list), so that equal runs have equal arguments.
        self.attention_layers = format_attention_layers(layers)
        _check_positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads")
        _check_positive(self, "attention_window", "intermediate_size", allow_none=True)
        if self.hidden_act is not None:
            from transformers.activations import ACT2FN

            if self.hidden_act not in ACT2FN:
                raise UserError(
                    f"--hidden-act {self.hidden_act!r} is not an activation transformers knows; pick one of "
                    f"{', '.join(ACT2FN)}"
                )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}; pick e.g. 0.1")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"--num-attention-heads {self.num_attention_heads} does not divide --hidden-size {self.hidden_size}; "
                "pick a number of heads that divides the hidden size"
            )
        if self.architecture == "hybrid" and self.model_config is None:
            check_attention_layers(layers, given, self.num_hidden_layers)


@dataclass
class DataArguments:
    """Where the text comes from and how it becomes blocks of token ids."""

    dataset: str = arg("python-docs", "a text file, folder or glob, a Hub dataset name, or the built-in python-docs")
    dataset_config: str | None = arg(None, "configuration (subset) of a Hub dataset, e.g. wikitext-2-raw-v1")
    text_column: str = arg("text", "column holding the text in a Hub or tabular dataset")
    validation_fraction: float = arg(0.1, "share of the text held out for validation when there is no such split")
    tokenizer: str = arg(
        "char",
        "char (one token per character), word (one token per word or punctuation run, <|unk|> for the rest), bpe "
        "(byte-level BPE trained on the corpus) or the path of a saved tokenizer folder",
    )
    vocab_size: int | None = arg(
        None, "vocabulary size, special tokens included: bpe's target (default 8192); a cap for char and word"
    )
    min_frequency: int = arg(1, "leave out characters, words or BPE merges seen fewer times in the training split")
    lowercase: bool = arg(False, "lowercase the text before tokenizing (saved with the tokenizer)")
    test_dataset: str | None = arg(
        None,
        "a text file, folder or glob scored whole by the best model when training ends (results.json: test), e.g. "
        "a held-out test file; a folder with a test split gives that split",
    )
    block_size: int = arg(128, "tokens per training sequence")
    num_proc: int = arg(1, "processes used to tokenize the corpus")
    streaming: bool = arg(
        False,
        "read the corpus lazily (a local folder or glob of files, or a Hub dataset), never holding the training split "
        "in memory: blocks are cut as the text streams by and shuffled through a buffer; needs --max-steps or "
        "--max-train-minutes. The tokenizer (unless a saved one is given) is trained in one pass over the stream",
    )
    cache_dir: str | None = arg(
        None,
        "folder caching tokenized blocks, keyed by corpus, tokenizer and block size, so a second run skips "
        "tokenization; unset = $XDG_CACHE_HOME/hybrid-lm/blocks (~/.cache/hybrid-lm/blocks); none = no cache",
    )

    def __post_init__(self):
        check_types(self)
        _check_positive(self, "block_size", "num_proc", "min_frequency")
        _check_positive(self, "vocab_size", allow_none=True)
        if self.block_size < 2:
            raise UserError(BLOCK_SIZE_ONE)
        if not 0.0 < self.validation_fraction < 1.0:
            raise UserError(f"--validation-fraction must be in (0, 1), got {self.validation_fraction}; pick e.g. 0.1")


@dataclass
class TrainArguments:
    """How long and how to train, evaluate, checkpoint and report."""

    output_dir: str | None = arg(None, "folder for the model, metrics and checkpoints; unset = runs/hybrid-lm-<time>")
    overwrite_output_dir: bool = arg(False, "delete a previous run in --output-dir instead of refusing to start")
    batch_size: int = arg(16, "sequences per micro-batch and process")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    learning_rate: float = arg(3e-3, "peak learning rate of AdamW")
    lr_scheduler: str = arg("cosine", f"learning-rate schedule after warmup: {', '.join(LR_SCHEDULERS)}")
    min_lr_rate: float = arg(0.1, "final learning rate as a fraction of the peak (cosine_with_min_lr schedules)")
    warmup_steps: int = arg(50, "optimizer steps of linear warmup")
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices (never on norms, biases or embeddings)")
    max_grad_norm: float = arg(1.0, "clip the gradient norm to this value; 0 disables clipping")
    max_steps: int | None = arg(None, f"optimizer steps to train; unset = from --epochs, else {DEFAULT_MAX_STEPS}")
    epochs: float | None = arg(None, "passes over the training split (instead of --max-steps)")
    max_train_minutes: float | None = arg(
        None,
        "training-time budget: stop at the first step past this many minutes spent in training steps (evaluations "
        "and checkpoints not counted; a resumed run keeps the time already spent). The learning-rate schedule ends "
        "with the budget or with --max-steps, whichever comes first; alone, it replaces --max-steps",
    )
    eval_steps: int = arg(100, "evaluate on the validation split every this many steps")
    eval_batches: int = arg(20, "validation batches per evaluation; 0 = the whole validation split")
    early_stopping_patience: int | None = arg(
        None, "stop after this many evaluations without a lower validation loss; unset = never"
    )
    checkpoint_steps: int = arg(200, "save a resumable checkpoint every this many steps; 0 = only at the end")
    checkpoint_limit: int = arg(2, "keep only the newest this many checkpoints")
    resume_from_checkpoint: str | None = arg(None, "a checkpoint folder, or latest (newest in --output-dir)")
    seed: int = arg(1337, "seed of weights, data order and dropout")
    mixed_precision: Literal["no", "fp16", "bf16"] = arg(
        "no", "autocast precision: fp16 needs a CUDA GPU; bf16 works on CPU and on GPUs that support it"
    )
    num_threads: int = arg(
        1,
        "PyTorch CPU threads per process; 0 = torch's default (one per core). Small recurrent models gain little "
        "from more threads and stall badly when cores are shared (threads wait for each other at every time step)",
    )
    carry_state: bool = arg(
        False,
        "truncated backpropagation through time (hybrid only): each batch row reads the training split as one "
        "contiguous stream, block after block, and the recurrent state after a step (detached) starts the next; the "
        "state resets after every EOS (a new document). Evaluation then also reads the validation split as streams "
        "with the state carried (val_stream_loss), and the best model is chosen on that",
    )
    carry_state_across_documents: bool = arg(
        False, "with --carry-state: do not reset the state after an EOS (the stream runs on across documents)"
    )
    carry_state_streams: int = arg(
        1,
        "with --carry-state: cut each batch row's run of the training split into this many contiguous sub-streams, "
        "each with its own carried state, and let every step continue a randomly drawn one per row, so that "
        "consecutive batches come from different places of the text (1 = each row is one stream; "
        "results/carry-state-streams compares them)",
    )
    report_to: str = arg("none", "experiment trackers, comma separated: none, all, tensorboard, wandb, mlflow, ...")
    log_steps: int = arg(10, "write a training-loss line to metrics.jsonl every this many steps")
    sample_prompt: str = arg("The ", "prompt of the text sample generated at the end")
    sample_tokens: int = arg(200, "tokens of the text sample generated at the end; 0 = no sample")

    def __post_init__(self):
        check_types(self)
        check_seed(self.seed)
        _check_positive(self, "batch_size", "gradient_accumulation_steps", "eval_steps", "log_steps")
        _check_positive(self, "checkpoint_limit")
        _check_positive(self, "max_steps", "epochs", "early_stopping_patience", "max_train_minutes", allow_none=True)
        for name in (
            "eval_batches",
            "checkpoint_steps",
            "warmup_steps",
            "sample_tokens",
            "max_grad_norm",
            "num_threads",
            "weight_decay",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning-rate must be > 0, got {self.learning_rate}; pick e.g. 1e-3")
        if not 0.0 <= self.min_lr_rate <= 1.0:
            raise UserError(f"--min-lr-rate must be in [0, 1], got {self.min_lr_rate}")
        if self.carry_state_across_documents and not self.carry_state:
            raise UserError("--carry-state-across-documents only applies with --carry-state; add --carry-state")
        if self.carry_state_streams < 1:
            raise UserError(f"--carry-state-streams must be >= 1, got {self.carry_state_streams}")
        if self.carry_state_streams > 1 and not self.carry_state:
            raise UserError("--carry-state-streams only applies with --carry-state; add --carry-state")
        if self.max_steps is not None and self.epochs is not None:
            raise UserError("--max-steps and --epochs both given; pass only one of them")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(
                f"--lr-scheduler {self.lr_scheduler!r} is not known; choose one of: {', '.join(LR_SCHEDULERS)}"
            )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments)


def parse_attention_layers(spec: str) -> str | int | list[int]:
    """`all` / `none` / `3` (every 3rd block) / `0,2` or `[0, 2]` or `1,` (indices) -> HybridRnnLmConfig's value."""
    text = spec.strip().replace(" ", "").lower()
    if text in ("all", "none"):
        return text
    is_list = text.startswith("[") or "," in text
    try:
        if is_list:
            return [int(index) for index in text.strip("[]").split(",") if index]
        return int(text)
    except ValueError:
        raise UserError(
            f"--attention-layers {spec!r} is not understood; use all, none, k (every k-th block) or indices like 0,2"
        ) from None


def ordinal(number: int) -> str:
    """2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if number % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def check_attention_layers(layers: str | int | list[int], spec: str, blocks: int) -> None:
    """--attention-layers (`layers`, parsed from `spec`) fits --num-hidden-layers `blocks`: the flags' own words for
    what HybridRnnLmConfig would refuse."""
    if isinstance(layers, int) and layers < 1:
        hint = "for block 0 alone write '0,', " if layers == 0 else ""
        raise UserError(
            f"--attention-layers {layers}: a number k means every k-th block and must be >= 1; "
            f"{hint}for no attention write 'none'"
        )
    if isinstance(layers, int) and layers > blocks:
        raise UserError(
            f"--attention-layers {layers} (every {ordinal(layers)} block) needs at least {layers} blocks, but "
            f"--num-hidden-layers is {blocks}; pass a smaller --attention-layers (1 = every block, none = no attention) "
            "or more layers"
        )
    if isinstance(layers, list) and any(not 0 <= index < blocks for index in layers):
        outside = [index for index in layers if not 0 <= index < blocks]
        raise UserError(
            f"--attention-layers {spec} names block(s) {', '.join(map(str, outside))}, but --num-hidden-layers "
            f"{blocks} has blocks 0..{blocks - 1}; name blocks in that range or add layers"
        )


def format_attention_layers(layers: str | int | list[int]) -> str:
    """The inverse of parse_attention_layers; a one-index list keeps its comma ("1," is block 1, "1" every block)."""
    if isinstance(layers, list):
        return ",".join(map(str, layers)) + ("," if len(layers) == 1 else "") if layers else "none"
    return str(layers)


class CommandParser(HfArgumentParser):
    """HfArgumentParser whose usage errors are one line (a UserError) naming the command's --help, not argparse's
    usage dump. Every `hybrid-lm` subcommand built on dataclasses parses with it."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")

    def add_argument(self, *names, **kwargs):
        # Show --max-steps rather than --max_steps in help and errors; both spellings stay accepted.
        dashed = sorted(names, key=lambda name: name.startswith("--") and "_" in name)
        return super().add_argument(*dashed, **kwargs)


def build_parser() -> CommandParser:
    parser = CommandParser(
        ARGUMENT_CLASSES,
        prog="hybrid-lm train",
        description="Train a language model with accelerate. Give flags, or one YAML file (keys = option names "
        "with underscores) optionally followed by flags that override it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return parser


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Flags, or `config.yaml [flags...]`, -> the three argument dataclasses."""
    parser = build_parser()
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        parser.set_defaults(**_read_yaml(Path(argv.pop(0))))
    *arguments, unknown = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(arguments)


def arguments_from_dict(values: dict) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """The Python route (used by sweeps): a flat dict of field names -> the three dataclasses, defaults elsewhere."""
    _check_keys(values, source="the arguments")
    return tuple(cls(**{k: v for k, v in values.items() if k in _field_names(cls)}) for cls in ARGUMENT_CLASSES)


def arguments_to_dict(*arguments) -> dict:
    """The three dataclasses -> one flat dict, the content of training_args.yaml."""
    merged = {}
    for instance in arguments:
        merged.update(dataclasses.asdict(instance))
    return merged


def write_arguments_yaml(path: Path, *arguments) -> None:
    path.write_text(yaml.safe_dump(arguments_to_dict(*arguments), sort_keys=False, allow_unicode=True))


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; give the path of a YAML file or use flags")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML ({_first_line(error)}); fix the file") from None
    if not isinstance(values, dict):
        raise UserError(
            f"config file {path} must hold a mapping of option names to values, not a {type(values).__name__}"
        )
    _check_keys(values, source=f"config file {path}")
    return values


def _check_keys(values: dict, source: str) -> None:
    known = set().union(*(_field_names(cls) for cls in ARGUMENT_CLASSES))
    unknown = sorted(str(key) for key in values if key not in known)
    if unknown:
        raise UserError(
            f"{source} has unknown option(s) {', '.join(unknown)}; valid names are those of `hybrid-lm train --help` "
            "with underscores"
        )


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _allowed_types(annotation) -> tuple:
    """int | None -> (int, NoneType); Literal["a"] -> (str,); a float field also takes ints."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return tuple({type(choice) for choice in typing.get_args(annotation)})
    if origin in (typing.Union, types.UnionType):
        return sum((_allowed_types(arg) for arg in typing.get_args(annotation)), ())
    if origin is not None:  # list[str] -> list: the items come from argparse or YAML as given
        return (origin,)
    if annotation is float:
        return (float, int)
    return (annotation,)


def check_seed(seed: int | None) -> None:
    """torch, numpy and Python's random (all seeded by transformers' set_seed) take seeds in [0, 2**32)."""
    if seed is not None and not 0 <= seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32), got {seed}; pick e.g. 1337")


def check_types(instance) -> None:
    """YAML and Python callers bypass argparse's conversions: reject a value of the wrong type with one line."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value, allowed = getattr(instance, f.name), _allowed_types(hints[f.name])
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            if f.name == "attention_layers" and isinstance(value, (int, list)) and not isinstance(value, bool):
                continue
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise UserError(f"option {f.name} must be {expected}, got {value!r}; fix the value")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"option {f.name} must be a finite number, got {value}; fix the value")
        if typing.get_origin(hints[f.name]) is Literal and value not in typing.get_args(hints[f.name]):
            choices = ", ".join(map(str, typing.get_args(hints[f.name])))
            raise UserError(f"option {f.name} must be one of {choices}, got {value!r}")


# Labels are the inputs shifted inside each block: a block's first token is never predicted.
BLOCK_SIZE_ONE = (
    "--block-size 1 leaves nothing to predict: labels are the block shifted by one token, so a 1-token block has "
    "no target; use --block-size >= 2 (e.g. 128)"
)


def _check_positive(instance, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(instance, name)
        if value is None and allow_none:
            continue
        if value is None or value <= 0:
            raise UserError(f"--{_flag(name)} must be a positive number, got {value}")


def check_script_minimums(args: argparse.Namespace, **minimums: int | float) -> None:
    """The numeric flags of a script (the benchmarks): exits with one `error:` line naming the first flag whose value
    (or any value of a list flag) is below its minimum, before any work. A value of None (unset) passes."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item < minimum:
                raise SystemExit(f"error: --{_flag(name)} {item}: must be at least {minimum}")


def script_device(name: str):
    """A script's --device as a torch.device: cpu or an available CUDA GPU, else one `error:` line and exit."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {device}: this benchmark runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA GPU is available here; use --device cpu")
    return device
