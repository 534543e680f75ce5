"""Flash-Decoding over the slot cache against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_rule import assert_rule, case_id, full, pairwise

from kernels import reference as ref
from kernels.decode import decode_attention

HEADS = 4
DECODE = {
    "splits": [1, 3, 7],
    "group": [1, 2, 4],
    "head_dim": [32, 64],
    "dtype": [torch.float32, torch.float16],
}
# Ragged context lengths: 1 key, a length that leaves the last split ragged at every split count, a long one
# whose 7 splits are uneven, 0 (an idle slot: zeros), and a multiple of the 32-key tile.
CTX = [1, 150, 301, 0, 64]


def _run(splits, group, head_dim, dtype, device, block_n=None):
    gen = torch.Generator().manual_seed(splits * 100 + group * 10 + head_dim)
    kv_heads, num_slots, max_len = HEADS // group, 6, 320
    k_cache = torch.randn(num_slots, kv_heads, max_len, head_dim, generator=gen, dtype=torch.float64).to(
        device
    )
    v_cache = torch.randn(num_slots, kv_heads, max_len, head_dim, generator=gen, dtype=torch.float64).to(
        device
    )
    q = torch.randn(len(CTX), HEADS, head_dim, generator=gen, dtype=torch.float64).to(device)
    slots = torch.tensor([4, 0, 5, 1, 2], device=device)
    ctx = torch.tensor(CTX, device=device)
    o64 = ref.decode_ref(q, k_cache, v_cache, slots, ctx)
    o_t = ref.decode_ref(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), slots, ctx)
    o_k = decode_attention(
        q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), slots, ctx, num_splits=splits, block_n=block_n
    )
    assert o_k.shape == q.shape and o_k.dtype == dtype
    assert_rule("decode", o_k, o64, o_t)
    assert torch.count_nonzero(o_k[3]) == 0, "a slot with no context decodes to zeros"


@pytest.mark.parametrize("case", pairwise(DECODE), ids=case_id)
def test_decode(case, device):
    _run(**case, device=device)


@pytest.mark.slow
@pytest.mark.parametrize("case", full(DECODE), ids=case_id)
def test_decode_full(case, device):
    _run(**case, device=device)


def test_decode_more_splits_than_tiles(device):
    """16-key tiles, 7 splits: the 1-key row leaves six splits empty (they must weigh nothing) and the 150-key
    row splits into 32-key ranges of two tiles with a ragged 22-key last one."""
    _run(7, 2, 32, torch.float32, device, block_n=16)


def test_decode_split_count_does_not_change_the_answer(device):
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = (torch.randn(2, 2, 200, 32, generator=gen).to(device) for _ in range(2))
    q = torch.randn(2, 4, 32, generator=gen).to(device)
    slots, ctx = torch.tensor([1, 0], device=device), torch.tensor([199, 77], device=device)
    one = decode_attention(q, k_cache, v_cache, slots, ctx, num_splits=1)
    for splits in (2, 5):
        torch.testing.assert_close(decode_attention(q, k_cache, v_cache, slots, ctx, num_splits=splits), one)


def test_decode_bad_shapes():
    with pytest.raises(ValueError, match="decode expects"):
        decode_attention(
            torch.randn(1, 4, 1, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), [0], [1]
        )
    with pytest.raises(ValueError, match="KV heads"):
        decode_attention(torch.randn(1, 3, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), [0], [1])
