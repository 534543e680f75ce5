"""Fused add+RMSNorm and rotary embedding, forward and backward, against the pure-torch references."""

from __future__ import annotations

import pytest
import torch
from kernel_rule import assert_rule

from kernels import reference as ref
from kernels.rmsnorm import add_rmsnorm
from kernels.rotary import rotary

DTYPES = [torch.float32, torch.float16]


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 100, 768])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm(dtype, hidden, with_residual, device):
    gen = torch.Generator().manual_seed(hidden)
    base = [
        torch.randn(
            3, 7, hidden, generator=gen, dtype=torch.float64
        ),  # x (odd row count: 21 rows, 4 programs)
        torch.randn(3, 7, hidden, generator=gen, dtype=torch.float64),  # residual
        1 + 0.1 * torch.randn(hidden, generator=gen, dtype=torch.float64),  # weight
    ]
    base = [t.to(device) for t in base]
    dy = torch.randn(3, 7, hidden, generator=gen, dtype=torch.float64).to(device)
    dh = torch.randn(3, 7, hidden, generator=gen, dtype=torch.float64).to(device)

    def run(fn, dtype):
        x, r, w = _leaves(base, dtype)
        y, h = fn(x, w, 1e-5, r if with_residual else None)
        loss = (y.double() * dy).sum()
        if with_residual:  # h is the residual stream: it gets its own gradient from the layers after it
            loss = loss + (h.double() * dh).sum()
        loss.backward()
        return [y.detach(), h.detach(), x.grad, w.grad] + ([r.grad] if with_residual else [])

    want64 = run(ref.add_rmsnorm_ref, torch.float64)
    same = run(ref.add_rmsnorm_ref, dtype)
    got = run(add_rmsnorm, dtype)
    for name, g, w64, s in zip(("y", "h", "dx", "dweight", "dresidual"), got, want64, same, strict=False):
        assert g.dtype == dtype
        assert_rule(name, g, w64, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "head_dim"), [(4, 32), (2, 64), (20, 16)])
def test_rotary(dtype, heads, head_dim, device):
    """x as the model makes it ([B,S,H,D] transposed to [B,H,S,D]); 20 heads spill into a second head block."""
    gen = torch.Generator().manual_seed(heads * head_dim)
    b, s = 2, 9
    x64 = torch.randn(b, s, heads, head_dim, generator=gen, dtype=torch.float64).to(device).transpose(1, 2)
    positions = torch.randint(0, 500, (b, s), generator=gen).to(device)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = positions[..., None].double() * inv_freq  # [B, S, D/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # model layout [B, S, D]
    dy = torch.randn(b, heads, s, head_dim, generator=gen, dtype=torch.float64).to(device)

    def run(fn, dtype):
        (x,) = _leaves([x64], dtype)
        y = fn(
            x, cos.float() if dtype != torch.float64 else cos, sin.float() if dtype != torch.float64 else sin
        )
        (y.double() * dy).sum().backward()
        return y.detach(), x.grad

    want64, same, got = run(ref.rotary_ref, torch.float64), run(ref.rotary_ref, dtype), run(rotary, dtype)
    assert got[0].stride() == x64.stride(), "output keeps the transposed layout"
    assert_rule("rotary", got[0], want64[0], same[0])
    assert_rule("rotary grad", got[1], want64[1], same[1])


def test_add_rmsnorm_keeps_a_wider_residual_stream(device):
    """Autocast: attention output in half precision, residual stream in fp32 -> h and y stay fp32."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 64, generator=gen).to(device)
    a = torch.randn(5, 64, generator=gen).to(device).half()
    w = torch.ones(64, device=device)
    y, h = add_rmsnorm(a, w, 1e-5, residual=x)
    assert h.dtype == y.dtype == torch.float32
    torch.testing.assert_close(h, x + a.float(), rtol=0, atol=0)
    want, _ = ref.add_rmsnorm_ref(x.double() + a.double(), w.double(), 1e-5)
    same, _ = ref.add_rmsnorm_ref(x + a.float(), w, 1e-5)
    assert_rule("y", y, want, same)


def test_norm_and_rotary_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        add_rmsnorm(torch.randn(2, 8), torch.ones(8), 1e-5, torch.randn(2, 9))
    with pytest.raises(ValueError, match="cos/sin"):
        rotary(torch.randn(1, 2, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8))
