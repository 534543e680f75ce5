"""Kernel tests run the Triton kernels for real: compiled on a CUDA device when there is one, else in Triton's
interpreter on CPU tensors. TRITON_INTERPRET must be in the environment before the first `@triton.jit`
decorator runs, i.e. before any kernel module is imported; pytest imports this conftest before the test
modules of this directory, and nothing in `model` imports a kernel module at import time."""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# 2 shared cores: one torch thread per test process (the default pool oversubscribes them).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker); runs in bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
