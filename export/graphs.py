"""The two graphs the exporter traces, written over the model's own modules so their weights are shared.

`ServedGraph` is built for the serving engine's slot cache; `OptimumGraph` has the input/output names that
optimum, transformers.js and onnxruntime-genai style tools expect. Both reuse `model.transformer`'s norms,
projections, rotary tables and MLPs; only attention differs, because the cache is outside the graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


def _split_attention(q, past_k, past_v, k, v, past_ok, new_ok):
    """Attention over gathered past keys/values [B,KV,L,D] and the new ones [B,KV,S,D] without concatenating
    them: scores [B,KV,rep*S,L] and [B,KV,rep*S,S] are joined instead, rep*S*(L+S) floats per KV head rather
    than 2*(L+S)*D (16x less copying at decode, head_dim 32, 2 query heads per KV head).
    past_ok [B,S,L], new_ok [B,S,S] bool -> [B,S,H*D]."""
    b, h, s, d = q.shape
    kv, length = k.shape[1], past_k.shape[2]
    rep = h // kv
    qg = q.reshape(b, kv, rep * s, d)  # [B, KV, rep*S, D]: head h = kv * rep + r, as repeat_kv orders them
    scale = 1.0 / math.sqrt(d)
    # [B, KV, rep*S, L] and [B, KV, rep*S, S] -> [B, KV, rep*S, L+S]
    scores = torch.cat([torch.matmul(qg, past_k.transpose(2, 3)), torch.matmul(qg, k.transpose(2, 3))], dim=3)
    scores = scores * scale
    allowed = torch.cat([past_ok, new_ok], dim=2)  # [B, S, L+S]
    scores = scores.view(b, kv, rep, s, length + s).masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(b, kv, rep * s, length + s)
    # [B, KV, rep*S, D]
    out = torch.matmul(probs[..., :length], past_v) + torch.matmul(probs[..., length:], v)
    # [B, KV, rep*S, D] -> [B, H, S, D] -> [B, S, H*D]
    return out.view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)


class ServedGraph(nn.Module):
    """One forward over the engine's slot cache, for any mix of prefill chunks and decode rows.

    Inputs
      input_ids [B,S] int64        right-padded rows
      position_ids [B,S] int64     row b holds positions start_b.. ; -1 marks padding (output ignored)
      logits_index [B,N] int64     which positions of each row get logits: N=1 (last token) or every position
      kv_index [B,KV,L] int64      row of each past position in the flattened cache: (slot*KV + h)*max_len + l
      past_key.{i}, past_value.{i} [R, D] float32   the whole cache of layer i, flattened to rows of head_dim
    Outputs
      logits [B,N,V]; new_key.{i}, new_value.{i} [B,KV,S,D] for the runner to write at positions start_b..

    Past position l of row b is visible when l < start_b; the new tokens see each other causally. The graph
    never copies the cache: it gathers only the L positions this batch reads (L = the longest row's start).

    Why this design and not onnxruntime's GroupQueryAttention over a shared past/present buffer (the other one
    issue 7 names), measured by `bench/export.py` on the demo model, one thread, median CPU time per decode
    step at context 128 (docs/BENCHMARKS.md has the full table):

        batch    this graph (runner included)   GQA whole-decoder prototype   optimum-layout loop
        1              1.57 ms                        1.03 ms                       1.27 ms
        16             5.53 ms                        4.40 ms                       4.04 ms

    One layer's attention alone: 46 vs 17 us at batch 1, 193 vs 133 us at batch 16. So GQA is faster: it reads
    the cache in place, where this graph gathers the used positions (one row copy per position and layer,
    about 2x the cost of a contiguous concat) and spends ~25 small nodes per layer on masks and split scores.
    This graph was kept because it is the one that exists with its parity and schedule tests, and because
    GQA's constraints move work into the runner: its batch rows must be the buffer's rows (slots compacted by a
    cache copy when sequences end out of order, or idle slots carried as dummy rows), its CPU kernel takes one
    new-token count for all rows (a ragged chunk is padded, writing garbage past each row's end, which must
    stay below max_len), and it is a com.microsoft op that onnx.checker and other runtimes do not know. Here
    any slot goes in any row, any mix of chunk and past lengths shares a call, only standard ONNX ops are used,
    and the graph is traced from the model's own modules (parity about 1e-6). Switching the decode path to
    GQA is the first performance follow-up (bench/export.py's `GQAPrototype` is the measured starting point).
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, logits_index, kv_index, *past):
        m = self.model
        b, s = input_ids.shape
        length = kv_index.shape[2]
        safe_pos = position_ids.clamp(min=0)
        cos, sin = m.rope_cos[safe_pos], m.rope_sin[safe_pos]  # [B, S, D]
        start = position_ids[:, :1]  # [B, 1]: the first position of each row is never padding
        past_ok = torch.arange(length, device=input_ids.device)[None, :] < start  # [B, L]
        past_ok = past_ok[:, None, :].expand(b, s, length)  # [B, S, L]
        new_ok = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()[None].expand(b, s, s)
        x = m.embed_tokens(input_ids)
        new_kv = []
        for i, layer in enumerate(m.layers):
            q, k, v = _project_qkv(layer, layer.input_layernorm(x), cos, sin)
            past_k, past_v = past[2 * i], past[2 * i + 1]
            # Gather [R, D] at [B, KV, L] -> [B, KV, L, D]: only this batch's rows, only their used positions.
            attn = _split_attention(q, past_k[kv_index], past_v[kv_index], k, v, past_ok, new_ok)
            h = x + layer.self_attn.o_proj(attn)
            x = h + layer.mlp(layer.post_attention_layernorm(h))
            new_kv += [k, v]
        hidden = m.norm(x)  # [B, S, H]
        picked = torch.gather(hidden, 1, logits_index[:, :, None].expand(-1, -1, hidden.shape[2]))  # [B,N,H]
        return (m.lm_head(picked), *new_kv)


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
