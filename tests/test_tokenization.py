"""Tokenizers: exact round trips, no automatic specials, save/load with identical ids, clear errors."""

import random

import pytest
from transformers import AutoTokenizer

from training.errors import UserError
from training.tokenization import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    build_tokenizer,
    tokenizer_summary,
)

TRAINING_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n  indented   runs of spaces\tand tabs\r\n"
    "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, русский, עברית, emoji 😀👍🏽.\n"
) * 20

# Unicode a user may feed in: newlines, runs of spaces, combining marks, astral-plane characters.
UNICODE_SAMPLES = [
    "plain ascii",
    "two\n\nnewlines\r\nand  runs   of    spaces\t\ttabs ",
    "   leading and trailing spaces   ",
    "e\u0301 combining accent, ß, ﬁ ligature, 中文, 한국어, العربية",
    "emoji 😀👍🏽👨‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]


def _random_unicode(seed: int, length: int = 300) -> str:
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    pieces = []
    for _ in range(length):
        low, high = rng.choice(ranges)
        pieces.append(rng.choice([chr(rng.randint(low, high)), " ", "  ", "\n", "\t"]))
    return "".join(pieces)


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_tokenizer("char", [TRAINING_TEXT], model_max_length=256)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return build_tokenizer("bpe", [TRAINING_TEXT], vocab_size=400, model_max_length=256)


@pytest.mark.parametrize("text", UNICODE_SAMPLES + [_random_unicode(seed) for seed in range(3)])
def test_bpe_round_trips_any_unicode_exactly(bpe_tokenizer, text):
    ids = bpe_tokenizer(text)["input_ids"]
    assert bpe_tokenizer.unk_token_id is None
    assert bpe_tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", UNICODE_SAMPLES + [_random_unicode(seed) for seed in range(3)])
def test_char_round_trips_up_to_the_unknown_token(char_tokenizer, text):
    known = set(TRAINING_TEXT)
    expected = "".join(character if character in known else UNK_TOKEN for character in text)
    ids = char_tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert char_tokenizer.decode(ids) == expected


def test_char_vocabulary_is_the_training_characters_plus_specials(char_tokenizer):
    vocabulary = set(char_tokenizer.get_vocab())
    assert vocabulary == set(TRAINING_TEXT) | {PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN}
    assert len(char_tokenizer) == len(set(TRAINING_TEXT)) + 4


def test_char_vocab_size_cap_keeps_the_most_frequent_characters():
    tokenizer = build_tokenizer("char", ["aaaa bbb cc d"], vocab_size=4 + 3)
    assert set(tokenizer.get_vocab()) - {PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN} == {"a", "b", " "}
    assert tokenizer.decode(tokenizer("abcd")["input_ids"]) == f"ab{UNK_TOKEN}{UNK_TOKEN}"


def test_bpe_reaches_the_requested_vocab_size(bpe_tokenizer):
    assert len(bpe_tokenizer) == 400
    # Merges learned from the corpus: frequent words take fewer tokens than bytes.
    assert len(bpe_tokenizer("Speak, speak.")["input_ids"]) < len(b"Speak, speak.")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encoding_adds_no_bos_or_eos(kind, char_tokenizer, bpe_tokenizer):
    tokenizer = char_tokenizer if kind == "char" else bpe_tokenizer
    ids = tokenizer("speak")["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == "speak"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_auto_tokenizer_give_identical_ids(kind, char_tokenizer, bpe_tokenizer, tmp_path):
    tokenizer = char_tokenizer if kind == "char" else bpe_tokenizer
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in UNICODE_SAMPLES + [TRAINING_TEXT[:500]]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer_summary(loaded) == tokenizer_summary(tokenizer)
    assert loaded.model_max_length == 256
    # The same folder also loads through build_tokenizer's path route.
    assert (
        build_tokenizer(str(tmp_path))(TRAINING_TEXT[:200])["input_ids"] == tokenizer(TRAINING_TEXT[:200])["input_ids"]
    )


def test_summary_names_kind_and_special_ids(char_tokenizer, bpe_tokenizer):
    assert tokenizer_summary(char_tokenizer) == {
        "kind": "char",
        "vocab_size": len(char_tokenizer),
        "model_max_length": 256,
        "pad_token_id": 0,
        "bos_token_id": 2,  # BOS is EOS (GPT-2's convention): the token every document follows in training
        "eos_token_id": 2,
        "unk_token_id": 3,
    }
    summary = tokenizer_summary(bpe_tokenizer)
    assert (summary["kind"], summary["vocab_size"], summary["unk_token_id"]) == ("bpe", 400, None)
    assert [summary[f"{name}_token_id"] for name in ("pad", "bos", "eos")] == [0, 2, 2]


def test_bpe_vocab_size_too_small_names_the_minimum():
    with pytest.raises(UserError) as caught:
        build_tokenizer("bpe", ["some text"], vocab_size=100)
    message = str(caught.value)
    assert "--vocab-size 100 is too small for a byte-level BPE tokenizer" in message
    assert "at least 259 (256 byte symbols + 3 special tokens)" in message
    assert "pass --vocab-size 259 or more" in message
    assert len(build_tokenizer("bpe", ["some text"], vocab_size=259)) == 259  # the minimum itself works


def test_char_vocab_size_too_small_names_the_minimum():
    with pytest.raises(UserError, match=r"--vocab-size 4 is too small for a char tokenizer: it needs at least 5"):
        build_tokenizer("char", ["abc"], vocab_size=4)


def test_unknown_tokenizer_kind_or_missing_folder(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(UserError) as caught:
        build_tokenizer(str(missing))
    assert str(caught.value) == (
        f"unknown tokenizer {str(missing)!r}: use 'char', 'bpe' or the path of a folder written by save_pretrained"
    )


def test_folder_without_tokenizer_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"does not hold a loadable tokenizer .*pass a folder written by"):
        build_tokenizer(str(tmp_path))


def test_bpe_training_is_deterministic(bpe_tokenizer):
    # Cached token blocks are keyed by the tokenizer: a retrained BPE must be the very same tokenizer.
    again = build_tokenizer("bpe", [TRAINING_TEXT], vocab_size=400, model_max_length=256)
    assert again.backend_tokenizer.to_str() == bpe_tokenizer.backend_tokenizer.to_str()
