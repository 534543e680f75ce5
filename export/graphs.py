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


def slot_attention_reference(q, k, v, past_k, past_v, slot_ids, position_ids, seq_lens):
    """What the SlotAttention op (export/csrc/slot_attention.cc) computes, in PyTorch: the op's test reference
    and the values the tracer sees.

    q [B,S,H*D] rotated, softmax scale folded in; k, v [B,S,KV,D] the new tokens; past_k/past_v [slots,KV,L,D]
    the whole cache; slot_ids, seq_lens [R]; position_ids [B,S]. Rows are runs of the B*S flattened tokens:
    row r is seq_lens[r] tokens from sum(seq_lens[:r]) on, starting at its first token's position. Query s of
    row r sees its slot's positions < start_r and the row's new tokens 0..s; tokens after the last row are
    zero. -> [B,S,H*D]."""
    b, s, hd = q.shape
    kv, d = past_k.shape[1], past_k.shape[3]
    h = hd // d
    rep = h // kv
    qf, kf, vf = q.reshape(b * s, hd), k.reshape(b * s, kv, d), v.reshape(b * s, kv, d)
    pos = position_ids.reshape(-1)
    out = torch.zeros_like(qf)
    t0 = 0
    for r in range(seq_lens.shape[0]):
        n, slot = int(seq_lens[r]), int(slot_ids[r])
        start = int(pos[t0])
        keys = torch.cat(
            [past_k[slot, :, :start], kf[t0 : t0 + n].transpose(0, 1)], dim=1
        )  # [KV, start+n, D]
        values = torch.cat([past_v[slot, :, :start], vf[t0 : t0 + n].transpose(0, 1)], dim=1)
        qi = qf[t0 : t0 + n].view(n, kv, rep, d).permute(1, 2, 0, 3)  # [KV, rep, n, D]
        scores = torch.matmul(qi, keys[:, None].transpose(2, 3))  # [KV, rep, n, start+n]
        allowed = torch.arange(start + n)[None, :] <= start + torch.arange(n)[:, None]  # [n, start+n]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[t0 : t0 + n] = torch.matmul(probs, values[:, None]).permute(2, 0, 1, 3).reshape(n, hd)
        t0 += n
    return out.view(b, s, hd)


class SlotAttentionOp(torch.autograd.Function):
    """`ai.instructlm::SlotAttention` for the tracer: exports as the custom op, runs as the reference."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, slot_ids, position_ids, seq_lens):
        return slot_attention_reference(q, k, v, past_k, past_v, slot_ids, position_ids, seq_lens)

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, slot_ids, position_ids, seq_lens):
        out = g.op("ai.instructlm::SlotAttention", q, k, v, past_k, past_v, slot_ids, position_ids, seq_lens)
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
      input_ids [B,S] int64        gather: right-padded rows; slot: B = 1, the rows packed one after another
      position_ids [B,S] int64     each token's position (row r's start_r, start_r+1, ..); -1 marks padding
      logits_index [B,N] int64     which tokens get logits: each row's last, or every one
      attention="slot" (default):
        slot_ids [R] int64, seq_lens [R] int64    cache slot and token count of each row
        past_key.{i}, past_value.{i} [slots, KV, cache_len, D] float32   layer i's whole cache, as it is
      attention="gather" (standard ONNX ops only):
        kv_index [B,KV,C] int64    row of each past chunk in the cache viewed as chunk rows:
                                   (slot*KV + h)*(cache_len/chunk) + j for chunk j, positions j*chunk..
        past_key.{i}, past_value.{i} [R, chunk*D] float32   the whole cache of layer i, `chunk` positions a row
    Outputs
      logits [B,N,V]; new_key.{i}, new_value.{i} for the runner to write at positions start_b..:
      [B,S,KV,D] (slot) or [B,KV,S,D] (gather)

    Past position l of a row is visible when l < its start; a row's new tokens see each other causally. Neither
    design copies the cache whole; they differ in how attention reads it. The slot graph's packing means a
    step's decode rows and prefill chunks go through one call with no padding (`OnnxRunner.step`), so the
    weights are read once a step.

    slot: each layer's attention is one `ai.instructlm::SlotAttention` node (export/csrc/slot_attention.cc,
    an onnxruntime custom op built by export/custom_ops.py), which reads every row's own positions of its slot
    in place, groups query heads on their KV head, and follows each row's length. Nothing is gathered or
    concatenated, so the past is read from memory once per layer and step. Its PyTorch reference
    (`slot_attention_reference`) is what the tracer runs and what the op is tested against.

    gather: the past is gathered in chunks of 16 positions (a Gather copies one index at a time; with one
    position a row its per-index cost set its speed: 5.59 vs 4.95 ms per batch-16 step), the new keys are
    concatenated after it, and attention runs as batched MatMuls under an additive length mask. That is two
    copies of the past per layer and step (the optimum-layout loop makes one, its concat), and every row
    attends over the longest row's past. Kept for runtimes without the op library (`--attention gather`).

    Both share the rest, from onnxruntime's per-node profile: rotate_half is one MatMul
    (`rotate_half_matrix`), the softmax scale is folded into the query's cos/sin, sizes are traced once, and
    each layer's q/k/v projections are one MatMul over concatenated weights and gate/up another (vLLM's
    QKVParallelLinear and MergedColumnParallelLinear; `register_fused_projections`, bitwise-equal outputs).

    Why a custom op. onnxruntime's GroupQueryAttention over a shared past/present buffer (the other design
    issue 7 names) also reads the cache in place, but needs batch rows to be buffer rows (slots compacted by a
    cache copy when sequences end out of order), takes one new-token count for all rows, and its kernel was no
    faster than the optimum loop at batch 16; the standard-op gather graph could not get below the loop's one
    copy either. Median CPU ms per decode step, demo model, one thread, context 128, `bench/export.py`
    (docs/BENCHMARKS.md, 20:49 UTC run):

        batch   slot (served)   gather graph   GQA prototype   optimum loop   PyTorch eager
        1         0.95            1.03            0.91            1.41           3.53
        16        3.12            4.24            4.13            4.06          10.50

    One attention layer alone, batch 16, context 512, the cache rows hot: slot op 245 us, GroupQueryAttention
    501, gather + mask 676.
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

    def forward(self, input_ids, position_ids, logits_index, *rest):
        """rest: slot_ids [R], seq_lens [R], then the past (attention="slot"); kv_index [B,KV,C], then the past
        (attention="gather")."""
        if self.attention == "slot":
            return self._forward_slot(input_ids, position_ids, logits_index, *rest)
        return self._forward_gather(input_ids, position_ids, logits_index, *rest)

    def _forward_slot(self, input_ids, position_ids, logits_index, slot_ids, seq_lens, *past):
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
                q.reshape(b, s, h * d), k, v, past[2 * i], past[2 * i + 1], slot_ids, position_ids, seq_lens
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
