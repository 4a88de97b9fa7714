"""The CPU suite computes on the CPU on any machine (tests/conftest.py); the GPU suite keeps the GPUs when run alone."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import GPU_HIDDEN_REASON, gpu_suite_alone
from tests.test_train import REPO_ROOT


def test_the_cpu_suite_runs_with_gpus_hidden():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    assert not torch.cuda.is_available()


@pytest.mark.parametrize(
    "args, alone",
    [
        (["tests/test_cuda.py"], True),
        (["tests/test_cuda.py::test_generate_on_cuda", "tests/test_cuda.py"], True),
        ([], False),  # plain `pytest`: every file
        (["tests"], False),
        (["tests/test_cuda.py", "tests/test_scan.py"], False),
    ],
)
def test_only_the_gpu_suite_on_its_own_keeps_the_gpus(args, alone):
    assert gpu_suite_alone(args) is alone


def test_a_real_pytest_run_that_includes_the_cpu_suite_skips_the_gpu_suite_saying_why():
    """On any machine: the GPUs are hidden, and the skipped GPU tests name the command that runs them."""
    env = {
        key: value for key, value in os.environ.items() if key not in ("CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU")
    }
    selection = [
        "tests/test_cuda.py::test_scan_on_cuda_equals_the_sequential_reference_forward_and_gradients",
        "tests/test_suite_devices.py::test_the_cpu_suite_runs_with_gpus_hidden",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist", *selection],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(line.endswith(GPU_HIDDEN_REASON) for line in skips), skips
    assert "1 passed, 10 skipped" in result.stdout  # the CPU test ran, and asserted the GPUs hidden
