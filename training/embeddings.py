"""Pretrained word vectors for the input embeddings: `hybrid-lm train --init-embeddings FILE`.

Reads the text formats word2vec, fastText (.vec) and GloVe write: one word and its numbers per line, separated by
spaces, optionally under a "<count> <dimension>" header line (word2vec, fastText); `.gz` files are read as they
are. Only the vocabulary's words are converted to numbers, so a 400K-word GloVe file costs seconds, not minutes.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from training.errors import UserError


def read_word_vectors(path: str | Path, vocabulary: dict[str, int], dimension: int) -> dict[int, list[float]]:
    """{token id: vector} for every vocabulary token the file holds.

    A token matches a file word spelled the same; a token with no such word takes the vector of its lowercased
    form (GloVe's files are lowercase). The first line with a given word wins. Any line that is not a word followed
    by `dimension` finite numbers is a UserError naming the file and the line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--init-embeddings {path}: no such file; pass a word2vec or GloVe text file")
    lowercase = {}  # lowercased form -> ids of the tokens that are not spelled that way
    for token, index in vocabulary.items():
        if token.lower() != token:
            lowercase.setdefault(token.lower(), []).append(index)
    exact: dict[int, list[float]] = {}
    folded: dict[int, list[float]] = {}
    for number, word, numbers in _vector_lines(path, dimension):
        index = vocabulary.get(word)
        if index is not None and index not in exact:
            exact[index] = _parse_vector(numbers, path, number)
        for index in lowercase.get(word, ()):
            if index not in folded:
                folded[index] = _parse_vector(numbers, path, number)
    return {**folded, **exact}


def _vector_lines(path: Path, dimension: int) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, word, its number strings) for each vector line; checks the header and every line's length."""
    opener = gzip.open if path.suffix == ".gz" else open
    name = path.name
    checked = False
    with opener(path, "rb") as stream:
        try:
            for number, raw in enumerate(stream, start=1):
                line = _decode(raw, name, number)
                fields = line.split()
                if not fields:
                    continue
                if number == 1 and len(fields) == 2 and all(field.isdigit() for field in fields):
                    _check_dimension(int(fields[1]), dimension, name, number)  # word2vec's "<count> <dimension>"
                    checked = True
                    continue
                if not checked:  # no header: the first vector's length (its trailing numbers) is the file's dimension
                    _check_dimension(_trailing_numbers(fields), dimension, name, number)
                    checked = True
                # The numbers are the last `dimension` fields: a word may itself contain spaces (GloVe 840B does).
                parts = line.rstrip().rsplit(maxsplit=dimension)
                if len(parts) != dimension + 1:
                    raise UserError(
                        f"--init-embeddings {name} line {number}: expected a word and {dimension} numbers, found "
                        f"{len(fields)} field(s); fix or remove the line"
                    )
                yield number, parts[0], parts[1:]
        except (OSError, EOFError) as error:  # a truncated or corrupt .gz
            raise UserError(f"--init-embeddings {name}: cannot be read ({error}); check the file") from None


def _decode(raw: bytes, name: str, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"--init-embeddings {name} line {number}: not UTF-8 text; a binary word2vec file must be converted to "
            "text first (gensim: KeyedVectors.load_word2vec_format(path, binary=True)"
            ".save_word2vec_format(out, binary=False))"
        ) from None


def _check_dimension(found: int, dimension: int, name: str, number: int) -> None:
    if found < 1:
        raise UserError(
            f"--init-embeddings {name} line {number}: no numbers after the first word, so this is not a word2vec or "
            "GloVe text file (each line: a word, then the numbers of its vector); pass such a file"
        )
    if found != dimension:
        raise UserError(
            f"--init-embeddings {name} line {number}: the vectors have {found} dimensions but the model's embeddings "
            f"have {dimension} (--hidden-size {dimension}); pass --hidden-size {found} or a file of "
            f"{dimension}-dimensional vectors"
        )


def _parse_vector(numbers: list[str], path: Path, number: int) -> list[float]:
    try:
        vector = [float(value) for value in numbers]
    except ValueError:
        bad = next(value for value in numbers if not _is_float(value))
        raise UserError(
            f"--init-embeddings {path.name} line {number}: {bad!r} is not a number; fix or remove the line"
        ) from None
    if not all(math.isfinite(value) for value in vector):
        raise UserError(
            f"--init-embeddings {path.name} line {number}: the vector is not finite; fix or remove the line"
        )
    return vector


def _trailing_numbers(fields: list[str]) -> int:
    """How many fields after the first end the line as numbers: a vector's length (0 for a line of prose)."""
    count = 0
    for value in reversed(fields[1:]):
        if not _is_float(value):
            break
        count += 1
    return count


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def initialise_embeddings(model: torch.nn.Module, tokenizer, path: str | Path) -> dict:
    """Copies the file's vectors into the model's input embedding rows of the tokens it holds (tied output
    embeddings share them); returns {file, found, vocabulary} (special tokens are not looked up) for the log."""
    embedding = model.get_input_embeddings()
    specials = set(tokenizer.all_special_tokens)
    specials |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    vocabulary = {token: index for token, index in tokenizer.get_vocab().items() if token not in specials}
    vectors = read_word_vectors(path, vocabulary, embedding.weight.shape[1])
    if vectors:
        ids = torch.tensor(sorted(vectors))
        rows = torch.tensor([vectors[index] for index in ids.tolist()], dtype=embedding.weight.dtype)
        with torch.no_grad():
            embedding.weight[ids] = rows
    return {"file": Path(path).name, "found": len(vectors), "vocabulary": len(vocabulary)}


def freeze_embeddings(model: torch.nn.Module) -> None:
    """The input embeddings (and output embeddings tied to them) get no gradient, so the optimizer skips them."""
    model.get_input_embeddings().weight.requires_grad_(False)
