"""Shared helpers for the dataset-pipeline tests: build a recipe made of fixture sources and check accounting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.toml_config import convert
from training.data.config import DataConfig, check_config
from training.data.pipeline import build

FIXTURES = Path(__file__).parent


def build_sources(out: Path, sources: list[dict[str, Any]], base_dir: Path = FIXTURES, **extra: Any):
    extra.setdefault("pictures", False)
    cfg = convert({"base_dir": str(base_dir), "sources": sources, **extra}, DataConfig, "test recipe")
    check_config(cfg, "test recipe")
    manifest = build(cfg, out, progress=False, workers=extra.get("workers", 1))
    assert_accounted(manifest, out)
    return manifest


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def records(out: Path, splits=("train", "val", "test"), derived: bool = False) -> list[dict[str, Any]]:
    """Records of the given splits; the original (non-derived) ones unless `derived`."""
    return [r for s in splits for r in read_jsonl(out / f"{s}.jsonl") if derived or r["origin_id"] is None]


def assert_accounted(manifest: dict[str, Any], out: Path) -> None:
    """inputs = kept + rejected + duplicates, and each count is the number of lines in its file."""
    c = manifest["counts"]
    assert c["inputs"] == c["kept"] + c["rejected"] + c["duplicates"], c
    originals = records(out)
    derived = [r for r in records(out, derived=True) if r["origin_id"] is not None]
    assert len(originals) == c["kept"]
    assert len(derived) == c["derived"]
    assert len(read_jsonl(out / "rejected.jsonl")) == c["rejected"]
    assert len(read_jsonl(out / "duplicates.jsonl")) == c["duplicates"]
    per_source = c["by_source"].values()
    assert sum(s["inputs"] for s in per_source) == c["inputs"]
    for s in per_source:
        assert s["inputs"] == s["kept"] + s["rejected"] + s["duplicates"], s


ROOT = FIXTURES.parents[2]
DEMO = ROOT / "configs" / "data" / "demo.toml"


def build_demo(out: Path, workers: int = 1) -> dict[str, Any]:
    from training.data.config import load_config

    return build(load_config(DEMO), out, config_path=DEMO, progress=False, workers=workers)


_DEMO: dict[str, Any] = {}


def cached_demo() -> tuple[Path, dict[str, Any]]:
    """The demo recipe built once per test process (about 8 s of CPU) and shared by every module that asks:
    (output dir, manifest). Removed when the process exits."""
    if "out" not in _DEMO:
        import atexit
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="instructlm-demo-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _DEMO["out"], _DEMO["manifest"] = tmp / "dataset", build_demo(tmp / "dataset")
    return _DEMO["out"], _DEMO["manifest"]
