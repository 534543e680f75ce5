"""The runner interface the engine drives (ONNX Runtime and PyTorch implement it), and `open_runner`.

Torch-free: `open_runner` imports the torch runner only when asked for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from model.config import ModelConfig
from model.errors import CheckpointError, ConfigError


@runtime_checkable
class Runner(Protocol):
    config: ModelConfig
    num_slots: int  # KV cache slots (max concurrent sequences, prefix-cache slots included)
    max_len: int  # positions per slot

    def prefill(
        self, rows: list[list[int]], slots: list[int], starts: list[int], all_logits: bool = False
    ) -> np.ndarray | list[np.ndarray]:
        """Row i's tokens go to positions starts[i].. of slot slots[i]; float32 [B, V] last-token logits, or
        with all_logits a list of [len_i, V]."""
        ...

    def decode(self, tokens: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token per row at `positions` of `slots`: float32 logits [B, V]."""
        ...

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None: ...

    def release(self, slot: int) -> None: ...


def model_kind(path: str | Path) -> str:
    """'bundle' (export_report.json + model.onnx) or 'checkpoint' (model.safetensors + config.json)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: model path does not exist (expected a bundle or a checkpoint directory)")
    if not p.is_dir():
        raise CheckpointError(f"{p}: expected a directory (bundle or checkpoint), found a file")
    if (p / "model.onnx").exists() and (p / "export_report.json").exists():
        return "bundle"
    if (p / "model.safetensors").exists() and (p / "config.json").exists():
        return "checkpoint"
    found = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"{p}: neither a bundle (model.onnx + export_report.json) nor a checkpoint "
        f"(model.safetensors + config.json); found {found}"
    )


def open_runner(
    path: str | Path,
    kind: str = "auto",
    *,
    num_slots: int,
    max_len: int = 0,
    threads: int = 1,
    device: str = "cpu",
) -> Runner:
    """Open the runner for a bundle or checkpoint; `kind` auto picks onnx for a bundle, torch for a checkpoint."""
    found = model_kind(path)
    if kind == "auto":
        kind = "onnx" if found == "bundle" else "torch"
    if kind == "onnx":
        if found != "bundle":
            raise ConfigError(
                f"runner 'onnx' needs an exported bundle, but {path} is a checkpoint; "
                f"export it first (`instructlm export`) or use --runner torch"
            )
        from service.runners.onnx import OnnxServingRunner

        return OnnxServingRunner(path, num_slots=num_slots, max_len=max_len, threads=threads)
    if kind == "torch":
        from service.runners.torch_runner import TorchRunner

        return TorchRunner(path, num_slots=num_slots, max_len=max_len, threads=threads, device=device)
    raise ConfigError(f"runner must be one of auto, onnx, torch; got {kind!r}")
