"""--streaming: a corpus that is never held in memory trains like any other, with flat memory."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_data import dataset_repository  # noqa: F401 (a fixture)
from tests.test_train import REPO_ROOT, as_flags, real_text_file, tiny_options

# Runs `hybrid-lm train` in a fresh process and reports its peak resident memory (Linux: kilobytes).
DRIVER = textwrap.dedent(
    """
    import json, resource, sys
    from training.cli import main

    code = main(["train", *json.loads(sys.argv[1])])
    print(json.dumps({"code": code, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


def write_corpus(folder: Path, megabytes: int) -> Path:
    """`megabytes` of real prose and code in 100 KB files (one document each)."""
    text = real_text_file(folder.parent / "source", 100_000).read_text()
    folder.mkdir(parents=True)
    for index in range(megabytes * 10):
        (folder / f"part-{index:04d}.txt").write_text(text[index % 1000 :] + text[: index % 1000])
    return folder


def peak_memory_mb(tmp_path: Path, corpus: Path, name: str, **options) -> tuple[float, dict]:
    output = tmp_path / name
    flags = as_flags(
        tiny_options(output, dataset=str(corpus), streaming=True, max_steps=20, eval_batches=2, **options)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([*flags, "--checkpoint-steps", "0"])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, result.stderr[-3000:]
    return report["peak_kb"] / 1024, json.loads((output / "results.json").read_text())


@pytest.mark.xdist_group("memory")
@pytest.mark.parametrize("carry_state", [False, True], ids=["blocks", "carry-state"])
def test_memory_stays_flat_when_the_corpus_grows_fortyfold(tmp_path, carry_state):
    """2 MB and 80 MB of text: as token ids in memory the larger would need 312 MB (int32) more than the smaller; a
    streamed run reads both in one pass (tokenizer, then training) and its peak memory does not follow the corpus.
    The peak of two runs of one corpus differs by up to about 30 MB here, hence the wide gap between the sizes."""
    small = write_corpus(tmp_path / "small", 2)
    large = write_corpus(tmp_path / "large", 80)
    small_mb, small_results = peak_memory_mb(tmp_path, small, "run-small", carry_state=carry_state)
    large_mb, large_results = peak_memory_mb(tmp_path, large, "run-large", carry_state=carry_state)
    assert small_results["steps"] == large_results["steps"] == 20
    assert large_mb - small_mb < 100, (small_mb, large_mb)
    print(f"peak memory: {small_mb:.0f} MB (2 MB corpus), {large_mb:.0f} MB (80 MB corpus)")


def test_a_dataset_repository_streams_into_training(tmp_path, dataset_repository):  # noqa: F811 (the fixture)
    """A dataset laid out as on the Hub (parquet files and README configs), read by `load_dataset(..., streaming=True)`
    exactly as a Hub dataset is: --streaming trains from it, with and without --carry-state, and the GPT-2 baseline."""
    from training.arguments import arguments_from_dict
    from training.train import run_training

    for architecture, carry_state in (("hybrid", False), ("hybrid", True), ("gpt2", False)):
        options = tiny_options(
            tmp_path / f"run-{architecture}-{carry_state}",
            architecture=architecture,
            dataset=f"{dataset_repository}:short",
            text_column="body",
            streaming=True,
            carry_state=carry_state,
            block_size=8,
            batch_size=2,
            max_steps=4,
            eval_steps=2,
        )
        results = run_training(*arguments_from_dict(options))
        assert results["steps"] == 4 and results["full_validation"]["blocks"] > 0
