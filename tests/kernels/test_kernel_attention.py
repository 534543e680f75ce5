"""Prefill attention (packed rows with backward; chunks over a slot cache) against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_rule import assert_rule, case_id, full, pairwise

from kernels import reference as ref
from kernels.attention import attention_packed, attention_prefill_cached

HEADS = 4  # query heads; KV heads = HEADS // group
PACKED = {
    "seq": [1, 17, 129, 300],
    "group": [1, 2, 4],
    "head_dim": [32, 64],
    "dtype": [torch.float32, torch.float16],
}
CACHED = {
    "seq": [1, 17, 129, 300],
    "offset": [0, 17, 128],
    **{k: PACKED[k] for k in ("group", "head_dim", "dtype")},
}


def _packed_positions(seq: int) -> torch.Tensor:
    """Row 0: three packed examples then right padding (-1); row 1: one example over the whole row."""
    row0 = torch.full((seq,), -1, dtype=torch.long)
    cuts = [0, max(1, seq // 3), max(1, (2 * seq) // 3), max(1, seq - seq // 10)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        row0[a:b] = torch.arange(b - a)
    return torch.stack([row0, torch.arange(seq)])


def _run_packed(seq, group, head_dim, dtype, device, block=None):
    gen = torch.Generator().manual_seed(seq * 100 + group * 10 + head_dim)
    pos = _packed_positions(seq).to(device)
    shapes = [
        (2, HEADS, seq, head_dim),
        (2, HEADS // group, seq, head_dim),
        (2, HEADS // group, seq, head_dim),
    ]
    base = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]
    valid = (pos >= 0)[:, None, :, None]
    dout = (
        torch.randn(shapes[0], generator=gen, dtype=torch.float64).to(device) * valid
    )  # padding: no gradient

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in base]
        out = fn(*leaves)
        out.backward(dout.to(dt))
        return out.detach(), [t.grad for t in leaves]

    o64, g64 = grads(lambda q, k, v: ref.attention_packed_ref(q, k, v, pos), torch.float64)
    o_t, g_t = grads(lambda q, k, v: ref.attention_packed_ref(q, k, v, pos), dtype)
    o_k, g_k = grads(lambda q, k, v: attention_packed(q, k, v, pos, block=block), dtype)
    assert o_k.dtype == dtype and o_k.shape == shapes[0]
    assert_rule("out", o_k, o64, o_t, valid)
    for name, a, b, c in zip(("dq", "dk", "dv"), g_k, g64, g_t, strict=True):
        assert_rule(name, a, b, c)


@pytest.mark.parametrize("case", pairwise(PACKED), ids=case_id)
def test_packed_forward_backward(case, device):
    _run_packed(**case, device=device)


@pytest.mark.slow
@pytest.mark.parametrize("case", full(PACKED), ids=case_id)
def test_packed_forward_backward_full(case, device):
    _run_packed(**case, device=device)


def test_packed_small_tiles_cross_segments_and_diagonal(device):
    """16-wide tiles at 70 tokens: every tile sees masked segment starts, an unmasked middle and the diagonal."""
    _run_packed(70, 2, 32, torch.float32, device, block=16)


@pytest.mark.parametrize("block", [(32, 16), (16, 32)], ids=["tall", "wide"])
def test_packed_unequal_tiles(block, device):
    """The GPU autotuner picks BLOCK_M != BLOCK_N (128x64, 64x128): range rounding must hold for both."""
    _run_packed(70, 2, 32, torch.float32, device, block=block)


def test_cached_unequal_tiles(device):
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = (
        torch.randn(3, 2, 128, 32, generator=gen, dtype=torch.float64).to(device) for _ in range(2)
    )
    q = torch.randn(2, 4, 45, 32, generator=gen, dtype=torch.float64).to(device)
    args = [t.to(device) for t in (torch.tensor([2, 0]), torch.tensor([17, 40]), torch.tensor([45, 30]))]
    o64 = ref.attention_cached_ref(q, k_cache, v_cache, *args)
    o32 = ref.attention_cached_ref(q.float(), k_cache.float(), v_cache.float(), *args)
    for block in ((32, 16), (16, 32)):
        out = attention_prefill_cached(q.float(), k_cache.float(), v_cache.float(), *args, block=block)
        assert_rule(f"cached {block}", out, o64, o32)


def test_packed_never_crosses_an_example_boundary(device):
    """Changing the keys/values of the first example must leave the second example's outputs unchanged."""
    gen = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.arange(40), torch.arange(60)])[None].to(device)
    q, k, v = (torch.randn(1, 2, 100, 32, generator=gen).to(device) for _ in range(3))
    out = attention_packed(q, k, v, pos)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :40] += 5.0
    v2[:, :, :40] -= 3.0
    out2 = attention_packed(q, k2, v2, pos)
    assert torch.equal(out[:, :, 40:], out2[:, :, 40:])
    assert not torch.allclose(out[:, :, :40], out2[:, :, :40])


def _run_cached(seq, offset, group, head_dim, dtype, device):
    gen = torch.Generator().manual_seed(seq * 1000 + offset * 10 + group + head_dim)
    kv_heads, max_len, num_slots = HEADS // group, offset + seq + 40, 4
    k_cache = torch.randn(num_slots, kv_heads, max_len, head_dim, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(num_slots, kv_heads, max_len, head_dim, generator=gen, dtype=torch.float64)
    # Ragged batch: a full row at `offset`, a shorter one at another offset, an all-padding row (q_len 0).
    slots = torch.tensor([2, 0, 3])
    q_start = torch.tensor([offset, offset // 2 + 5, 0])
    q_len = torch.tensor([seq, max(1, seq // 2), 0])
    q = torch.randn(3, HEADS, seq, head_dim, generator=gen, dtype=torch.float64)
    valid = (torch.arange(seq)[None, :] < q_len[:, None])[:, None, :, None].to(device)
    k_cache, v_cache, q = k_cache.to(device), v_cache.to(device), q.to(device)

    o64 = ref.attention_cached_ref(q, k_cache, v_cache, slots, q_start, q_len)
    args = (slots.to(device), q_start.to(device), q_len.to(device))
    o_t = ref.attention_cached_ref(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), *args)
    o_k = attention_prefill_cached(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), *args)
    assert_rule("out", o_k, o64, o_t, valid)
    assert torch.count_nonzero(o_k * ~valid) == 0, "padding rows must come back as zeros"


@pytest.mark.parametrize("case", pairwise(CACHED), ids=case_id)
def test_cached_prefill(case, device):
    _run_cached(**case, device=device)


@pytest.mark.slow
@pytest.mark.parametrize("case", full(CACHED), ids=case_id)
def test_cached_prefill_full(case, device):
    _run_cached(**case, device=device)


def test_cached_reads_a_transposed_query_view_in_place(device):
    """The model hands q as a [B,S,H,D] -> [B,H,S,D] transpose; the kernel must honour its strides."""
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(2, 2, 64, 32, generator=gen).to(device) for _ in range(2))
    q = torch.randn(2, 20, 4, 32, generator=gen).to(device).transpose(1, 2)
    args = (torch.tensor([1, 0]), torch.tensor([10, 0]), torch.tensor([20, 7]))
    out = attention_prefill_cached(q, k_cache, v_cache, *(a.to(device) for a in args))
    expect = ref.attention_cached_ref(q.contiguous(), k_cache, v_cache, *args)
    torch.testing.assert_close(out, expect, rtol=0, atol=2e-6)


def test_bad_inputs_name_the_problem():
    q = torch.randn(1, 4, 8, 24)
    with pytest.raises(ValueError, match="head_dim"):
        attention_packed(q, q[:, :2], q[:, :2], torch.arange(8)[None])
    q = torch.randn(1, 3, 8, 32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention_packed(q, q[:, :2], q[:, :2], torch.arange(8)[None])
    with pytest.raises(ValueError, match="position_ids"):
        attention_packed(q, q, q, torch.arange(7)[None])
