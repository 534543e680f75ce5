"""A Llama-style decoder, readable top to bottom.

RMSNorm, half-split rotary embeddings (`rotate_half`, as Hugging Face Llama), SwiGLU, grouped-query attention,
no biases. Module names follow transformers' LlamaForCausalLM (minus its `model.` prefix) so checkpoints map
one to one.

`forward(input_ids [B,S], position_ids [B,S], cache=None, slots=None)` always returns logits [B,S,V].
Positions are explicit:
- without a cache (training), a position that restarts at 0 starts a new packed example, and attention never
  crosses into an earlier example;
- with a cache, row b writes its keys/values at `position_ids[b]` of slot `slots[b]` and attends to that slot's
  positions 0..p; a position of -1 marks right padding (not written, output ignored).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.cache import KVCache
from model.config import ModelConfig

ATTN_BACKENDS = ("sdpa", "triton")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the activation dtype (as transformers does), scale in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_position_embeddings, head_dim] for half-split rotary embeddings."""
    d = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
    )
    pos = torch.arange(config.max_position_embeddings, device=device).float()
    freqs = torch.outer(pos, inv_freq)  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]: both halves share a frequency (rotate_half layout)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; cos/sin [B, S, D] gathered at each token's position."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # [B, 1, S, D]
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, KV, L, D] -> [B, KV * n_rep, L, D]: each KV head serves n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    b, kv, length, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, length, d).reshape(b, kv * n_rep, length, d)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Boolean mask [B, 1, S, S] (True = attend) confining attention to each packed example, or None when every
    row is one example starting at position 0 (plain causal attention)."""
    b, s = position_ids.shape
    arange = torch.arange(s, device=position_ids.device)
    if torch.equal(position_ids, arange.expand(b, s)):
        return None
    starts = position_ids == 0
    starts[:, 0] = True
    doc = starts.cumsum(dim=1)  # [B, S] example index within the row
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = arange[None, :, None] >= arange[None, None, :]
    return (same_doc & causal).unsqueeze(1)


def cached_mask(position_ids: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, S, kv_len]: the query at position p sees cache positions 0..p. A padding query
    (position -1) sees position 0 only, so softmax stays finite; its output is ignored."""
    kv_pos = torch.arange(kv_len, device=position_ids.device)
    q_pos = position_ids.clamp(min=0)
    return (kv_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    cache: KVCache | None = None,
    layer: int = 0,
    slots: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """The one attention dispatch. q [B,H,S,D], k/v [B,KV,S,D] (the new tokens) -> [B,H,S,D]."""
    n_rep = q.shape[1] // k.shape[1]
    if cache is None:
        if backend == "triton":
            from kernels.integration import attention_packed

            return attention_packed(q, k, v, position_ids)
        mask = packed_causal_mask(position_ids)
        return F.scaled_dot_product_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, is_causal=mask is None
        )

    cache.write(layer, slots, position_ids, k, v)
    k_cache, v_cache = cache.layer(layer)  # [num_slots, KV, max_len, D]
    if backend == "triton":
        from kernels.integration import attention_cached

        return attention_cached(q, k_cache, v_cache, slots, position_ids)
    kv_len = int(position_ids.max()) + 1
    # Gather this batch's slots up to the longest row: [B, KV, kv_len, D] (a copy; the Triton path reads in place).
    k_all = k_cache[slots, :, :kv_len]
    v_all = v_cache[slots, :, :kv_len]
    mask = cached_mask(position_ids, kv_len)
    return F.scaled_dot_product_attention(
        q, repeat_kv(k_all, n_rep), repeat_kv(v_all, n_rep), attn_mask=mask
    ).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, position_ids, cache, layer, slots, backend) -> torch.Tensor:
        b, s, _ = x.shape
        # [B, S, H*D] -> [B, S, H, D] -> [B, H, S, D]
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        if backend == "triton":
            from kernels.rotary import rotary  # fused: q and k read once, written once, layout kept

            q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, position_ids, cache=cache, layer=layer, slots=slots, backend=backend)
        # [B, H, S, D] -> [B, S, H*D]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, position_ids, cache, layer, slots, backend) -> torch.Tensor:
        if backend == "triton":
            from kernels.rmsnorm import add_rmsnorm  # the residual add and the second norm in one pass

            norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
            n = add_rmsnorm(x, norm1.weight, norm1.eps)[0]
            a = self.self_attn(n, cos, sin, position_ids, cache, layer, slots, backend)
            y, h = add_rmsnorm(a, norm2.weight, norm2.eps, residual=x)
            return h + self.mlp(y)
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, position_ids, cache, layer, slots, backend)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config)
        # Non-persistent: derived from the config, never stored in a checkpoint.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.set_attn_backend(attn_backend)

    def set_attn_backend(self, name: str) -> None:
        if name not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {name!r}")
        self.attn_backend = name

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B, S, hidden]; `forward` applies the LM head."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        if cache is not None and slots is None:
            raise ValueError("a cached forward needs `slots` (one cache slot per row)")
        if slots is not None:
            slots = torch.as_tensor(slots, dtype=torch.long, device=input_ids.device)
        safe_pos = position_ids.clamp(min=0)
        cos, sin = self.rope_cos[safe_pos], self.rope_sin[safe_pos]  # [B, S, D]
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, position_ids, cache, i, slots, self.attn_backend)
        if cache is not None:
            written = position_ids.max(dim=1).values + 1  # [B]; an all-padding row writes nothing
            cache.lengths[slots] = torch.maximum(cache.lengths[slots], written)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.lm_head(self.forward_hidden(input_ids, position_ids, cache, slots))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
