"""LoRA (Hu et al. 2021) for small machines, through `peft`: W x + (alpha / r) B A x on chosen linear layers,
only A and B trained, then merged (W <- W + (alpha / r) B A) into a plain checkpoint that export and the service
read like any other.

peft injects its layers into our `Transformer` in place (`inject_adapter_in_model`), so the model keeps its type,
its `forward(input_ids, position_ids, ...)` and its module names with `.base_layer` / `.lora_A` / `.lora_B`
inserted; the train loop needs no special path beyond `param_groups` skipping frozen weights. A r = 8 adapter on
every projection of the demo model trains about 0.35M of 6.5M parameters (5%).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import msgspec

from model.errors import ConfigError

# Llama's projections: attention (q, k, v, o) and SwiGLU (gate, up, down).
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoraSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The `[lora]` section of a train recipe."""

    enabled: bool = True
    r: int = 8
    # alpha / r scales the update; alpha = 2r (the common choice) keeps the scale 2 whatever r is.
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names (a suffix of the dotted name, e.g. "q_proj", or a full one, e.g. "layers.0.mlp.up_proj").
    target_modules: list[str] = msgspec.field(default_factory=lambda: list(ALL_PROJECTIONS))
    seed: int = 0  # initialization of A (B starts at zero, so the adapted model starts equal to the base)

    def validate(self, where: str = "lora") -> None:
        if self.r < 1:
            raise ConfigError(f"{where}.r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{where}.target_modules is empty; known: {', '.join(ALL_PROJECTIONS)}")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_targets(model: Any, targets: list[str], where: str = "lora.target_modules") -> list[str]:
    """Every target must name at least one linear layer of the model; returns the matched module names.
    A name that matches nothing is an error with the closest real name, not peft's bare set of strings."""
    from torch import nn

    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    others = {n: type(m).__name__ for n, m in model.named_modules() if n and not isinstance(m, nn.Linear)}
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
    matched: list[str] = []
    for target in targets:
        hits = [n for n in linear if _matches(n, target)]
        if not hits:
            not_linear = [n for n in others if _matches(n, target)]
            if not_linear:
                raise ConfigError(
                    f"{where}: '{target}' is not a linear layer ({others[not_linear[0]]}); LoRA targets: "
                    f"{', '.join(suffixes)}"
                )
            close = difflib.get_close_matches(target, suffixes, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"{where}: no linear layer named '{target}'; {hint}known: {', '.join(suffixes)}"
            )
        if any(_matches(h, "lm_head") for h in hits) and getattr(model.config, "tie_word_embeddings", False):
            raise ConfigError(
                f"{where}: 'lm_head' shares its weight with embed_tokens (tie_word_embeddings); merging an "
                "adapter there would change the input embedding too. Leave it out."
            )
        matched.extend(h for h in hits if h not in matched)
    return matched


def add_lora(model: Any, settings: LoraSettings, where: str = "lora") -> Any:
    """Inject LoRA adapters in place and freeze everything else. Returns the model (same object)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    settings.validate(where)
    check_targets(model, settings.target_modules, f"{where}.target_modules")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def is_lora(model: Any) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def lora_state_dict(model: Any) -> dict[str, Any]:
    """The adapter tensors only (what `save_adapter` writes)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def merge_lora(model: Any) -> Any:
    """W <- W + (alpha / r) B A in every adapted layer, then put the plain nn.Linear back: the result has our
    module names and state-dict keys exactly, so `save_checkpoint` writes an ordinary checkpoint."""
    from peft.tuners.lora import LoraLayer

    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            replaced += 1
    if hasattr(model, "peft_config"):
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(True)
    if replaced == 0:
        raise ValueError("merge_lora: the model has no LoRA layers")
    return model


def save_adapter(model: Any, out_dir: str | Path, settings: LoraSettings) -> Path:
    """adapter_model.safetensors + adapter_config.json, for keeping an adapter apart from its base."""
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(msgspec.to_builtins(settings), indent=2) + "\n")
    return out


# --- state dicts: what the train loop saves, resumes and finally merges ----------------------------------------
# peft renames an adapted layer's weight `X.weight` to `X.base_layer.weight` and adds `X.lora_A.<adapter>.weight`
# [r, in] and `X.lora_B.<adapter>.weight` [out, r]. Training checkpoints keep the base weights under our plain
# names (so they stay ordinary HF checkpoints) and the adapters in a file beside them.
_BASE = ".base_layer."


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A LoRA model's state dict -> (base weights under our plain names, adapter tensors under peft's names)."""
    base, adapters = {}, {}
    for name, tensor in state.items():
        if ".lora_" in name:
            adapters[name] = tensor
        else:
            base[name.replace(_BASE, ".")] = tensor
    return base, adapters


def join_state(base: dict[str, Any], adapters: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `split_state`: plain base weights + adapters -> the LoRA model's state-dict names."""
    adapted = {name.split(".lora_")[0] for name in adapters}
    out = dict(adapters)
    for name, tensor in base.items():
        module, _, leaf = name.rpartition(".")
        out[f"{module}{_BASE}{leaf}" if module in adapted else name] = tensor
    return out


def merged_state(state: dict[str, Any], settings: LoraSettings) -> dict[str, Any]:
    """A LoRA model's state dict -> plain weights with W + (alpha / r) B A folded in (no model needed: the train
    loop has only the gathered state at the end of a stage)."""
    base, adapters = split_state(state)
    scale = settings.alpha / settings.r
    for name, a in adapters.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b = adapters[name.replace(".lora_A.", ".lora_B.")]
        w = base[f"{module}.weight"]
        base[f"{module}.weight"] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
    return base


def adapter_bytes(adapters: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, metadata={"format": "pt"})


def load_adapter_tensors(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The adapters a LoRA training checkpoint holds beside its base weights (safetensors: nothing unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from model.errors import CheckpointError

    path = Path(checkpoint_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; this training checkpoint was not written by a LoRA run (remove [lora] or pass --fresh)"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
