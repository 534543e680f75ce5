"""Fused half-split rotary embedding (`rotate_half` layout), forward and backward.

Unfused, `x * cos + rotate_half(x) * sin` makes four temporaries of x's size (two halves concatenated, two
products). One program here rotates every head of one token in registers: it reads x and the token's
cos/sin once and writes the result once. The rotation is orthogonal, so the backward is the same kernel
with sin negated. Works on any strides, so the model's transposed [B,H,S,D] views need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import check_runnable


@triton.jit
def _rotary_kernel(
    X,
    Y,
    COS,
    SIN,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_xd,
    stride_yb,
    stride_yh,
    stride_ys,
    stride_yd,
    stride_cb,
    stride_cs,
    stride_cd,
    seq,
    n_heads,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // seq).to(tl.int64)
    s = (pid % seq).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    c = tl.load(COS + b * stride_cb + s * stride_cs + offs_d * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
    sn = tl.load(SIN + b * stride_cb + s * stride_cs + offs_d * stride_cd, mask=d_ok, other=0.0).to(
        tl.float32
    )
    if BACKWARD:
        sn = -sn
    ok = (offs_h[:, None] < n_heads) & d_ok[None, :]
    x_base = X + b * stride_xb + s * stride_xs + offs_h[:, None] * stride_xh
    x1 = tl.load(x_base + offs_d[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + (offs_d[None, :] + HALF) * stride_xd, mask=ok, other=0.0).to(tl.float32)
    y1 = x1 * c[None, :] - x2 * sn[None, :]
    y2 = x2 * c[None, :] + x1 * sn[None, :]
    y_base = Y + b * stride_yb + s * stride_ys + offs_h[:, None] * stride_yh
    tl.store(y_base + offs_d[None, :] * stride_yd, y1.to(Y.dtype.element_ty), mask=ok)
    tl.store(y_base + (offs_d[None, :] + HALF) * stride_yd, y2.to(Y.dtype.element_ty), mask=ok)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    b, h, s, d = x.shape
    y = torch.empty_like(x)  # keeps a transposed view's strides
    half = d // 2
    block_h = min(triton.next_power_of_2(h), 16)
    _rotary_kernel[(b * s, triton.cdiv(h, block_h))](
        x, y, cos, sin, *x.stride(), *y.stride(), *cos.stride(), s, h,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=block_h, BACKWARD=backward,
    )  # fmt: skip
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,H,S,D] (any strides); cos/sin [B,S,D] (the model's gathered tables, halves equal) or [B,S,D/2].

    Returns the rotated x (same dtype and layout), differentiable in x.
    """
    check_runnable("x", x)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rotary expects x [B,H,S,D] with even D, got {tuple(x.shape)}")
    b, _, s, d = x.shape
    if cos.shape != sin.shape or cos.shape[:2] != (b, s) or cos.shape[-1] not in (d, d // 2):
        raise ValueError(
            f"rotary: cos/sin {tuple(cos.shape)} do not match x {tuple(x.shape)} ([B,S,D] or [B,S,D/2])"
        )
    return _Rotary.apply(x, cos, sin)
