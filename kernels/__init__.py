"""Triton kernels, each a triple: kernel + host wrapper (+ autograd Function) + pure-torch reference.

This file imports neither torch nor triton: `import kernels` works on a CPU-only serving image. The kernel
modules (`kernels.attention`, `kernels.decode`, `kernels.rmsnorm`, `kernels.rotary`) import triton when they
are imported; `kernels.reference` needs torch only.

Under `TRITON_INTERPRET=1` (set before the first kernel module is imported) the kernels run on CPU torch tensors,
which is how CI tests them.
"""

from __future__ import annotations

import importlib.util
import logging
import os

log = logging.getLogger(__name__)


def triton_available() -> bool:
    """True when the triton package is installed (it may still have no GPU to run on)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when triton runs kernels in its numpy interpreter (CPU tensors) instead of compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Head dims the attention kernels take: 16 is the smallest tl.dot K, and 256 would overflow sm_80 shared memory.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def select_attn_backend(device, head_dim: int | None = None) -> str:
    """The attention backend the trainer and the torch runner should use on `device`.

    "triton" when the device is CUDA, triton is installed and `head_dim` (if given) is one the kernels take,
    else "sdpa"; the choice is logged either way so a run's log says which path produced its numbers.
    """
    import torch

    device = torch.device(device)
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        log.info(
            "attention backend: sdpa (head_dim %d; the Triton kernels take %s)", head_dim, SUPPORTED_HEAD_DIMS
        )
        return "sdpa"
    if device.type == "cuda" and torch.cuda.is_available() and triton_available():
        log.info("attention backend: triton (CUDA device %s, triton installed)", device)
        return "triton"
    if device.type == "cuda" and not triton_available():
        reason = "triton is not installed"
    elif device.type == "cuda":
        reason = "CUDA is not available"
    else:
        reason = f"device is {device.type}, the Triton kernels need CUDA"
    log.info("attention backend: sdpa (%s)", reason)
    return "sdpa"


def check_runnable(name: str, tensor) -> None:
    """Fail with a clear message when `tensor` is somewhere the kernels cannot run: on the CPU without
    TRITON_INTERPRET=1 triton would otherwise die deep in its driver lookup."""
    if tensor.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name} is on {tensor.device}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "the kernel modules are imported (CPU interpreter); use attn_backend='sdpa' on the CPU"
        )
