"""The two graphs the exporter traces, written over the model's own modules so their weights are shared.

`ServedGraph` is built for the serving engine's slot cache; `OptimumGraph` has the input/output names that
optimum, transformers.js and onnxruntime-genai style tools expect. Both reuse `model.transformer`'s norms,
projections, rotary tables and MLPs; only attention differs, because the cache is outside the graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from export.runtime import ATTENTION_DESIGNS
from model.transformer import Transformer, apply_rotary


def _project_qkv(layer, x, cos, sin):
    """Normed input x [B,S,H] -> rotated q [B,H,S,D], rotated k [B,KV,S,D], v [B,KV,S,D]."""
    attn = layer.self_attn
    b, s, _ = x.shape
    # [B, S, heads*D] -> [B, S, heads, D] -> [B, heads, S, D]
    q = attn.q_proj(x).view(b, s, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, attn.n_kv, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, attn.n_kv, attn.head_dim).transpose(1, 2)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def _grouped_attention(q, keys, values, allowed):
    """q [B,H,S,D]; keys/values [B,KV,T,D]; allowed [B,S,T] bool -> [B,S,H*D].

    Query heads are grouped onto their KV head by a reshape instead of repeating keys/values (repeat_kv would
    copy the whole gathered past n_rep times per layer per step)."""
    b, h, s, d = q.shape
    kv, t = keys.shape[1], keys.shape[2]
    rep = h // kv
    qg = q.reshape(b, kv, rep * s, d)  # [B, KV, rep*S, D]: head h = kv * rep + r, as repeat_kv orders them
    scores = torch.matmul(qg, keys.transpose(2, 3)) * (1.0 / math.sqrt(d))  # [B, KV, rep*S, T]
    scores = scores.view(b, kv, rep, s, t)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(b, kv, rep * s, t)
    out = torch.matmul(probs, values)  # [B, KV, rep*S, D]
    # [B, KV, rep*S, D] -> [B, H, S, D] -> [B, S, H*D]
    return out.view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R [D, D] with x @ R = rotate_half(x) = cat(-x2, x1): one MatMul node per rotation instead of two Slices,
    a Neg, a Concat and the shape arithmetic the tracer emits for `chunk` (16 fewer nodes per layer)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


def cached_attention(q, past_k, past_v, k, v, bias, sizes):
    """q [B,H,S,D] with the softmax scale folded in; past_k/past_v [B,KV,L,D] gathered from the cache; k/v
    [B,KV,S,D] the new tokens; bias [B,1,1,S,L+S] additive mask (0 or -inf) -> [B,S,H*D].
    sizes = (B, S, L, H, KV, D) from the caller: B, S, L traced once per graph and H, KV, D plain ints (read
    here from the tensors, they add shape arithmetic to every layer: 150 more nodes at 6 layers).

    Query heads are grouped onto their KV head by a reshape instead of repeating keys/values. The new keys
    are concatenated after the past ones (one more copy of the gathered rows): joining split scores instead
    (no copy, two more small batched MatMuls, a Concat and two Slices per layer) measured 5% slower at batch 16
    and 5% faster at batch 1 (demo model, context 128), and batch 16 is where the served graph was behind."""
    b, s, length, h, kv, d = sizes
    rep = h // kv
    qg = q.reshape(b, kv, rep * s, d)  # [B, KV, rep*S, D]: head h = kv * rep + r, as repeat_kv orders them
    keys = torch.cat([past_k, k], dim=2)  # [B, KV, L+S, D]
    values = torch.cat([past_v, v], dim=2)
    scores = torch.matmul(qg, keys.transpose(2, 3)).view(b, kv, rep, s, length + s) + bias
    probs = torch.softmax(scores, dim=-1).view(b, kv, rep * s, length + s)
    out = torch.matmul(probs, values)  # [B, KV, rep*S, D]
    # [B, KV, rep*S, D] -> [B, H, S, D] -> [B, S, H*D]
    return out.view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)


def slot_attention_reference(q, k, v, past_k, past_v, slot_ids, position_ids):
    """What the SlotAttention op (export/csrc/slot_attention.cc) computes, in PyTorch: the op's test reference
    and the values the tracer sees.

    q [B,S,H*D] rotated, softmax scale folded in; k, v [B,S,KV,D] the new tokens; past_k/past_v [slots,KV,L,D]
    the whole cache; slot_ids [B]; position_ids [B,S] (start_b.., -1 = right padding) -> [B,S,H*D], zero at
    padding. Query s of row b sees its slot's positions < start_b and the row's new tokens 0..s."""
    b, s, hd = q.shape
    kv, d = past_k.shape[1], past_k.shape[3]
    h = hd // d
    rep = h // kv
    out = torch.zeros_like(q)
    for i in range(b):
        start = int(position_ids[i, 0])
        n = int((position_ids[i] >= 0).sum())
        slot = int(slot_ids[i])
        keys = torch.cat([past_k[slot, :, :start], k[i, :n].transpose(0, 1)], dim=1)  # [KV, start+n, D]
        values = torch.cat([past_v[slot, :, :start], v[i, :n].transpose(0, 1)], dim=1)
        qi = q[i, :n].view(n, kv, rep, d).permute(1, 2, 0, 3)  # [KV, rep, n, D]
        scores = torch.matmul(qi, keys[:, None].transpose(2, 3))  # [KV, rep, n, start+n]
        allowed = torch.arange(start + n)[None, :] <= start + torch.arange(n)[:, None]  # [n, start+n]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[i, :n] = torch.matmul(probs, values[:, None]).permute(2, 0, 1, 3).reshape(n, hd)
    return out


class SlotAttentionOp(torch.autograd.Function):
    """`ai.instructlm::SlotAttention` for the tracer: exports as the custom op, runs as the reference."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, slot_ids, position_ids):
        return slot_attention_reference(q, k, v, past_k, past_v, slot_ids, position_ids)

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, slot_ids, position_ids):
        out = g.op("ai.instructlm::SlotAttention", q, k, v, past_k, past_v, slot_ids, position_ids)
        return out.setType(q.type())


def register_fused_projections(module: nn.Module, model: Transformer) -> None:
    """Buffers `qkv_proj_{i}` [H, (heads+2*KV)*D] and `gate_up_proj_{i}` [H, 2*I] on `module`: each layer's
    q/k/v projections as one MatMul and gate/up as one, as vLLM's QKVParallelLinear and
    MergedColumnParallelLinear do (two weight MatMuls a layer instead of five). Every output column is the same
    dot product as before, so the results are bitwise equal. Persistent, so they trace as initializers that
    int8 quantization finds."""
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            a, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).T.contiguous()
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).T.contiguous()
            module.register_buffer(f"qkv_proj_{i}", qkv)
            module.register_buffer(f"gate_up_proj_{i}", gate_up)


def fused_qkv(module: nn.Module, i: int, xn, sizes: tuple):
    """Normed input [B,S,H] -> q [B,S,heads,D], k and v [B,S,KV,D] (unrotated) through layer i's fused MatMul.
    sizes = (B, S, heads, KV, D) from the caller: B and S traced once per graph, not per layer."""
    b, s, h, kv, d = sizes
    qkv = torch.matmul(xn, getattr(module, f"qkv_proj_{i}"))
    q = qkv[..., : h * d].view(b, s, h, d)
    k = qkv[..., h * d : (h + kv) * d].view(b, s, kv, d)
    v = qkv[..., (h + kv) * d :].view(b, s, kv, d)
    return q, k, v


def fused_mlp(module: nn.Module, i: int, layer, xn):
    """SwiGLU of layer i through its fused gate/up MatMul: down(silu(gate) * up)."""
    gate_up = torch.matmul(xn, getattr(module, f"gate_up_proj_{i}"))
    inter = layer.mlp.gate_proj.out_features  # a plain int: a shape read here would trace into Shape ops
    return layer.mlp.down_proj(F.silu(gate_up[..., :inter]) * gate_up[..., inter:])


class ServedGraph(nn.Module):
    """One forward over the engine's slot cache, for any mix of prefill chunks and decode rows.

    Inputs
      input_ids [B,S] int64        right-padded rows
      position_ids [B,S] int64     row b holds positions start_b.. ; -1 marks padding (output ignored)
      logits_index [B,N] int64     which positions of each row get logits: N=1 (last token) or every position
      kv_index [B,KV,C] int64      row of each past chunk in the cache viewed as chunk rows:
                                   (slot*KV + h)*(cache_len/chunk) + j for chunk j, positions j*chunk..
      past_key.{i}, past_value.{i} [R, chunk*D] float32   the whole cache of layer i, `chunk` positions a row
    Outputs
      logits [B,N,V]; new_key.{i}, new_value.{i} [B,KV,S,D] for the runner to write at positions start_b..

    The runner sizes each slot's cache in whole chunks; the graph reads the chunk size from past_key's last
    axis (chunk*D), so a bundle traced with chunk 1 (every position a row, the first version) runs unchanged.
    Past position l of row b is visible when l < start_b; the new tokens see each other causally. The graph
    never copies the cache: it gathers only the C chunks this batch reads (C*chunk >= the longest row's start).

    Why chunks of 16 positions: a Gather copies one index at a time, and with one position a row (128 bytes at
    head_dim 32) the per-index cost, not the bytes, set its speed (Gather was 23% of a batch-16 decode step).
    Same graph, same run, batch 16, context 128: 5.59 ms per step with one position a row, 4.95 ms with 16;
    8 and 32 came within 4% of 16, inside run-to-run noise. Rows of 2 KiB read the same bytes plus at most 15
    masked positions per row. The rest follows the profile too: the mask is built once as an additive bias,
    not per layer; rotate_half is one MatMul (`rotate_half_matrix`) instead of Slice/Neg/Concat and shape
    arithmetic; the softmax scale is folded into the query's cos/sin; sizes are traced once, not per layer
    (1377 -> 996 traced nodes, 649 -> 334 after onnxruntime's optimizations). The runner's own work per step
    was cut too (one write for all layers, vectorized checks, no logits copy). Each layer's q/k/v projections
    are one MatMul over concatenated weights and gate/up another (vLLM's QKVParallelLinear and
    MergedColumnParallelLinear): 18 fewer weight MatMuls at 6 layers and bitwise-equal outputs
    (`register_fused_projections`, shared with bench/export.py's GQA prototype).

    Median CPU time per decode step, demo model, one thread, context 128, `bench/export.py` (docs/BENCHMARKS.md):

        batch   this graph   the first served graph (earlier run)   GQA whole-decoder prototype   optimum loop
        1         1.10 ms          1.57 ms                                1.01 ms                     1.17 ms
        16        4.58 ms          5.53 ms                                4.33 ms                     4.04 ms

    At batch 16 the optimum-layout loop is still ahead (1.03x-1.13x over four runs, 1.37x before). What
    is left is one copy: this graph gathers the past (one copy) and concatenates the new keys (a second), where
    the loop only concatenates. Joining split scores instead (no second copy, two more small batched MatMuls
    per layer) measured 5% slower at batch 16 (5% faster at batch 1), and scattering the new keys into the
    gathered buffer with ScatterElements 7% slower, so onnxruntime evidently copies the scatter's input too.
    A graph traced for decode only (one query position, the rest unchanged) ran as fast as this one, and with
    the new token's score and value as elementwise products (no concatenated keys/values) 7% slower: each
    such op is a node per layer, and on this machine a node costs microseconds whatever its size.

    onnxruntime's GroupQueryAttention over a shared past/present buffer (the other design issue 7 names) reads
    the cache in place; with this graph's fusions it is 5% faster at batch 16 (4.02 vs 4.23 ms, the optimum loop
    3.90) and 19% at batch 1 (0.87 vs 1.08; docs/BENCHMARKS.md), but its batch rows must be the buffer's rows
    (slots compacted by a cache copy when sequences end out of order, or idle slots carried as dummy rows), its
    CPU kernel takes one new-token count for all rows (a ragged chunk is padded, writing garbage past each
    row's end, which must stay below max_len), and it is a com.microsoft op that onnx.checker and other
    runtimes do not know; it did not beat the optimum loop at batch 16 either. This graph keeps any slot in
    any row, any mix of chunk and past lengths in one call, standard ONNX ops only, and is traced from the
    model's own modules (parity about 1e-6). Its price under continuous batching: every row attends over the
    longest row's past (masked), so 16 rows spread over positions 20-84 cost what all at 84 cost, not what all
    at 52 cost, where the GQA prototype follows each row's length (`bench/decode_shapes.py`; numbers in
    docs/BENCHMARKS.md).
    """

    def __init__(self, model: Transformer, attention: str = "slot") -> None:
        super().__init__()
        if attention not in ATTENTION_DESIGNS:
            raise ValueError(f"attention={attention!r}: one of {', '.join(ATTENTION_DESIGNS)}")
        self.model = model
        self.attention = attention
        # Traced as a Constant node; int8 quantization finds its MatMuls by value and leaves them in fp32.
        self.register_buffer("rotate_half", rotate_half_matrix(model.config.head_dim), persistent=False)
        register_fused_projections(self, model)

    def forward(self, input_ids, position_ids, logits_index, index, *past):
        """index: slot_ids [B] (attention="slot") or kv_index [B,KV,C] (attention="gather")."""
        if self.attention == "slot":
            return self._forward_slot(input_ids, position_ids, logits_index, index, *past)
        return self._forward_gather(input_ids, position_ids, logits_index, index, *past)

    def _forward_slot(self, input_ids, position_ids, logits_index, slot_ids, *past):
        m = self.model
        cfg = m.config
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rot = self.rotate_half
        b, s = input_ids.shape
        safe_pos = position_ids.clamp(min=0)
        cos, sin = m.rope_cos[safe_pos][:, :, None], m.rope_sin[safe_pos][:, :, None]  # [B, S, 1, D]
        scale = 1.0 / math.sqrt(d)
        q_cos, q_sin = cos * scale, sin * scale  # the softmax scale, applied once to the query's rotation
        x = m.embed_tokens(input_ids)
        new_kv = []
        for i, layer in enumerate(m.layers):
            # [B, S, heads, D] throughout: the op takes this layout, so no transposes
            q, k, v = fused_qkv(self, i, layer.input_layernorm(x), (b, s, h, kv, d))
            q = q * q_cos + torch.matmul(q, rot) * q_sin
            k = k * cos + torch.matmul(k, rot) * sin
            out = SlotAttentionOp.apply(
                q.reshape(b, s, h * d), k, v, past[2 * i], past[2 * i + 1], slot_ids, position_ids
            )
            hidden = x + layer.self_attn.o_proj(out)
            x = hidden + fused_mlp(self, i, layer, layer.post_attention_layernorm(hidden))
            new_kv += [k, v]
        return (self._logits(x, logits_index), *new_kv)

    def _logits(self, x, logits_index):
        hidden = self.model.norm(x)  # [B, S, H]
        picked = torch.gather(hidden, 1, logits_index[:, :, None].expand(-1, -1, hidden.shape[2]))  # [B,N,H]
        return self.model.lm_head(picked)

    def _forward_gather(self, input_ids, position_ids, logits_index, kv_index, *past):
        m = self.model
        cfg = m.config
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rot = self.rotate_half
        b, s = input_ids.shape
        length = kv_index.shape[2] * (past[0].shape[1] // d)  # chunks * chunk positions
        safe_pos = position_ids.clamp(min=0)
        cos, sin = m.rope_cos[safe_pos][:, None], m.rope_sin[safe_pos][:, None]  # [B, 1, S, D]
        scale = 1.0 / math.sqrt(d)
        q_cos, q_sin = cos * scale, sin * scale  # the softmax scale, applied once to the query's rotation
        start = position_ids[:, :1]  # [B, 1]: the first position of each row is never padding
        past_ok = torch.arange(length, device=input_ids.device)[None, :] < start  # [B, L]
        new_ok = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()  # [S, S]
        allowed = torch.cat([past_ok[:, None, :].expand(b, s, length), new_ok[None].expand(b, s, s)], dim=2)
        # [B, 1, 1, S, L+S]: 0 where allowed, -inf elsewhere; built once, added to every layer's scores
        bias = torch.zeros(allowed.shape, device=input_ids.device).masked_fill(~allowed, float("-inf"))
        bias = bias[:, None, None]
        sizes = (b, s, length, h, kv, d)
        x = m.embed_tokens(input_ids)
        new_kv = []
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            # [B, S, heads, D] -> [B, heads, S, D]
            q, k, v = (
                t.transpose(1, 2) for t in fused_qkv(self, i, layer.input_layernorm(x), (b, s, h, kv, d))
            )
            q = q * q_cos + torch.matmul(q, rot) * q_sin
            k = k * cos + torch.matmul(k, rot) * sin
            # Gather [R, chunk*D] at [B, KV, C] -> [B, KV, C, chunk*D] -> [B, KV, L, D]
            past_k = past[2 * i][kv_index].reshape(b, kv, length, d)
            past_v = past[2 * i + 1][kv_index].reshape(b, kv, length, d)
            hidden = x + attn.o_proj(cached_attention(q, past_k, past_v, k, v, bias, sizes))
            x = hidden + fused_mlp(self, i, layer, layer.post_attention_layernorm(hidden))
            new_kv += [k, v]
        return (self._logits(x, logits_index), *new_kv)


class OptimumGraph(nn.Module):
    """The layout optimum's `text-generation-with-past` export uses for Llama.

    input_ids [B,S], attention_mask [B,P+S] (1 = real token, left padding allowed), position_ids [B,S],
    past_key_values.{i}.key|value [B,KV,P,D] -> logits [B,S,V], present.{i}.key|value [B,KV,P+S,D].
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        m = self.model
        b, s = input_ids.shape
        total = attention_mask.shape[1]
        p = total - s
        safe_pos = position_ids.clamp(min=0)
        cos, sin = m.rope_cos[safe_pos], m.rope_sin[safe_pos]
        # Query i sits at cache index p + i and sees indices 0..p+i that the attention mask marks real.
        q_idx = torch.arange(s, device=input_ids.device)[:, None] + p  # [S, 1]
        causal = torch.arange(total, device=input_ids.device)[None, :] <= q_idx  # [S, P+S]
        allowed = causal[None] & attention_mask[:, None, :].bool()  # [B, S, P+S]
        # A fully masked query row (left padding) would give NaN; let it see itself, its output is ignored.
        allowed = allowed | (torch.arange(total, device=input_ids.device)[None, :] == q_idx)[None]
        x = m.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(m.layers):
            q, k, v = _project_qkv(layer, layer.input_layernorm(x), cos, sin)
            keys = torch.cat([past[2 * i], k], dim=2)
            values = torch.cat([past[2 * i + 1], v], dim=2)
            h = x + layer.self_attn.o_proj(_grouped_attention(q, keys, values, allowed))
            x = h + layer.mlp(layer.post_attention_layernorm(h))
            presents += [keys, values]
        return (m.lm_head(m.norm(x)), *presents)
