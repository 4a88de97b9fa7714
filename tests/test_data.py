"""Corpus loading, held-out splits, block tokenization with its cache, streaming, and data errors."""

import json
import math
import socket
from pathlib import Path

import pandas as pd
import pytest
from datasets import DatasetDict, IterableDatasetDict

from training import data
from training.data import (
    BUILTIN_CORPORA,
    collate_blocks,
    corpus_stats,
    load_corpus,
    tokenize_corpus,
    training_texts,
)
from training.errors import UserError
from training.tokenization import build_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"

DOCUMENTS = [f"document {index}\nline two of {index}\n\n  indented {'é' * index}" for index in range(20)]


def _texts(split) -> list[str]:
    return [row["text"] for row in split]


@pytest.fixture(scope="module")
def shakespeare_path() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE} (the shared data folder beside the checkout)")
    return SHAKESPEARE


@pytest.fixture(scope="module")
def shakespeare(shakespeare_path, tmp_path_factory) -> DatasetDict:
    return load_corpus(str(shakespeare_path), cache_dir=tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="module")
def shakespeare_char(shakespeare):
    return build_tokenizer("char", training_texts(shakespeare["train"]))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- loading -------------------------------------------------------------------------------------------


def test_builtin_python_docs_loads_offline_and_holds_out_last_documents(no_network):
    corpus = load_corpus("python-docs")
    documents = BUILTIN_CORPORA["python-docs"].documents()
    assert len(documents) >= 60 and sum(map(len, documents)) > 200_000
    assert list(corpus) == ["train", "validation"] and corpus["train"].column_names == ["text"]
    held_out = len(documents) - int(len(documents) * 0.9)
    assert _texts(corpus["validation"]) == documents[-held_out:]
    assert _texts(corpus["train"]) + _texts(corpus["validation"]) == documents


def test_tiny_shakespeare_splits_by_characters_like_nanogpt(shakespeare, shakespeare_path):
    train, validation = corpus_text = (_texts(shakespeare["train"]), _texts(shakespeare["validation"]))
    assert [len(texts) for texts in corpus_text] == [1, 1]  # one document each
    assert (len(train[0]), len(validation[0])) == (1_003_854, 111_540)
    assert train[0] + validation[0] == shakespeare_path.read_text(encoding="utf-8")


def test_txt_file_is_one_document_kept_byte_exact(tmp_path):
    text = "line one\r\nline two\n\n\n   spaced   out\ttabbed\rold mac line\n" * 30
    path = tmp_path / "notes.txt"
    path.write_bytes(text.encode())
    corpus = load_corpus(str(path), cache_dir=tmp_path / "cache")
    train, validation = corpus["train"]["text"][0], corpus["validation"]["text"][0]
    assert train + validation == text and len(train) == int(len(text) * 0.9)


def _write(folder: Path, kind: str, name: str, texts: list[str], column: str = "content") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{kind}"
    rows = [{column: text, "id": index} for index, text in enumerate(texts)]
    if kind == "jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("layout", ["file", "folder", "glob"])
def test_tabular_inputs_load_their_text_column(tmp_path, kind, layout):
    if layout == "file":
        source = _write(tmp_path / "data", kind, "corpus", DOCUMENTS)
    else:  # two shards, read in name order
        _write(tmp_path / "data", kind, "part-0", DOCUMENTS[:12])
        source = _write(tmp_path / "data", kind, "part-1", DOCUMENTS[12:]).parent
        source = source / f"part-*.{kind}" if layout == "glob" else source
    corpus = load_corpus(str(source), text_column="content", cache_dir=tmp_path / "cache")
    assert corpus["train"].column_names == ["text"] == corpus["validation"].column_names
    assert _texts(corpus["train"]) == DOCUMENTS[:18] and _texts(corpus["validation"]) == DOCUMENTS[18:]


def test_folder_of_txt_files_is_one_document_per_file(tmp_path):
    for index, text in enumerate(DOCUMENTS):
        (tmp_path / "books").mkdir(exist_ok=True)
        (tmp_path / "books" / f"book-{index:02d}.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "books"), cache_dir=tmp_path / "cache")
    assert _texts(corpus["train"]) == DOCUMENTS[:18] and _texts(corpus["validation"]) == DOCUMENTS[18:]


def test_folder_where_only_a_stray_name_looks_like_a_split_is_one_corpus(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for name, text in [("a.txt", "first"), ("b.txt", "second"), ("test-notes.txt", "third"), (".hidden.txt", "x")]:
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "README.md").write_text("# my notes\n", encoding="utf-8")
    corpus = load_corpus(str(folder), cache_dir=tmp_path / "cache")
    assert _texts(corpus["train"]) == ["first", "second"] and _texts(corpus["validation"]) == ["third"]


def test_folder_with_its_own_validation_split_uses_it(tmp_path):
    _write(tmp_path / "data", "jsonl", "train", DOCUMENTS[:5], column="text")
    _write(tmp_path / "data", "jsonl", "validation", DOCUMENTS[5:7], column="text")
    corpus = load_corpus(str(tmp_path / "data"), cache_dir=tmp_path / "cache")
    assert _texts(corpus["train"]) == DOCUMENTS[:5] and _texts(corpus["validation"]) == DOCUMENTS[5:7]


@pytest.fixture
def dataset_repository(tmp_path) -> Path:
    """A dataset laid out as on the Hub (data files + README configs), loaded through `load_dataset(name, config)`."""
    repository = tmp_path / "user" / "poems"
    _write(repository / "short", "parquet", "train", DOCUMENTS[:4], column="body")
    _write(repository / "short", "parquet", "validation", DOCUMENTS[4:6], column="body")
    _write(repository / "long", "parquet", "train", DOCUMENTS[6:16], column="body")
    configs = [
        ("short", {"train": "short/train.parquet", "validation": "short/validation.parquet"}),
        ("long", {"train": "long/train.parquet"}),
    ]
    lines = ["---", "configs:"]
    for name, files in configs:
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in files.items()]
    (repository / "README.md").write_text("\n".join([*lines, "---", "# poems", ""]), encoding="utf-8")
    return repository


def test_dataset_name_with_config_suffix_or_argument(dataset_repository, tmp_path, no_network):
    short = load_corpus(f"{dataset_repository}:short", text_column="body", cache_dir=tmp_path / "cache")
    assert _texts(short["train"]) == DOCUMENTS[:4] and _texts(short["validation"]) == DOCUMENTS[4:6]
    long = load_corpus(str(dataset_repository), dataset_config="long", text_column="body", cache_dir=tmp_path / "c")
    assert _texts(long["train"]) == DOCUMENTS[6:15] and _texts(long["validation"]) == DOCUMENTS[15:16]


def test_dataset_with_several_configs_asks_for_one(dataset_repository, tmp_path):
    with pytest.raises(UserError) as caught:
        load_corpus(str(dataset_repository), text_column="body", cache_dir=tmp_path / "cache")
    assert str(caught.value) == (
        f"dataset {str(dataset_repository)!r}: Config name is missing. Please pick one among the available configs: "
        "['short', 'long']; pass one of its configs as name:config"
    )


def test_unreachable_hub_dataset_is_a_user_error(monkeypatch, no_network):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as caught:
        load_corpus("someone/no-such-corpus:main")
    message = str(caught.value)
    assert message.startswith("dataset 'someone/no-such-corpus' could not be loaded (")
    assert message.endswith(
        "check the name (and that you are online or have it cached), or pass a local file, folder or glob"
    )


# --- streaming -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["jsonl", "txt-folder", "python-docs", "repository"])
def test_streaming_yields_the_same_texts_in_the_same_order(tmp_path, source, dataset_repository):
    options = {}
    if source == "jsonl":
        name = str(_write(tmp_path / "data", "jsonl", "corpus", DOCUMENTS, column="text"))
    elif source == "txt-folder":
        for index, text in enumerate(DOCUMENTS):
            (tmp_path / "books").mkdir(exist_ok=True)
            (tmp_path / "books" / f"book-{index:02d}.txt").write_text(text, encoding="utf-8")
        name = str(tmp_path / "books")
    elif source == "repository":
        name, options = f"{dataset_repository}:long", {"text_column": "body"}
    else:
        name = source
    eager = load_corpus(name, cache_dir=tmp_path / "cache", **options)
    lazy = load_corpus(name, streaming=True, **options)
    assert isinstance(lazy, IterableDatasetDict)
    for split in ("train", "validation"):
        assert _texts(lazy[split]) == _texts(eager[split]) != []


def test_streaming_blocks_equal_the_first_non_streaming_blocks(shakespeare_path, shakespeare, shakespeare_char):
    eager = tokenize_corpus(shakespeare, shakespeare_char, block_size=64)
    lazy = tokenize_corpus(load_corpus(str(shakespeare_path), streaming=True), shakespeare_char, block_size=64)
    for split in ("train", "validation"):
        first = [list(row["input_ids"]) for _, row in zip(range(50), lazy[split])]
        assert first == eager[split][:50]["input_ids"]


# --- tokenizing into blocks ----------------------------------------------------------------------------


def test_blocks_are_the_document_stream_joined_with_eos(tmp_path):
    tokenizer = build_tokenizer("char", DOCUMENTS)
    corpus = load_corpus(str(_write(tmp_path, "jsonl", "corpus", DOCUMENTS, column="text")), cache_dir=tmp_path / "c")
    blocks = tokenize_corpus(corpus, tokenizer, block_size=16)
    stream = [token for text in DOCUMENTS[:18] for token in [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]]
    expected = [stream[start : start + 16] for start in range(0, len(stream) - 15, 16)]
    assert blocks["train"]["input_ids"] == expected  # only the last partial block is dropped
    stats = blocks.stats["train"]
    assert (stats.documents, stats.tokens, stats.blocks) == (18, len(stream), len(stream) // 16)
    assert stats.characters == sum(map(len, DOCUMENTS[:18])) == stats.tokens - 18  # char: 1 token per char + EOS


def test_second_run_loads_from_cache_without_tokenizing(shakespeare, shakespeare_char, tmp_path, monkeypatch):
    first = tokenize_corpus(shakespeare, shakespeare_char, block_size=128, cache_dir=tmp_path)
    assert first.cache_hit is False

    def refuse_to_tokenize(*args, **kwargs):
        raise AssertionError("the tokenizer ran although the cache holds these blocks")

    monkeypatch.setattr(data, "_tokenize_documents", refuse_to_tokenize)
    second = tokenize_corpus(shakespeare, shakespeare_char, block_size=128, cache_dir=tmp_path)
    assert second.cache_hit is True
    assert corpus_stats(second) == corpus_stats(first)
    for split in ("train", "validation"):
        assert second[split]["input_ids"] == first[split]["input_ids"]
    # A different block size is a different cache entry: it must tokenize again.
    with pytest.raises(AssertionError, match="the tokenizer ran"):
        tokenize_corpus(shakespeare, shakespeare_char, block_size=256, cache_dir=tmp_path)


def test_stats_give_bits_per_character(shakespeare, shakespeare_char):
    stats = tokenize_corpus(shakespeare, shakespeare_char, block_size=1024).stats["validation"]
    assert (stats.documents, stats.characters, stats.tokens, stats.blocks) == (1, 111_540, 111_541, 108)
    loss = 1.5
    assert stats.bits_per_character(loss) == pytest.approx(loss * 111_541 / 111_540 / 0.6931471805599453)


def test_several_processes_give_the_same_blocks():
    corpus = load_corpus("python-docs")
    tokenizer = build_tokenizer("bpe", training_texts(corpus["train"]), vocab_size=300)
    one = tokenize_corpus(corpus, tokenizer, block_size=256, num_proc=1)
    two = tokenize_corpus(corpus, tokenizer, block_size=256, num_proc=2)
    assert corpus_stats(one) == corpus_stats(two)
    assert one["train"]["input_ids"] == two["train"]["input_ids"]
    assert tokenizer.decode(one["validation"][0]["input_ids"]) in "".join(
        text + tokenizer.eos_token for text in corpus["validation"]["text"]
    )


def test_collated_blocks_train_the_hybrid_model(shakespeare, shakespeare_char):
    from hybrid_rnn_lm import HybridRnnLmConfig, HybridRnnLmForCausalLM

    blocks = tokenize_corpus(shakespeare, shakespeare_char, block_size=32)
    batch = collate_blocks([blocks["train"][index] for index in range(4)])
    assert batch["input_ids"].shape == (4, 32) and str(batch["labels"].dtype) == "torch.int64"
    config = HybridRnnLmConfig(
        vocab_size=len(shakespeare_char),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    loss = HybridRnnLmForCausalLM(config)(**batch).loss
    # A fresh model predicts about uniformly: the loss of real blocks is near ln(vocabulary size).
    assert loss.item() == pytest.approx(math.log(len(shakespeare_char)), rel=0.2)


# --- errors --------------------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "data" / "x.txt"
    with pytest.raises(UserError) as caught:
        load_corpus(str(missing))
    assert str(caught.value).startswith(f"{missing} does not exist: pass an existing .txt/.jsonl/.parquet file")


@pytest.mark.parametrize("name", ["reviews.csv", "notes"])
def test_a_file_of_another_format_is_named_as_such(tmp_path, name):
    (tmp_path / name).write_text("text,label\nhello,1\n")
    with pytest.raises(UserError) as caught:
        load_corpus(str(tmp_path / name))
    kind = ".csv" if name.endswith(".csv") else "a file without an extension"
    assert str(caught.value) == (
        f"{tmp_path / name}: {kind} is not a corpus format this reads; pass a .txt, .jsonl or .json (with a text "
        "column) or .parquet file, or convert it to one"
    )


def test_glob_matching_nothing_is_named(tmp_path):
    with pytest.raises(UserError, match=r"no \.txt/\.jsonl/\.parquet files match .*\*\.jsonl"):
        load_corpus(str(tmp_path / "*.jsonl"))


@pytest.mark.parametrize("layout", ["txt", "txt-folder", "jsonl"])
def test_empty_corpus_is_refused(tmp_path, layout):
    folder = tmp_path / "data"
    folder.mkdir()
    if layout == "jsonl":
        (folder / "empty.jsonl").write_text("", encoding="utf-8")
    else:
        for name in ["a.txt", "b.txt"] if layout == "txt-folder" else ["a.txt"]:
            (folder / name).write_text("", encoding="utf-8")
    source = folder if layout == "txt-folder" else next(folder.iterdir())
    with pytest.raises(UserError, match=rf"^{source} is empty: "):
        load_corpus(str(source), cache_dir=tmp_path / "cache")


def test_split_of_empty_documents_is_refused(tmp_path):
    source = _write(tmp_path, "jsonl", "blank", ["", "", ""], column="text")
    corpus = load_corpus(str(source), cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match=r"^the train split is empty \(0 characters of text\)"):
        tokenize_corpus(corpus, build_tokenizer("char", ["abc"]), block_size=4)


@pytest.mark.parametrize("layout", ["txt", "txt-folder", "jsonl"])
def test_undecodable_bytes_name_file_and_offset(tmp_path, layout, monkeypatch):
    monkeypatch.setattr(data, "_READ_CHUNK_BYTES", 7)  # check that offsets survive chunk boundaries
    good = "ascii then é and 😀\n".encode()
    folder = tmp_path / "data"
    folder.mkdir()
    if layout == "jsonl":
        bad = folder / "x.jsonl"
        prefix = b'{"text": "fine"}\n{"text": "' + good
        bad.write_bytes(prefix + b'\xff"}\n')
    else:
        bad = folder / "x.txt"
        prefix = good * 3
        bad.write_bytes(prefix + b"\xff tail")
        if layout == "txt-folder":
            (folder / "a.txt").write_text("a fine first document", encoding="utf-8")
    source = folder if layout == "txt-folder" else bad
    with pytest.raises(UserError) as caught:
        load_corpus(str(source), cache_dir=tmp_path / "cache")
    assert str(caught.value) == (
        f"{bad} is not valid UTF-8 at byte {len(prefix)}: invalid start byte (0xff); "
        "re-encode the file as UTF-8, e.g. with `iconv -f latin1 -t utf-8`"
    )


def test_truncated_character_at_end_of_file_is_named(tmp_path):
    bad = tmp_path / "cut.jsonl"
    prefix = '{"text": "ok"}\n{"text": "é'.encode()
    bad.write_bytes(prefix + "😀".encode()[:2])
    with pytest.raises(UserError, match=rf"^{bad} is not valid UTF-8 at byte {len(prefix)}: unexpected end of data"):
        load_corpus(str(bad), cache_dir=tmp_path / "cache")


def test_missing_text_column_names_the_available_columns(tmp_path):
    source = _write(tmp_path, "jsonl", "corpus", DOCUMENTS)
    with pytest.raises(UserError) as caught:
        load_corpus(str(source), cache_dir=tmp_path / "cache")
    assert str(caught.value) == (
        f"{source} has no column 'text'; its columns are: content, id; pass the one holding the text with --text-column"
    )


def test_block_size_larger_than_a_split_says_how_many_tokens_it_has(tmp_path):
    source = tmp_path / "small.txt"
    source.write_text("x" * 1000, encoding="utf-8")
    corpus = load_corpus(str(source), cache_dir=tmp_path / "cache")
    with pytest.raises(UserError) as caught:
        tokenize_corpus(corpus, build_tokenizer("char", ["x"]), block_size=128)
    # 900 + 1 EOS tokens of train fit; validation has 100 characters + 1 EOS.
    assert str(caught.value) == (
        "the block size (128 tokens) is longer than the validation split, which has 101 tokens: use --block-size "
        "101 or less, or more data (a larger corpus, or a larger --validation-fraction)"
    )
    with pytest.raises(UserError) as caught:  # a larger validation share would make the train split shorter still
        tokenize_corpus(corpus, build_tokenizer("char", ["x"]), block_size=1000)
    assert str(caught.value) == (
        "the block size (1000 tokens) is longer than the train split, which has 901 tokens: use --block-size "
        "901 or less, or more data (a larger corpus, or a smaller --validation-fraction)"
    )


def test_validation_fraction_out_of_range_is_refused():
    with pytest.raises(UserError, match=r"validation_fraction must be between 0 and 1 \(exclusive\), got 1.5"):
        load_corpus("python-docs", validation_fraction=1.5)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "fine"}', '{"text": 5}'], 'line 2: "text" holds a number, not a string; fix that line'),
        (['{"text": "fine"}', '{"text": ["a", "b"]}'], 'line 2: "text" holds a list, not a string'),
        (['{"text": "fine"}', "", '{"text": "torn'], "line 3: not valid JSON (Unterminated string starting at)"),
        (
            ['["text", "fine"]'],
            'line 1: a JSON list, not an object; each line must be an object such as {"text": "..."}',
        ),
    ],
    ids=["number", "list", "broken-line", "not-an-object"],
)
def test_broken_json_lines_name_the_file_and_line(tmp_path, lines, message):
    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as caught:
        load_corpus(str(source), cache_dir=tmp_path / "cache")
    assert str(caught.value).startswith(f"{source}, {message}") and "\n" not in str(caught.value)
