"""Corpora for language-model training, through `datasets`.

`load_corpus` turns a local file/folder/glob, a Hub dataset or a built-in corpus into "train" and "validation"
splits with one "text" column. `tokenize_corpus` joins each split's documents with EOS into one token stream
and cuts it into fixed-length blocks (nanoGPT style: only the last partial block is dropped), caches the
result on disk by fingerprint, and records the character and token counts that bits per character need.
Both work in streaming mode too (memory stays flat across documents; one document is always read whole).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    IterableDataset,
    IterableDatasetDict,
    List,
    Value,
    load_dataset,
    load_from_disk,
)
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerFast

from training.errors import UserError

logger = logging.getLogger(__name__)

# Local formats and the `datasets` builder that reads each (.txt is read here: one document per file).
FILE_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "dev")
_GLOB_CHARACTERS = "*?["
_READ_CHUNK_BYTES = 1 << 24
# Bump when the layout of cached blocks changes, so old caches are not reused.
_CACHE_FORMAT = 2


@dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus that ships with Python itself: available on every machine, no download."""

    description: str
    documents: Callable[[], list[str]]


def _python_docs_documents() -> list[str]:
    from pydoc_data.topics import topics

    # One document per help topic ("assert", "lambda", ...), in name order so the split is stable.
    return [topics[name] for name in sorted(topics)]


BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    "python-docs": BuiltinCorpus(
        description="the Python language reference help topics shipped with CPython (pydoc_data.topics): "
        "~80 documents, ~0.5 MB of English prose and code",
        documents=_python_docs_documents,
    ),
}

Corpus = DatasetDict | IterableDatasetDict
Split = Dataset | IterableDataset


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def load_corpus(
    dataset: str | os.PathLike,
    *,
    dataset_config: str | None = None,
    text_column: str = "text",
    validation_fraction: float = 0.1,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
) -> Corpus:
    """Loads a corpus as splits "train" and "validation", each with the single column "text".

    Args:
        dataset: a built-in corpus name (see `BUILTIN_CORPORA`); a local .txt/.jsonl/.parquet file, a folder
            of them, or a glob; or a Hub dataset name, optionally as "name:config". A .txt file is one
            document, kept exactly (newlines included).
        dataset_config: the Hub dataset configuration (same as the ":config" suffix).
        text_column: the column holding the text in .jsonl/.parquet/Hub data; renamed to "text".
        validation_fraction: the held-out share when the data has no validation split of its own: the
            last characters of a single document (nanoGPT's 90/10 split), else the last documents.
        streaming: return `IterableDataset`s that read the data lazily, in the same order as non-streaming.
        cache_dir: where `datasets` keeps its Arrow files (default: its own cache).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise UserError(f"validation_fraction must be between 0 and 1 (exclusive), got {validation_fraction}")
    name, config = _split_config_suffix(os.fspath(dataset), dataset_config)
    cache_dir = None if cache_dir is None else str(cache_dir)
    if name in BUILTIN_CORPORA:
        documents = BUILTIN_CORPORA[name].documents()
        splits = _hold_out(Dataset.from_dict({"text": documents}), validation_fraction)
        if streaming:
            splits = {split_name: split.to_iterable_dataset() for split_name, split in splits.items()}
        return _corpus(splits)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path, config, text_column, validation_fraction, streaming, cache_dir)
    if path.is_file() or any(character in name for character in _GLOB_CHARACTERS):
        files = _expand_files(name)
        return _load_files({"train": files}, text_column, validation_fraction, streaming, cache_dir, name)
    if _looks_like_path(name):
        raise UserError(
            f"{name} does not exist: pass an existing .txt/.jsonl/.parquet file, folder or glob, "
            f"a Hub dataset name, or a built-in corpus ({', '.join(BUILTIN_CORPORA)})"
        )
    loaded = _load_with_datasets(name, config, streaming=streaming, cache_dir=cache_dir)
    return _finish(loaded, text_column, validation_fraction, name)


def load_whole_text(dataset: str | os.PathLike, *, text_column: str = "text", cache_dir: str | None = None) -> Dataset:
    """Every document of a local .txt/.jsonl/.parquet file, folder or glob, as one split (nothing held out): e.g. a
    test file scored whole. A folder laid out in splits gives its test split (train/validation files excluded)."""
    name = os.fspath(dataset)
    path = Path(name).expanduser()
    if path.is_dir():
        per_split = _files_per_split(path)
        files = per_split.get("test") or [file for split_files in per_split.values() for file in split_files]
        if not files:
            raise UserError(f"{name} holds no .txt, .jsonl or .parquet files: point to the text to score")
    elif path.is_file() or any(character in name for character in _GLOB_CHARACTERS):
        files = _expand_files(name)
    else:
        raise UserError(f"{name} does not exist: pass an existing .txt/.jsonl/.parquet file, folder or glob")
    builder = _format_of(files, name)
    if builder == "text":
        return _text_files_split(files, streaming=False, cache_dir=cache_dir)
    loaded = _load_with_datasets(builder, None, cache_dir=cache_dir, data_files={"test": [str(f) for f in files]})
    return _text_only(loaded["test"], text_column, name)


def _split_config_suffix(dataset: str, dataset_config: str | None) -> tuple[str, str | None]:
    """Splits "name:config" -> ("name", "config"), unless the whole string is an existing path."""
    if dataset_config is not None or ":" not in dataset or Path(dataset).expanduser().exists():
        return dataset, dataset_config
    name, _, config = dataset.rpartition(":")
    return name, config or None


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in FILE_FORMATS or name.startswith(("/", "./", "../", "~", "."))


def _expand_files(pattern: str) -> list[Path]:
    matches = sorted(Path(match) for match in glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [match for match in matches if match.is_file() and match.suffix.lower() in FILE_FORMATS]
    if not files and len(matches) == 1 and matches[0].is_file():  # one named file of another format
        raise UserError(
            f"{pattern}: {matches[0].suffix or 'a file without an extension'} is not a corpus format this reads; "
            "pass a .txt, .jsonl or .json (with a text column) or .parquet file, or convert it to one"
        )
    if not files:
        raise UserError(
            f"no .txt/.jsonl/.parquet files match {pattern}: check the path or pattern "
            "(use ** with a quoted pattern to search subfolders)"
        )
    return files


def _format_of(files: list[Path], where: str) -> str:
    suffixes = sorted({FILE_FORMATS[file.suffix.lower()] for file in files})
    if len(suffixes) > 1:
        raise UserError(f"{where} mixes file formats ({', '.join(suffixes)}): keep one format per corpus")
    return suffixes[0]


def _load_folder(
    folder: Path, config: str | None, text_column: str, fraction: float, streaming: bool, cache_dir: str | None
) -> Corpus:
    if config is not None or _declares_configs(folder / "README.md"):
        # A dataset repository laid out like the Hub (its README declares configs): `datasets` reads it.
        loaded = _load_with_datasets(str(folder), config, streaming=streaming, cache_dir=cache_dir)
        return _finish(loaded, text_column, fraction, str(folder))
    files_per_split = _files_per_split(folder)
    if not files_per_split:
        raise UserError(f"{folder} holds no .txt, .jsonl or .parquet files: put the corpus files there")
    return _load_files(files_per_split, text_column, fraction, streaming, cache_dir, str(folder))


def _declares_configs(readme: Path) -> bool:
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    front_matter = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    return "configs:" in front_matter


def _files_per_split(folder: Path) -> dict[str, list[Path]]:
    """Split names from file/folder names (train.txt, validation/, ...), the way `load_dataset` infers them."""
    try:
        patterns = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except EmptyDatasetError:
        return {}
    files_per_split = {
        str(split): sorted(Path(file) for file in files if Path(file).suffix.lower() in FILE_FORMATS)
        for split, files in patterns.items()
    }
    files_per_split = {split: files for split, files in files_per_split.items() if files}
    every_file = sorted(
        file
        for file in folder.rglob("*")
        if file.is_file()
        and file.suffix.lower() in FILE_FORMATS
        and not any(part.startswith(".") for part in file.relative_to(folder).parts)  # hidden, as `datasets` does
    )
    if "train" not in files_per_split:
        # Only a stray name like "test-notes.txt" matched a split word: the folder is one unsplit corpus.
        return {"train": every_file} if every_file else {}
    used = {file.resolve() for files in files_per_split.values() for file in files}
    ignored = [file for file in every_file if file.resolve() not in used]
    if ignored:
        logger.warning(
            "%s: %d file(s) outside the %s splits are not used, e.g. %s",
            folder,
            len(ignored),
            "/".join(files_per_split),
            ignored[0],
        )
    return files_per_split


def _load_files(
    files_per_split: dict[str, list[Path]],
    text_column: str,
    fraction: float,
    streaming: bool,
    cache_dir: str | None,
    where: str,
) -> Corpus:
    builder = _format_of([file for files in files_per_split.values() for file in files], where)
    if all(file.stat().st_size == 0 for files in files_per_split.values() for file in files):
        raise UserError(f"{where} is empty: its files contain no text; point to files that contain text")
    if builder == "text":
        return _load_text_files(files_per_split, fraction, streaming, cache_dir, where)
    for files in files_per_split.values():
        for file in files:
            if builder == "json":
                # pyarrow accepts invalid UTF-8 in JSON strings and fails much later without a file name.
                check_utf8(file)
                if file.suffix.lower() == ".jsonl":
                    check_json_lines(file, text_column)
    data_files = {split: [str(file) for file in files] for split, files in files_per_split.items()}
    loaded = _load_with_datasets(builder, None, streaming=streaming, cache_dir=cache_dir, data_files=data_files)
    return _finish(loaded, text_column, fraction, where)


def _load_with_datasets(path: str, config: str | None, **kwargs) -> Corpus:
    try:
        return load_dataset(path, config, **kwargs)
    except (FileNotFoundError, ConnectionError) as error:
        raise UserError(
            f"dataset {path!r} could not be loaded ({_one_line(error)}): check the name (and that you are "
            "online or have it cached), or pass a local file, folder or glob"
        ) from error
    except ValueError as error:
        if "config" in str(error).lower():
            raise UserError(f"dataset {path!r}: {_one_line(error)}; pass one of its configs as name:config") from error
        raise


def _one_line(error: BaseException) -> str:
    """The gist of a library error on one line (its usage examples left out)."""
    lines = []
    for line in str(error).splitlines():
        if line.strip().lower().startswith("example"):
            break
        lines.append(line.strip())
    return " ".join(line for line in lines if line).rstrip(".") or type(error).__name__


def _finish(loaded: Corpus, text_column: str, fraction: float, where: str) -> Corpus:
    """Picks train/validation from the loaded splits (holding out data if needed), keeps only "text"."""
    if not loaded:
        raise UserError(f"{where} is empty: it has no data splits; point to files that contain text")
    train_name = "train" if "train" in loaded else next(iter(loaded))
    validation_name = next((name for name in VALIDATION_SPLIT_NAMES if name in loaded), None)
    train = _text_only(loaded[train_name], text_column, where)
    if validation_name is None:
        splits = _hold_out(train, fraction, where)
    else:
        splits = {"train": train, "validation": _text_only(loaded[validation_name], text_column, where)}
    return _corpus(splits)


def _text_only(split: Split, text_column: str, where: str) -> Split:
    columns = split.column_names
    if columns is None:  # streaming data whose schema is only known once read
        first = next(iter(split.take(1)), None)
        columns = [] if first is None else list(first)
    if text_column not in columns:
        raise UserError(
            f"{where} has no column {text_column!r}; its columns are: {', '.join(columns) or '(none)'}; "
            "pass the one holding the text with --text-column"
        )
    split = split.select_columns([text_column])
    return split if text_column == "text" else split.rename_column(text_column, "text")


def _hold_out(documents: Split, fraction: float, where: str = "the corpus") -> dict[str, Split]:
    """The last `fraction` of the documents (or of the characters, for a single document) is validation."""
    count = _count_rows(documents)
    if count == 0:
        raise UserError(f"{where} is empty: it has no documents; point to data that contains text")
    if count == 1:
        text = next(iter(documents))["text"] or ""
        return _split_characters(text, fraction, where, streaming=isinstance(documents, IterableDataset))
    train_count = min(max(int(count * (1 - fraction)), 1), count - 1)
    if isinstance(documents, IterableDataset):
        return {"train": documents.take(train_count), "validation": documents.skip(train_count)}
    return {"train": documents.select(range(train_count)), "validation": documents.select(range(train_count, count))}


def _count_rows(split: Split) -> int:
    if isinstance(split, Dataset):
        return split.num_rows
    known = split.info.splits.get(str(split.split)) if split.info.splits and split.split else None
    if known is not None and known.num_examples:
        return known.num_examples
    # Unknown length in streaming mode: one pass, one row at a time (memory stays flat).
    return sum(1 for _ in split)


def _split_characters(text: str, fraction: float, where: str, streaming: bool) -> dict[str, Split]:
    if not text:
        raise UserError(f"{where} is empty: it contains no text; point to a file that contains text")
    cut = int(len(text) * (1 - fraction))  # nanoGPT: n = len(data); train = data[: int(n * 0.9)]
    splits = {"train": text[:cut], "validation": text[cut:]}
    if streaming:
        return {
            name: IterableDataset.from_generator(_yield_texts, gen_kwargs={"texts": [part]})
            for name, part in splits.items()
        }
    return {name: Dataset.from_dict({"text": [part]}) for name, part in splits.items()}


def _yield_texts(texts: list[str]) -> Iterator[dict]:
    for text in texts:
        yield {"text": text}


def _corpus(splits: dict[str, Split]) -> Corpus:
    streaming = any(isinstance(split, IterableDataset) for split in splits.values())
    return IterableDatasetDict(splits) if streaming else DatasetDict(splits)


def _load_text_files(
    files_per_split: dict[str, list[Path]], fraction: float, streaming: bool, cache_dir: str | None, where: str
) -> Corpus:
    """.txt files, one document each, read byte-exactly (no newline translation, unlike `datasets`' text)."""
    train_name = "train" if "train" in files_per_split else next(iter(files_per_split))
    validation_name = next((name for name in VALIDATION_SPLIT_NAMES if name in files_per_split), None)
    train_files = files_per_split[train_name]
    if validation_name is not None:
        split_files = {"train": train_files, "validation": files_per_split[validation_name]}
    elif len(train_files) == 1:
        return _corpus(_split_characters(read_text(train_files[0]), fraction, where, streaming))
    else:
        cut = min(max(int(len(train_files) * (1 - fraction)), 1), len(train_files) - 1)
        split_files = {"train": train_files[:cut], "validation": train_files[cut:]}
    return _corpus({name: _text_files_split(files, streaming, cache_dir) for name, files in split_files.items()})


def _text_files_split(files: list[Path], streaming: bool, cache_dir: str | None) -> Split:
    # Size and modification time are part of the arguments, so the Arrow cache is rebuilt when a file changes.
    signatures = [(str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns) for file in files]
    if streaming:
        return IterableDataset.from_generator(_read_text_files, gen_kwargs={"signatures": signatures})
    try:
        return Dataset.from_generator(
            _read_text_files, gen_kwargs={"signatures": signatures}, cache_dir=cache_dir, features=_TEXT_FEATURES
        )
    except DatasetGenerationError as error:
        raise (_user_error_in(error) or error) from None


_TEXT_FEATURES = Features({"text": Value("string")})


def _read_text_files(signatures: list[tuple[str, int, int]]) -> Iterator[dict]:
    for path, _, _ in signatures:
        yield {"text": read_text(Path(path))}


def _user_error_in(error: BaseException) -> UserError | None:
    while error is not None:
        if isinstance(error, UserError):
            return error
        error = error.__cause__ or error.__context__
    return None


def read_text(path: Path) -> str:
    """The file's text exactly as stored; names the file and byte offset if it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _utf8_error(path, error.start, error.reason, data[error.start]) from None


def check_utf8(path: Path) -> None:
    """Reads the file in chunks and raises a UserError at the first byte that is not valid UTF-8."""
    offset, pending = 0, b""  # `pending`: a character cut in two by the chunk boundary
    with open(path, "rb") as stream:
        while chunk := stream.read(_READ_CHUNK_BYTES):
            data = pending + chunk
            try:
                codecs.utf_8_decode(data, "strict", False)  # final=False: a cut character is not an error
            except UnicodeDecodeError as error:
                raise _utf8_error(path, offset + error.start, error.reason, data[error.start]) from None
            consumed = codecs.utf_8_decode(data, "strict", False)[1]
            offset, pending = offset + consumed, data[consumed:]
    if pending:
        raise _utf8_error(path, offset, "unexpected end of data", pending[0])


def check_json_lines(path: Path, text_column: str) -> None:
    """Every line of a JSON Lines file is a JSON object whose text column, where present, is a string; the first
    line that is not is a UserError naming the file and the line (pyarrow would fail without either, or turn a
    number into text)."""
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path}, line {number}: not valid JSON ({error.msg}); fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise UserError(
                    f"{path}, line {number}: a JSON {type(record).__name__}, not an object; each line must be an "
                    f'object such as {{"{text_column}": "..."}}'
                )
            value = record.get(text_column)
            if value is not None and not isinstance(value, str):
                kind = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
                raise UserError(
                    f'{path}, line {number}: "{text_column}" holds {kind.get(type(value), type(value).__name__)}, not '
                    "a string; fix that line or pick the text column with --text-column"
                )


def _utf8_error(path: Path, offset: int, reason: str, byte: int) -> UserError:
    return UserError(
        f"{path} is not valid UTF-8 at byte {offset}: {reason} (0x{byte:02x}); "
        "re-encode the file as UTF-8, e.g. with `iconv -f latin1 -t utf-8`"
    )


# Documents per batch when a split is read lazily: memory holds this many documents (and their token lists) at once.
STREAM_BATCH_DOCUMENTS = 16


def training_texts(split: Split, batch_size: int | None = None) -> Iterator[str]:
    """The texts of a split, one at a time, for training a tokenizer (works streaming and not)."""
    if batch_size is None:
        batch_size = STREAM_BATCH_DOCUMENTS if isinstance(split, IterableDataset) else 1000
    for batch in split.iter(batch_size=batch_size):
        yield from (text for text in batch["text"] if text)


# --------------------------------------------------------------------------------------------------------
# Tokenizing into blocks
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusStats:
    """Size of one split before and after tokenization.

    `tokens` counts the whole token stream (one EOS after each document included); the blocks hold its
    first `blocks * block_size` tokens. Bits per character = nats per token * tokens / characters / ln 2.
    `text_tokens` leaves the EOS separators out; `unknown_tokens` counts the tokenizer's unknown token
    (out-of-vocabulary words or characters) among them.
    """

    documents: int
    characters: int
    tokens: int
    blocks: int
    block_size: int
    text_tokens: int = 0
    unknown_tokens: int = 0

    @property
    def unknown_rate(self) -> float:
        """Share of the text's tokens (EOS separators excluded) that are the unknown token: the OOV rate."""
        return self.unknown_tokens / max(1, self.text_tokens)

    @property
    def characters_per_token(self) -> float:
        return self.characters / self.tokens

    def bits_per_character(self, loss_nats_per_token: float) -> float:
        return loss_nats_per_token * self.tokens / self.characters / math.log(2)


class TokenizedCorpus(DatasetDict):
    """Blocks per split (column "input_ids", `block_size` int32 ids each), plus per-split stats and whether
    the on-disk cache provided them. Streaming corpora have no stats (they are only known once read)."""

    stats: dict[str, CorpusStats]
    cache_hit: bool

    @classmethod
    def of(cls, splits: dict, stats: dict[str, CorpusStats], cache_hit: bool) -> TokenizedCorpus:
        corpus = cls(splits)
        corpus.stats, corpus.cache_hit = stats, cache_hit
        return corpus


@dataclass
class _TokenizeJob:
    tokenizer: object
    block_size: int
    num_proc: int
    eos_id: int
    tokenizer_hash: str
    unk_id: int | None = None


def tokenize_corpus(
    corpus: Corpus,
    tokenizer,
    block_size: int,
    *,
    num_proc: int = 1,
    cache_dir: str | Path | None = None,
) -> TokenizedCorpus | IterableDatasetDict:
    """Tokenizes each split, joins its documents with EOS and cuts the stream into `block_size`-token blocks.

    The model shifts labels inside, so a block serves as both `input_ids` and `labels`. With `cache_dir`, each
    split's blocks are saved under a key made of (split fingerprint, tokenizer, block size) and a later call
    loads them instead of tokenizing again; `result.cache_hit` says whether that happened. A streaming corpus
    gives streaming blocks, the same as the non-streaming ones, in the same order (no cache, no stats).
    """
    if block_size < 1:
        raise UserError(f"block_size must be a positive number of tokens, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token, which separates documents: give it one")
    job = _TokenizeJob(
        tokenizer,
        block_size,
        max(1, num_proc),
        tokenizer.eos_token_id,
        _tokenizer_hash(tokenizer),
        tokenizer.unk_token_id,
    )
    if isinstance(corpus, IterableDatasetDict):
        return IterableDatasetDict({name: _stream_blocks(split, job) for name, split in corpus.items()})
    splits, stats, hits = {}, {}, []
    for name, split in corpus.items():
        splits[name], stats[name], hit = _blocks_for_split(name, split, job, cache_dir)
        hits.append(hit)
    return TokenizedCorpus.of(splits, stats, cache_hit=all(hits))


def corpus_stats(tokenized: TokenizedCorpus) -> dict[str, dict]:
    """Per split: documents, characters, tokens, blocks, block_size (plain dicts, for logs and cards)."""
    return {name: asdict(stats) for name, stats in tokenized.stats.items()}


def split_token_stream(split: Dataset, tokenizer) -> np.ndarray:
    """The whole token stream of a split, as the blocks are cut from it (EOS after each document) but with nothing
    dropped at the end: what streamed evaluation scores."""
    eos_id = tokenizer.eos_token_id
    pieces = []
    for start in range(0, split.num_rows, 1000):
        batch = split[start : start + 1000]
        pieces += [
            np.asarray(row, dtype=np.int64) for row in _tokenize_documents(batch, tokenizer, eos_id)["input_ids"]
        ]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


def collate_blocks(examples: list[dict]) -> dict:
    """A batch of blocks as int64 tensors, `labels` = `input_ids` (the model shifts them; cross entropy wants int64)."""
    import torch

    input_ids = torch.as_tensor(np.asarray([example["input_ids"] for example in examples]), dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _tokenizer_hash(tokenizer) -> str:
    state = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else None
    if state is None:
        state = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{tokenizer.eos_token_id}\n{state}".encode()).hexdigest()


def _cache_key(split: Dataset, job: _TokenizeJob) -> str:
    # `_fingerprint` is how `datasets` names a dataset's exact state (files + transforms) across processes.
    parts = {
        "format": _CACHE_FORMAT,
        "corpus": split._fingerprint,
        "tokenizer": job.tokenizer_hash,
        "block_size": job.block_size,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _blocks_for_split(
    name: str, split: Dataset, job: _TokenizeJob, cache_dir: str | Path | None
) -> tuple[Dataset, CorpusStats, bool]:
    key = _cache_key(split, job)
    target = None if cache_dir is None else Path(cache_dir) / f"blocks-{key}"
    if target is not None and (target / "stats.json").is_file():
        logger.info("%s: tokenized blocks loaded from cache %s", name, target)
        return load_from_disk(str(target)), CorpusStats(**json.loads((target / "stats.json").read_text())), True
    parent = None if target is None else target.parent
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tokenize-{name}-", dir=parent) as work:
        blocks, stats = _tokenize_split(name, split, job, key, Path(work), in_memory=target is None)
        if target is None:
            return blocks, stats, False
        # Written beside the target then renamed: an interrupted run never leaves a half-written cache entry.
        staging = Path(work) / "blocks"
        blocks.save_to_disk(str(staging))
        (staging / "stats.json").write_text(json.dumps(asdict(stats), indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    logger.info("%s: tokenized blocks saved to cache %s", name, target)
    return load_from_disk(str(target)), stats, False


def _tokenize_documents(batch: dict, tokenizer, eos_id: int, unk_id: int | None = None) -> dict:
    texts = [text or "" for text in batch["text"]]
    # add_special_tokens=False: documents are joined with EOS here, never with the tokenizer's own specials.
    if type(tokenizer) is PreTrainedTokenizerFast:
        # The plain class adds nothing in Python to the Rust encoder, and skipping offsets is ~2x faster.
        ids = [
            encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ]
    else:
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return {
        "input_ids": [[*row, eos_id] if text else [] for row, text in zip(ids, texts)],
        "characters": [len(text) for text in texts],
        "unknown": [0 if unk_id is None else row.count(unk_id) for row in ids],
    }


_TOKENS_FEATURES = Features(
    {"input_ids": List(Value("int32")), "characters": Value("int64"), "unknown": Value("int64")}
)


def _tokenize_split(
    name: str, split: Dataset, job: _TokenizeJob, key: str, work_dir: Path, in_memory: bool
) -> tuple[Dataset, CorpusStats]:
    """Documents -> token lists (in `work_dir`) -> blocks; in memory or in `work_dir` as `in_memory` says."""
    try:
        documents = split.map(
            _tokenize_documents,
            fn_kwargs={"tokenizer": job.tokenizer, "eos_id": job.eos_id, "unk_id": job.unk_id},
            batched=True,
            num_proc=_usable_processes(job.num_proc, split.num_rows),
            remove_columns=split.column_names,
            features=_TOKENS_FEATURES,
            cache_file_name=str(work_dir / "documents.arrow"),
            new_fingerprint=f"{key}-documents",
            desc=f"Tokenizing {name}",
        )
    except UnicodeDecodeError as error:
        raise UserError(
            f"the {name} split contains text that is not valid UTF-8 ({error.reason} at byte {error.start} of a "
            "document); re-encode the data as UTF-8"
        ) from None
    lengths = pc.list_value_length(documents.data.column("input_ids")).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # offsets[i] = first token of document i
    characters = int(pc.sum(documents.data.column("characters")).as_py() or 0)
    if characters == 0:
        raise UserError(f"the {name} split is empty (0 characters of text): point to data that contains text")
    tokens = int(offsets[-1])
    if tokens < job.block_size:
        more = {
            "test": "a longer text",
            "train": "a larger corpus, or a smaller --validation-fraction",
            "validation": "a larger corpus, or a larger --validation-fraction",
        }.get(name, "a larger corpus")
        raise UserError(
            f"the block size ({job.block_size} tokens) is longer than the {name} split, which has {tokens} tokens: "
            f"use --block-size {tokens} or less, or more data ({more})"
        )
    block_count = tokens // job.block_size
    block_indices = Dataset.from_dict({"block": np.arange(block_count, dtype=np.int64)})
    blocks = block_indices.map(
        _gather_blocks,
        fn_kwargs={"documents": documents.with_format("arrow"), "offsets": offsets, "block_size": job.block_size},
        batched=True,
        batch_size=max(1, 1_000_000 // job.block_size),  # ~1M tokens per batch
        num_proc=_usable_processes(job.num_proc, block_count),
        remove_columns=["block"],
        features=Features({"input_ids": List(Value("int32"), length=job.block_size)}),
        cache_file_name=None if in_memory else str(work_dir / "blocks.arrow"),
        keep_in_memory=in_memory,
        new_fingerprint=f"{key}-blocks",
        desc=f"Cutting {name} into blocks",
    )
    unknown = int(pc.sum(documents.data.column("unknown")).as_py() or 0)
    text_tokens = tokens - int(np.count_nonzero(lengths))  # one EOS after each document that has text
    stats = CorpusStats(split.num_rows, characters, tokens, block_count, job.block_size, text_tokens, unknown)
    return blocks, stats


def _usable_processes(num_proc: int, rows: int) -> int | None:
    # `datasets` wants None (not 1) for in-process work, and no more processes than rows.
    processes = min(num_proc, rows)
    return processes if processes > 1 else None


def _gather_blocks(batch: dict, documents: Dataset, offsets: np.ndarray, block_size: int) -> dict:
    """Blocks [first, last] of the split's token stream, read from the documents that cover them."""
    first, last = int(batch["block"][0]), int(batch["block"][-1]) + 1  # batches are consecutive block numbers
    start, stop = first * block_size, last * block_size
    first_document = int(np.searchsorted(offsets, start, side="right")) - 1
    end_document = int(np.searchsorted(offsets, stop, side="left"))
    rows = documents[first_document:end_document]["input_ids"]
    stream = pc.list_flatten(rows).to_numpy()
    skip = start - int(offsets[first_document])
    return {"input_ids": stream[skip : skip + stop - start].reshape(last - first, block_size)}


def _stream_blocks(split: IterableDataset, job: _TokenizeJob) -> IterableDataset:
    documents = split.map(
        _tokenize_documents,
        fn_kwargs={"tokenizer": job.tokenizer, "eos_id": job.eos_id},
        batched=True,
        batch_size=STREAM_BATCH_DOCUMENTS,
        remove_columns=["text"],
    )
    return IterableDataset.from_generator(
        _cut_stream,
        gen_kwargs={"documents": documents, "block_size": job.block_size},
        features=Features({"input_ids": List(Value("int32"), length=job.block_size)}),
    )


def _cut_stream(documents: IterableDataset, block_size: int) -> Iterator[dict]:
    pending = np.empty(0, dtype=np.int32)  # tokens after the last full block
    for batch in documents.iter(batch_size=STREAM_BATCH_DOCUMENTS):
        stream = np.concatenate([pending, *(np.asarray(row, dtype=np.int32) for row in batch["input_ids"])])
        full = len(stream) // block_size * block_size
        for start in range(0, full, block_size):
            yield {"input_ids": stream[start : start + block_size]}
        pending = stream[full:]
