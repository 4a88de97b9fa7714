"""Session-wide test settings."""

import os
from pathlib import Path

import pytest

GPU_SUITE = "test_cuda.py"
GPU_HIDDEN_REASON = f"the CPU suite hides GPUs: run `pytest tests/{GPU_SUITE}` on its own"


def gpu_suite_alone(args: list[str]) -> bool:
    """`pytest tests/test_cuda.py` (or tests in it) selects the GPU suite alone; any other selection includes the
    CPU suite."""
    names = [Path(arg.split("::")[0]).name for arg in args if not arg.startswith("-")]
    return bool(names) and all(name == GPU_SUITE for name in names)


def pytest_configure(config):
    """The CPU suite computes on the CPU wherever it runs, as CI does: its tests compare against CPU arithmetic, and
    commands they start would otherwise pick a GPU (CUDA through torch, or any accelerator through accelerate). Set
    before any test module is imported, so before CUDA starts; subprocesses and xdist workers inherit it. The GPU
    suite (tests/test_cuda.py) keeps the GPUs when run on its own."""
    if not gpu_suite_alone(config.args):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["ACCELERATE_USE_CPU"] = "true"


@pytest.fixture(autouse=True, scope="session")
def private_user_cache(tmp_path_factory):
    """Token-block caches go to a folder of this test session, never the user's ~/.cache (subprocesses too)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
    yield
    mp.undo()
