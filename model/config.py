"""ModelConfig: the decoder's shape, with Hugging Face LlamaConfig field names so config.json round-trips.

Torch-free: the ONNX service reads configs too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import CheckpointError, ConfigError


@dataclass
class ModelConfig:
    # 8192 tokens: enough byte-level BPE merges for English/German/Chinese seed data at demo scale, and the
    # embedding stays 2M of the demo's 6.5M parameters.
    vocab_size: int = 8192
    hidden_size: int = 256
    # SwiGLU's 8/3 * hidden rounded up to a multiple of 64 (Llama's rule): 8/3 * 256 = 683 -> 704.
    intermediate_size: int = 704
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    # Grouped-query attention: 2 query heads per KV head halves the KV cache the service preallocates.
    num_key_value_heads: int = 4
    # Context window; the KV cache and rotary tables are sized from it.
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # Tied input/output embeddings: at vocab 8192 and hidden 256 untying would add 2.1M parameters (+32%).
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Extra keys found in a config.json we read, kept so a round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")

    def num_parameters(self) -> int:
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + n * per_layer + h

    # --- Hugging Face config.json -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d.update(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "head_dim": self.head_dim,
                "hidden_act": "silu",
                "attention_bias": False,
                "mlp_bias": False,
                "torch_dtype": "float32",
                # transformers v5 reads rope_parameters; v4 reads rope_theta. Write both.
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            }
        )
        return {**self.extra, **d}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type != "llama":
            raise CheckpointError(f"{source}: model_type is {model_type!r}; only 'llama' is supported")
        missing = [
            n for n in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if n not in d
        ]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
            raise CheckpointError(
                f"{source}: rope_type {rope.get('rope_type')!r} is not supported (only default)"
            )
        if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        head_dim = d.get("head_dim")
        heads = d.get("num_attention_heads")
        if head_dim is not None and heads and head_dim != d["hidden_size"] // heads:
            raise CheckpointError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise CheckpointError(f"{source}: attention_bias/mlp_bias are not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(
                f"{source}: hidden_act {d.get('hidden_act')!r} is not supported (only silu)"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        if known.get("num_key_value_heads") is None:
            known["num_key_value_heads"] = known.get("num_attention_heads", cls.num_key_value_heads)
        extra = {k: v for k, v in d.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except ConfigError as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))


# Named shapes. `demo` is the shape the serving performance anchors were measured on.
PRESETS: dict[str, dict[str, Any]] = {
    # Tests: under 1M parameters so fixtures build in milliseconds; GQA ratio 2 to exercise grouping.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    # 6.5M parameters: trains on 2 CPU cores in minutes.
    "demo": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    ),
    # About 100M parameters, for one GPU.
    "small": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
