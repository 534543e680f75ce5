"""Training checkpoints: an HF-layout checkpoint directory (model.checkpoint.save_checkpoint, atomic) with the
training state beside the weights, for exact resume:

- `training_state.safetensors`: optimizer moments and step per parameter (`optim/<param>/<key>`), RNG states;
- `training_state.json`: step, learning-rate schedule position, data cursor, config, world size, counters.

No pickle: a crafted file cannot run code when a run resumes (tested). Directories are `step-00000100`; only
complete ones exist (written under a temporary name, renamed), the last K are kept, `best/` holds the lowest
validation loss. A latest checkpoint that cannot be read is skipped with the reason logged and the previous one
is used.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from model.checkpoint import read_state_dict, save_checkpoint
from model.config import ModelConfig
from model.errors import CheckpointError
from model.transformer import Transformer, rope_tables

log = logging.getLogger(__name__)

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT = 1


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """A CPU Transformer holding `state` (our parameter names) without copying or initializing."""
    with torch.device("meta"):
        model = Transformer(config)
    state = dict(state)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(config)
    return model


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda/{i}"] = s
    return out


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def save_training_checkpoint(
    path: str | Path,
    config: ModelConfig,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_dir: str | Path | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write weights + training state (+ `extra_files`, e.g. LoRA adapters) as one directory, atomically (rank 0
    only)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, per_param in optim_state["state"].items():
        for key, value in per_param.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim/{name}/{key}"] = t.detach().cpu().contiguous()
    tensors.update(_rng_tensors())
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in optim_state["param_groups"]
    ]
    state_json = {"format": FORMAT, **meta, "optimizer_param_groups": groups}
    model = model_from_state(config, model_state)
    return save_checkpoint(
        model,
        path,
        tokenizer_dir=tokenizer_dir,
        extra_files={
            **(extra_files or {}),
            STATE_TENSORS: save_tensors(tensors, metadata={"format": "pt"}),
            STATE_JSON: (json.dumps(state_json, indent=1, sort_keys=True) + "\n").encode(),
        },
    )


@dataclass
class Loaded:
    path: Path
    model_state: dict[str, torch.Tensor]
    optim_state: dict[str, Any]
    meta: dict[str, Any]
    rng: dict[str, torch.Tensor]

    def restore_rng(self) -> None:
        _restore_rng(self.rng)


def load_training_checkpoint(path: str | Path, config: ModelConfig) -> Loaded:
    """Read one training checkpoint; any damage raises CheckpointError naming the file."""
    path = Path(path)
    json_path = path / STATE_JSON
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{json_path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{json_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path}: not a training state of format {FORMAT}")
    stored = ModelConfig.load(path / "config.json")
    mismatch = config_mismatch(stored, config)
    if mismatch:
        raise CheckpointError(f"{path}/config.json does not match the requested model: {mismatch}")
    model_state = read_state_dict(path, config)
    if config.tie_word_embeddings:
        model_state["lm_head.weight"] = model_state["embed_tokens.weight"]
    tensors_path = path / STATE_TENSORS
    optim: dict[str, dict[str, torch.Tensor]] = {}
    rng: dict[str, torch.Tensor] = {}
    try:
        # safetensors never unpickles: a file crafted to run code is rejected as "not safetensors".
        with safe_open(str(tensors_path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.startswith("rng/"):
                    rng[key] = f.get_tensor(key)
                elif key.startswith("optim/"):
                    name, _, field = key[len("optim/") :].rpartition("/")
                    optim.setdefault(name, {})[field] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{tensors_path}: unreadable ({exc})") from None
    if "rng/torch_cpu" not in rng:
        raise CheckpointError(f"{tensors_path}: no RNG state")
    groups = []
    for g in meta.pop("optimizer_param_groups", []):
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    known = {n for g in groups for n in g.get("params", [])}
    if set(optim) - known:
        raise CheckpointError(
            f"{tensors_path}: optimizer state for unknown parameters {sorted(set(optim) - known)[:3]}"
        )
    return Loaded(path, model_state, {"state": optim, "param_groups": groups}, meta, rng)


def config_mismatch(stored: ModelConfig, wanted: ModelConfig) -> str:
    """'field: stored X, requested Y; ...' for every shape field that differs, or ''."""
    fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
    )
    diffs = [
        f"{f}: checkpoint {getattr(stored, f)!r}, requested {getattr(wanted, f)!r}"
        for f in fields
        if getattr(stored, f) != getattr(wanted, f)
    ]
    return "; ".join(diffs)


def step_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete step directories, newest first (temporary `.step-...tmp-*` ones are not complete)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in d.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(out, reverse=True)


def step_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{step:08d}"


def load_latest(ckpt_dir: str | Path, config: ModelConfig) -> tuple[Loaded | None, list[str]]:
    """The newest readable checkpoint, and one line per newer one that was skipped (with the reason)."""
    skipped: list[str] = []
    for _step, path in step_dirs(ckpt_dir):
        try:
            return load_training_checkpoint(path, config), skipped
        except CheckpointError as exc:
            if "does not match the requested model" in str(exc):
                raise
            skipped.append(f"skipped unreadable checkpoint {path}: {exc}")
            log.warning(skipped[-1])
    return None, skipped


def prune(ckpt_dir: str | Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` step directories and stale temporary ones; returns the removed."""
    removed = []
    for _step, path in step_dirs(ckpt_dir)[max(keep_last, 1) :]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    d = Path(ckpt_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".step-") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
