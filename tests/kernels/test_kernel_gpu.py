"""GPU-only cases: bf16 (the interpreter's bf16 arithmetic is wrong), autotuned tiles, long sequences.

Run by bench/gpu_check.sh on a CUDA machine; skipped (by the `gpu` marker) everywhere else.
"""

from __future__ import annotations

import pytest
import torch
from kernel_rule import assert_rule

import kernels
from kernels import reference as ref
from kernels.attention import attention_packed, attention_prefill_cached
from kernels.decode import decode_attention, default_num_splits
from kernels.rmsnorm import add_rmsnorm
from kernels.rotary import rotary

pytestmark = pytest.mark.gpu

LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(("seq", "head_dim", "group"), [(1024, 128, 2), (777, 64, 4)])
def test_packed_autotuned_low_precision(dtype, seq, head_dim, group):
    gen = torch.Generator().manual_seed(seq)
    pos = torch.arange(seq).repeat(2, 1)
    pos[0, seq // 3 :] -= seq // 3  # two packed examples in row 0
    pos = pos.cuda()
    shapes = [(2, 8, seq, head_dim), (2, 8 // group, seq, head_dim), (2, 8 // group, seq, head_dim)]
    base = [torch.randn(s, generator=gen, dtype=torch.float64).cuda() for s in shapes]
    dout = torch.randn(shapes[0], generator=gen, dtype=torch.float64).cuda()

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in base]
        out = fn(*leaves, pos)
        out.backward(dout.to(dt))
        return [out.detach()] + [t.grad for t in leaves]

    want, same = run(ref.attention_packed_ref, torch.float64), run(ref.attention_packed_ref, dtype)
    got = run(attention_packed, dtype)
    for name, g, w, s in zip(("out", "dq", "dk", "dv"), got, want, same, strict=True):
        assert_rule(name, g, w, s)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_cached_prefill_autotuned_low_precision(dtype):
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache = (
        torch.randn(4, 2, 2048, 128, generator=gen, dtype=torch.float64).cuda() for _ in range(2)
    )
    q = torch.randn(3, 8, 512, 128, generator=gen, dtype=torch.float64).cuda()
    args = [
        t.cuda()
        for t in (torch.tensor([3, 0, 1]), torch.tensor([1000, 0, 1500]), torch.tensor([512, 300, 1]))
    ]
    valid = (torch.arange(512)[None, :].cuda() < args[2][:, None])[:, None, :, None]
    want = ref.attention_cached_ref(q, k_cache, v_cache, *args)
    same = ref.attention_cached_ref(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), *args)
    got = attention_prefill_cached(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), *args)
    assert_rule("cached", got, want, same, valid)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_decode_default_splits_low_precision(dtype):
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = (
        torch.randn(8, 4, 8192, 128, generator=gen, dtype=torch.float64).cuda() for _ in range(2)
    )
    q = torch.randn(4, 16, 128, generator=gen, dtype=torch.float64).cuda()
    slots, ctx = torch.tensor([7, 0, 3, 5]).cuda(), torch.tensor([8192, 1, 4097, 1000]).cuda()
    assert default_num_splits(4, 4, 8192, q.device) > 1, "a 4-row decode must split the context on a GPU"
    want = ref.decode_ref(q, k_cache, v_cache, slots, ctx)
    same = ref.decode_ref(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), slots, ctx)
    got = decode_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), slots, ctx)
    assert_rule("decode", got, want, same)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_norm_and_rotary_low_precision(dtype):
    gen = torch.Generator().manual_seed(4)
    x, r = (torch.randn(64, 2048, generator=gen, dtype=torch.float64).cuda() for _ in range(2))
    w = (1 + 0.1 * torch.randn(2048, generator=gen, dtype=torch.float64)).cuda()
    want, same = (
        ref.add_rmsnorm_ref(x, w, 1e-5, r),
        ref.add_rmsnorm_ref(x.to(dtype), w.to(dtype), 1e-5, r.to(dtype)),
    )
    got = add_rmsnorm(x.to(dtype), w.to(dtype), 1e-5, r.to(dtype))
    for name, g, a, s in zip(("y", "h"), got, want, same, strict=True):
        assert_rule(name, g, a, s)
    xr = torch.randn(2, 300, 16, 128, generator=gen, dtype=torch.float64).cuda().transpose(1, 2)
    ang = torch.rand(2, 300, 64, generator=gen, dtype=torch.float64).cuda() * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    same = ref.rotary_ref(xr.to(dtype), cos.float(), sin.float())
    assert_rule("rotary", rotary(xr.to(dtype), cos.float(), sin.float()), ref.rotary_ref(xr, cos, sin), same)


def test_trainer_selects_triton_on_cuda():
    assert kernels.select_attn_backend("cuda") == "triton"
