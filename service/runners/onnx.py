"""The ONNX Runtime runner: the export package's torch-free `OnnxRunner` core (IO-bound slot cache) under the
serving name and settings. Nothing on this path imports torch (tested in a clean subprocess)."""

from __future__ import annotations

from pathlib import Path

from export.runtime import OnnxRunner


class OnnxServingRunner(OnnxRunner):
    def __init__(self, path: str | Path, *, num_slots: int, max_len: int = 0, threads: int = 1) -> None:
        super().__init__(path, num_slots=num_slots, max_len=max_len or None, threads=threads)
