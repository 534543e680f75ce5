"""Checkpoints in the Hugging Face Llama layout, so transformers (and every tool built on it) reads ours and we
read theirs: config.json, model.safetensors (HF tensor names), generation_config.json, tokenizer files.

Weights are read with safetensors only: no pickle is ever loaded from a user-supplied path. Writes are atomic
(temporary name, fsync, rename), so a crash mid-write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.errors import CheckpointError
from model.transformer import Transformer

WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_name(ours: str) -> str:
    """Our module names are LlamaForCausalLM's without the `model.` prefix (lm_head has none)."""
    return ours if ours.startswith("lm_head.") else f"model.{ours}"


def our_name(hf: str) -> str:
    return hf[len("model.") :] if hf.startswith("model.") else hf


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def state_dict_hf(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied: transformers re-ties it from embed_tokens
        sd[hf_name(name)] = tensor.detach().contiguous().cpu()
    return sd


def save_checkpoint(
    model: Transformer,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    generation_config: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a complete checkpoint directory atomically: built in a sibling temp dir, fsynced, renamed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        config = model.config
        save_file(state_dict_hf(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save(tmp / "config.json")
        gen = {"_from_model_config": True, "do_sample": False}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, key) is not None:
                gen[key] = getattr(config, key)
        gen.update(generation_config or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.exists():
                    shutil.copyfile(src, tmp / name)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if out_dir.exists():
            # Swap: the old directory is moved aside first so a crash never leaves neither.
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_checkpoint_dir(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    if not (path / WEIGHTS).exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path}: only pickle weights found ({', '.join(pickles)}); refusing to load them because unpickling "
                f"can run arbitrary code. Convert them to {WEIGHTS} (safetensors) in a trusted environment."
            )
        if list(path.glob("model-*-of-*.safetensors")):
            raise CheckpointError(f"{path}: sharded safetensors are not supported; save with one {WEIGHTS}")
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: config.json is missing")


def read_state_dict(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Read and check every tensor against the shapes config.json implies; names are converted to ours."""
    expected = {hf_name(k): tuple(v.shape) for k, v in Transformer(config).to("meta").state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    weights = path / WEIGHTS
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
            for name in sorted(expected):
                if name not in names:
                    raise CheckpointError(f"{weights}: tensor {name} is missing (config.json expects it)")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{weights}: tensor {name} has shape {list(shape)}, config.json implies {list(expected[name])}"
                    )
                tensors[our_name(name)] = f.get_tensor(name)
            unexpected = sorted(n for n in names - set(expected) if not n.endswith("rotary_emb.inv_freq"))
            if config.tie_word_embeddings and "lm_head.weight" in unexpected:
                unexpected.remove(
                    "lm_head.weight"
                )  # some writers store the tied copy; it equals the embedding
            if unexpected:
                raise CheckpointError(f"{weights}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{weights}: cannot read ({exc})") from None
    return tensors


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    check_checkpoint_dir(path)
    return ModelConfig.load(path / "config.json")


def load_checkpoint(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    attn_backend: str = "sdpa",
) -> Transformer:
    """Build the model on the meta device and assign the safetensors tensors (no init, no copy)."""
    path = Path(path)
    config = load_config(path)
    tensors = read_state_dict(path, config)
    with torch.device("meta"):
        model = Transformer(config, attn_backend=attn_backend)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Rotary tables are derived, not stored: rebuild them on the real device.
    from model.transformer import rope_tables

    cos, sin = rope_tables(config)
    model.rope_cos, model.rope_sin = cos, sin
    return model.to(device).eval()


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Config, parameter count, dtypes and size, without loading the weights."""
    path = Path(path)
    config = load_config(path)
    weights = path / WEIGHTS
    dtypes: dict[str, int] = {}
    n_params = 0
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                n_params += numel
                dt = sl.get_dtype()
                dtypes[dt] = dtypes.get(dt, 0) + numel
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    return {
        "path": str(path),
        "config": config.to_hf_dict(),
        "parameters": n_params,
        "dtypes": dtypes,
        "size_bytes": sum(files.values()),
        "files": files,
        "has_tokenizer": (path / "tokenizer.json").exists(),
    }
