"""Tokenizers for training: character level, word level, byte-level BPE trained on the corpus, or a saved folder.

Every tokenizer returned here is a `PreTrainedTokenizerFast` with bos/eos/pad special tokens, a real
`model_max_length`, and no special tokens added on encode: `generate()` prompts must not end in EOS, and the
data pipeline appends EOS between documents itself. `save_pretrained` + `AutoTokenizer.from_pretrained` give
back the same ids.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from training.errors import UserError

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
# Ids 0, 1, 2 (and 3 for char and word): the same specials in the same order for every built tokenizer.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
BYTE_ALPHABET_SIZE = 256
DEFAULT_BPE_VOCAB_SIZE = 8192
TOKENIZER_KINDS = ("char", "word", "bpe")
# Words: a run of letters/digits/underscores, a run of punctuation, or a placeholder such as WikiText's <unk>
# (which would otherwise become "<", "unk", ">"). tokenizers' own Whitespace pre-tokenizer, plus placeholders.
WORD_PATTERN = r"<\w+>|\w+|[^\w\s]+"


def build_tokenizer(
    kind: str,
    texts: Iterable[str] | None = None,
    vocab_size: int | None = None,
    model_max_length: int = 1024,
    *,
    min_frequency: int = 1,
    lowercase: bool = False,
) -> PreTrainedTokenizerFast:
    """Builds (char, word, bpe) from `texts`, or loads a tokenizer folder when `kind` is a path.

    Args:
        kind: "char" (one token per character seen in `texts`, unseen characters map to `<|unk|>`),
            "word" (one token per word or punctuation run, split on whitespace and punctuation; words outside
            the vocabulary map to `<|unk|>`; decode joins the tokens with spaces), "bpe" (byte-level BPE
            trained on `texts`: no unknown token, exact round trip), or the path of a folder written by
            `save_pretrained` (loaded locally, never from the Hub).
        texts: training text, e.g. the train split's documents; required for the built kinds.
        vocab_size: for "bpe" the target vocabulary (default 8192; at least 256 bytes + 3 specials); for
            "char" and "word" an optional cap (special tokens included) that keeps the most frequent symbols.
        model_max_length: the longest sequence the model is meant to see (saved with the tokenizer).
        min_frequency: symbols (characters, words, BPE merges) seen fewer times than this are left out.
        lowercase: lowercase the text before tokenizing (saved with the tokenizer, so it applies on encode).
    """
    if model_max_length < 1:
        raise UserError(f"model_max_length must be a positive number of tokens, got {model_max_length}")
    if min_frequency < 1:
        raise UserError(f"min_frequency must be a positive count, got {min_frequency}")
    if kind in TOKENIZER_KINDS:
        if texts is None:
            raise UserError(f"a {kind} tokenizer is trained on the corpus: pass the training texts")
        builder = {"char": _build_char_tokenizer, "word": _build_word_tokenizer, "bpe": _build_bpe_tokenizer}[kind]
        return builder(texts, vocab_size, model_max_length, min_frequency, lowercase)
    return _load_tokenizer_folder(kind, model_max_length)


def _wrap(backend: Tokenizer, model_max_length: int, **special_tokens: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        # BOS is EOS, as in GPT-2: documents are joined with EOS in training, so the token that generate() and
        # lm-evaluation-harness put before a text is the one the model saw before every document. (<|bos|> keeps its
        # id so that the ids of the other tokens never move.)
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        # Keeps " ," and " ." as written: decode must return the text exactly.
        clean_up_tokenization_spaces=False,
        **special_tokens,
    )


def _check_vocab_cap(kind: str, vocab_size: int | None, specials: list[str], unit: str) -> None:
    if vocab_size is not None and vocab_size <= len(specials):
        raise UserError(
            f"--vocab-size {vocab_size} is too small for a {kind} tokenizer: it needs at least {len(specials) + 1} "
            f"({len(specials)} special tokens + 1 {unit}); pass a larger --vocab-size or leave it unset"
        )


def _lowercase(backend: Tokenizer, lowercase: bool) -> Tokenizer:
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    return backend


def _build_char_tokenizer(
    texts: Iterable[str], vocab_size: int | None, model_max_length: int, min_frequency: int, lowercase: bool
) -> PreTrainedTokenizerFast:
    specials = [*SPECIAL_TOKENS, UNK_TOKEN]
    _check_vocab_cap("char", vocab_size, specials, "character")
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update((text or "").lower() if lowercase else text or "")
    if not counts:
        raise UserError("cannot build a char tokenizer from an empty corpus: the training texts contain no characters")
    keep = None if vocab_size is None else vocab_size - len(specials)
    # Most frequent first when capped, then sorted so the ids do not depend on the order texts arrive in.
    characters = sorted(character for character, count in counts.most_common(keep) if count >= min_frequency)
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = _lowercase(Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN)), lowercase)
    # An empty pattern isolates every character: whitespace and newlines become tokens of their own.
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return _wrap(backend, model_max_length, unk_token=UNK_TOKEN)


def _build_word_tokenizer(
    texts: Iterable[str], vocab_size: int | None, model_max_length: int, min_frequency: int, lowercase: bool
) -> PreTrainedTokenizerFast:
    specials = [*SPECIAL_TOKENS, UNK_TOKEN]
    _check_vocab_cap("word", vocab_size, specials, "word")
    backend = _lowercase(Tokenizer(models.WordLevel(unk_token=UNK_TOKEN)), lowercase)
    # invert=True: the pattern matches the words kept; the whitespace between them is dropped.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True)
    # No decoder: tokenizers joins the tokens with single spaces ("Hello , world .").
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size or 2**31 - 1,  # the most frequent words first; ties in a fixed (lexical) order
        min_frequency=min_frequency,
        special_tokens=specials,
        show_progress=False,
    )
    backend.train_from_iterator((text for text in texts if text), trainer=trainer)
    if backend.get_vocab_size() == len(specials):
        raise UserError(
            "cannot build a word tokenizer: no word of the training texts is seen at least "
            f"{min_frequency} time(s); lower --min-frequency or use more data"
        )
    return _wrap(backend, model_max_length, unk_token=UNK_TOKEN)


def _build_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int | None, model_max_length: int, min_frequency: int, lowercase: bool
) -> PreTrainedTokenizerFast:
    vocab_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
    minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise UserError(
            f"--vocab-size {vocab_size} is too small for a byte-level BPE tokenizer: it needs at least {minimum} "
            f"({BYTE_ALPHABET_SIZE} byte symbols + {len(SPECIAL_TOKENS)} special tokens); "
            f"pass --vocab-size {minimum} or more (e.g. {DEFAULT_BPE_VOCAB_SIZE})"
        )
    backend = _lowercase(Tokenizer(models.BPE()), lowercase)
    # No prefix space: encoding must not change the text, so decode(encode(text)) == text byte for byte.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes up front: any input, even bytes the corpus never had, encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((text for text in texts if text), trainer=trainer)
    return _wrap(backend, model_max_length)


def _load_tokenizer_folder(path: str, model_max_length: int) -> PreTrainedTokenizerFast:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"unknown tokenizer {path!r}: use 'char', 'bpe' or the path of a folder written by save_pretrained"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{folder} does not hold a loadable tokenizer ({first_line}); "
            "pass a folder written by tokenizer.save_pretrained"
        ) from error
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer in {folder} has no eos_token, which separates documents; "
            "set one (tokenizer.eos_token = ...) and save it again"
        )
    if tokenizer.pad_token_id is None:
        # Batches of generation prompts need a pad id; EOS is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.model_max_length > 1e9:
        # Unset limits are stored as ~1e30; keep a real one.
        tokenizer.model_max_length = model_max_length
    return tokenizer


def tokenizer_kind(tokenizer: PreTrainedTokenizerFast) -> str:
    """The kind of a tokenizer: "char", "word", "bpe" (byte-level BPE) or the backend model's own name otherwise."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model_type = state["model"]["type"]
    pre_tokenizer = state.get("pre_tokenizer") or {}
    if model_type == "WordLevel" and pre_tokenizer.get("type") == "Split":
        return "char" if pre_tokenizer.get("pattern") == {"String": ""} else "word"
    pre_tokenizer = pre_tokenizer.get("type")
    if model_type == "BPE" and pre_tokenizer == "ByteLevel":
        return "bpe"
    return model_type.lower()


def tokenizer_summary(tokenizer: PreTrainedTokenizerFast) -> dict:
    """What a model card or a run log says about a tokenizer."""
    return {
        "kind": tokenizer_kind(tokenizer),
        "vocab_size": len(tokenizer),
        "model_max_length": int(tokenizer.model_max_length),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "unk_token_id": tokenizer.unk_token_id,
    }
