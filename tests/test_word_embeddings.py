"""Word-level models: the word tokenizer, --init-embeddings / --freeze-embeddings, the OOV rate, and the embedding
view of `hybrid-lm inspect`."""

import gzip
import json
from collections import Counter
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.test_generate_cli import error_line, run_cli, single_thread  # noqa: F401
from tests.test_train import TINY, tiny_options
from training.arguments import ModelArguments, arguments_from_dict
from training.data import load_corpus, tokenize_corpus
from training.embeddings import initialise_embeddings, read_word_vectors
from training.inspect import DPI, EMBEDDING_FIGURE_INCHES
from training.tokenization import UNK_TOKEN, build_tokenizer, tokenizer_kind
from training.train import build_model, run_training

pytestmark = pytest.mark.usefixtures("single_thread")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
CORPUS = ["the king and the queen .", "the king , the knight !", "a queen ; a knight ?", "the the the"]


@pytest.fixture(scope="module")
def words():
    return build_tokenizer("word", CORPUS)


# ------------------------------------------------------------------------------------------------------------
# Word tokenizer
# ------------------------------------------------------------------------------------------------------------


def test_known_words_round_trip_exactly(words):
    text = "the queen and the knight ! a king ?"
    ids = words(text)["input_ids"]
    assert len(ids) == len(text.split())
    assert words.decode(ids) == text  # decode joins the words with single spaces
    assert UNK_TOKEN not in words.convert_ids_to_tokens(ids)


def test_an_unseen_word_is_one_unknown_token(words):
    ids = words("the dragon king")["input_ids"]
    assert words.convert_ids_to_tokens(ids) == ["the", UNK_TOKEN, "king"]


def test_punctuation_is_split_from_words_and_placeholders_stay_whole():
    tokenizer = build_tokenizer("word", ["Hello, world! It's <unk> 3.5 @-@ ok..."])
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("Hello, world! It's <unk> 3.5 @-@ ok...")["input_ids"])
    assert tokens == ["Hello", ",", "world", "!", "It", "'", "s", "<unk>", "3", ".", "5", "@-@", "ok", "..."]


def test_vocab_size_caps_the_vocabulary_to_the_most_frequent_words():
    texts = ["sun sun moon sun star", "moon sun . comet moon", "sun , star"]  # sun 5, moon 3, star 2, 1 each
    tokenizer = build_tokenizer("word", texts, vocab_size=7)  # 4 special tokens + the 3 most frequent words
    assert len(tokenizer) == 7
    assert {token for token in tokenizer.get_vocab() if not token.startswith("<|")} == {"sun", "moon", "star"}
    assert tokenizer.convert_ids_to_tokens(tokenizer("comet sun")["input_ids"]) == [UNK_TOKEN, "sun"]
    # Deterministic: the same corpus in another order gives the same ids.
    assert build_tokenizer("word", texts[::-1], vocab_size=7).get_vocab() == tokenizer.get_vocab()


def test_min_frequency_and_lowercase():
    tokenizer = build_tokenizer("word", ["The the THE cat"], min_frequency=2, lowercase=True)
    assert tokenizer.convert_ids_to_tokens(tokenizer("THE Cat")["input_ids"]) == ["the", UNK_TOKEN]


def test_save_and_auto_tokenizer_give_the_same_ids(words, tmp_path):
    words.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "the knight, the queen; a dragon!"
    assert loaded(text)["input_ids"] == words(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == words.decode(words(text)["input_ids"])
    assert tokenizer_kind(loaded) == "word" and tokenizer_kind(build_tokenizer("char", CORPUS)) == "char"


def test_validation_oov_rate_counts_the_unknown_words(words):
    corpus = load_corpus(SHAKESPEARE)
    tokenizer = build_tokenizer("word", [corpus["train"][0]["text"]], vocab_size=500)
    stats = tokenize_corpus(corpus, tokenizer, block_size=64).stats["validation"]
    ids = tokenizer(corpus["validation"][0]["text"])["input_ids"]
    assert stats.text_tokens == len(ids)
    assert stats.unknown_tokens == ids.count(tokenizer.unk_token_id) > 0
    assert stats.unknown_rate == pytest.approx(stats.unknown_tokens / len(ids))


# ------------------------------------------------------------------------------------------------------------
# --init-embeddings / --freeze-embeddings
# ------------------------------------------------------------------------------------------------------------


def write_vectors(path: Path, words: list[str], dimension: int, header: bool = False, seed: int = 0) -> dict:
    """A word2vec/GloVe text file of random vectors; returns {word: vector as written (rounded to 6 places)}."""
    rng = np.random.default_rng(seed)
    vectors = {word: np.round(rng.normal(size=dimension), 6) for word in words}
    lines = [f"{len(words)} {dimension}"] if header else []
    lines += [word + " " + " ".join(f"{value:.6f}" for value in vector) for word, vector in vectors.items()]
    path.write_text("\n".join(lines) + "\n")
    return vectors


FILE_WORDS = ["the", "and", "king", "queen", "The", "Citizen", "zebra"]  # zebra is not in the vocabulary


def expected_rows(vocab: dict[str, int], vectors: dict) -> dict[int, np.ndarray]:
    """Token id -> the file vector it must get: its own spelling, else its lowercased form."""
    rows = {}
    for token, index in vocab.items():
        if token.startswith("<|"):
            continue
        if token in vectors:
            rows[index] = vectors[token]
        elif token.lower() in vectors:
            rows[index] = vectors[token.lower()]
    return rows


@pytest.mark.parametrize("header", [False, True], ids=["glove", "word2vec-header"])
def test_file_vectors_become_the_embedding_rows_of_their_words(tmp_path, header):
    tokenizer = build_tokenizer("word", [SHAKESPEARE.read_text()[:200_000]], vocab_size=2000)
    vectors = write_vectors(tmp_path / "vectors.txt", FILE_WORDS, TINY["hidden_size"], header=header)
    model = build_model(ModelArguments(hidden_size=32, num_attention_heads=2), tokenizer, block_size=32)
    before = model.get_input_embeddings().weight.detach().clone()
    found = initialise_embeddings(model, tokenizer, tmp_path / "vectors.txt")
    weight = model.get_input_embeddings().weight.detach()
    expected = expected_rows(tokenizer.get_vocab(), vectors)
    assert "zebra" not in tokenizer.get_vocab() and {"The", "the", "King", "Citizen"} <= {
        tokenizer.convert_ids_to_tokens(index) for index in expected
    }
    for index, vector in expected.items():
        assert torch.equal(weight[index], torch.tensor(vector, dtype=torch.float32)), index
    # Every other row keeps its initialisation; the tied output embeddings are the same rows.
    others = sorted(set(range(len(tokenizer))) - set(expected))
    assert torch.equal(weight[others], before[others])
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert found == {"file": "vectors.txt", "found": len(expected), "vocabulary": len(tokenizer) - 4}


def test_a_capitalised_token_falls_back_to_the_lowercase_vector(tmp_path):
    vectors = write_vectors(tmp_path / "v.txt.gz.src", ["king"], 4)
    with gzip.open(tmp_path / "v.txt.gz", "wt") as stream:  # gzipped files are read as they are
        stream.write((tmp_path / "v.txt.gz.src").read_text())
    found = read_word_vectors(tmp_path / "v.txt.gz", {"King": 5, "king": 6, "KING": 7, "queen": 8}, 4)
    assert sorted(found) == [5, 6, 7]
    assert all(found[index] == pytest.approx(list(vectors["king"])) for index in found)


def test_frozen_embeddings_keep_the_file_vectors_through_training(tmp_path):
    vectors = write_vectors(tmp_path / "vectors.txt", FILE_WORDS, TINY["hidden_size"])
    common = {"dataset": str(SHAKESPEARE), "tokenizer": "word", "vocab_size": 3000, "max_steps": 6}
    frozen = tmp_path / "frozen"
    options = tiny_options(frozen, **common, init_embeddings=str(tmp_path / "vectors.txt"), freeze_embeddings=True)
    results = run_training(*arguments_from_dict(options))
    trained = AutoModelForCausalLM.from_pretrained(frozen)
    expected = expected_rows(AutoTokenizer.from_pretrained(frozen).get_vocab(), vectors)
    assert results["init_embeddings"] == {"file": "vectors.txt", "found": len(expected), "vocabulary": 2996}
    assert 0 < results["validation_oov_rate"] < 0.2
    weight = trained.get_input_embeddings().weight.detach()
    for index, vector in expected.items():
        assert torch.equal(weight[index], torch.tensor(vector, dtype=torch.float32)), index
    vocab = AutoTokenizer.from_pretrained(frozen).get_vocab()
    # The same run without --freeze-embeddings moves them: the property above is the freeze's doing.
    moving = tiny_options(tmp_path / "moving", **common, init_embeddings=str(tmp_path / "vectors.txt"))
    run_training(*arguments_from_dict(moving))
    moved = AutoModelForCausalLM.from_pretrained(tmp_path / "moving").get_input_embeddings().weight.detach()
    assert not torch.equal(moved[vocab["the"]], torch.tensor(vectors["the"], dtype=torch.float32))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("the 0.1 0.2 0.3\n", "vectors.txt line 1: the vectors have 3 dimensions but the model's embeddings have 32"),
        ("2 300\n", "vectors.txt line 1: the vectors have 300 dimensions but the model's embeddings have 32"),
        ("the " + "0.5 " * 32 + "\nking " + "0.5 " * 31 + "\n", "vectors.txt line 2: expected a word and 32 numbers"),
        ("the " + "0.5 " * 32 + "\nking " + "0.5 " * 31 + "x\n", "vectors.txt line 2: 'x' is not a number"),
        ("the " + "nan " * 32 + "\n", "vectors.txt line 1: the vector is not finite"),
        ("---\ntitle: notes\n", "vectors.txt line 1: no numbers after the first word, so this is not a word2vec"),
        ("The quick brown fox\n", "vectors.txt line 1: no numbers after the first word, so this is not a word2vec"),
    ],
    ids=["dimension", "header-dimension", "short-line", "not-a-number", "nan", "not-vectors", "prose"],
)
def test_bad_vector_files_are_one_line_errors_and_write_nothing(tmp_path, capsys, content, message):
    (tmp_path / "vectors.txt").write_text(content)
    output = tmp_path / "run"
    options = tiny_options(output, dataset=str(SHAKESPEARE), tokenizer="word", max_steps=2)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    code, _, err = run_cli(capsys, "train", *flags, "--init-embeddings", str(tmp_path / "vectors.txt"))
    assert code == 2
    assert message in error_line(err)
    assert not output.exists()


def test_a_binary_vector_file_is_named_as_such(tmp_path):
    (tmp_path / "vectors.bin").write_bytes(b"3 4\nthe \xff\xfe\x00\x01")
    with pytest.raises(Exception, match=r"vectors.bin line 2: not UTF-8 text; a binary word2vec file"):
        read_word_vectors(tmp_path / "vectors.bin", {"the": 4}, 4)


# ------------------------------------------------------------------------------------------------------------
# The embedding view of `hybrid-lm inspect`
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_inspect_neighbours_equal_a_direct_cosine_computation(tmp_path, capsys, kind):
    from tests.test_modeling import peaky_model, tiny_config

    text = SHAKESPEARE.read_text()[:20_000]
    tokenizer = build_tokenizer(kind, [text], model_max_length=256)
    model = peaky_model(tiny_config("gru", "every-2nd", vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    queries = {"word": ["Citizen", "the"], "char": ["e", "C"], "bpe": ["Ġthe", "e"]}[kind]  # BPE: tokens as spelled
    out = tmp_path / "inspect"
    argv = ["inspect", "--model", str(tmp_path / "model"), "--text", text, "--output-dir", str(out)]
    code, _, err = run_cli(capsys, *argv, "--words", *queries, "--neighbours", "4", "--embedding-tokens", "30")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())

    weight = torch.nn.functional.normalize(model.get_input_embeddings().weight.detach().float(), dim=-1)
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    for query in queries:
        index = tokenizer.convert_tokens_to_ids(query)
        similarity = {i: float(weight[i] @ weight[index]) for i in range(len(tokenizer)) if i not in special | {index}}
        expected = sorted(similarity, key=similarity.get, reverse=True)[:4]
        listed = summary["neighbours"][query]
        assert [tokenizer.convert_tokens_to_ids(token) for token, _ in listed] == expected
        assert [value for _, value in listed] == pytest.approx([similarity[i] for i in expected], abs=1e-6)
        assert f"`{query}`" in (out / "summary.md").read_text()

    # embeddings.png: the 30 most frequent tokens of the text, at the figure's size.
    ids = tokenizer(text)["input_ids"]
    counts = Counter(i for i in ids if i not in special)
    assert Counter(summary["embedding_tokens"]) == Counter(
        tokenizer.convert_ids_to_tokens([i for i, _ in counts.most_common(30)])
    )
    side = round(EMBEDDING_FIGURE_INCHES * DPI)
    assert matplotlib.image.imread(out / "embeddings.png").shape[:2] == (side, side)
    # The coordinates are the centred rows projected on two orthogonal directions: distances shrink, never grow.
    points = torch.tensor(summary["embedding_coordinates"])
    rows = model.get_input_embeddings().weight.detach()[tokenizer.convert_tokens_to_ids(summary["embedding_tokens"])]
    assert torch.cdist(points, points).max() <= torch.cdist(rows, rows).max() + 1e-4
    assert points.mean(dim=0).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("words", "message"),
    [(["dragon"], "--words 'dragon' is not in the model's vocabulary"), (["king queen"], "is 2 tokens")],
    ids=["unknown", "two-tokens"],
)
def test_inspect_bad_words_are_one_line_errors(tmp_path, capsys, words, message):
    from tests.test_modeling import peaky_model, tiny_config

    tokenizer = build_tokenizer("word", CORPUS, model_max_length=256)
    peaky_model(tiny_config("gru", "every-2nd", vocab_size=len(tokenizer))).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["inspect", "--model", str(tmp_path / "model"), "--text", "the king", "--output-dir", str(tmp_path / "o")]
    code, _, err = run_cli(capsys, *argv, "--words", *words)
    assert code == 2
    assert message in error_line(err)
    assert not (tmp_path / "o").exists()
