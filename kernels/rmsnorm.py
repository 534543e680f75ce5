"""Fused residual add + RMSNorm, forward and backward.

The decoder layer computes `h = x + attn(...)` and then `rmsnorm(h)`: unfused that is three passes over the
hidden states (add, write h, read h to normalize). Here one program reads a row of x and of the residual once,
writes h (the new residual stream, rounded to the activation dtype exactly as the unfused add stores it) and
y = h / rms(h) * weight, and keeps 1/rms per row for the backward. Statistics in fp32 whatever the dtype.

Backward per row, with g = dy * w and xhat = h * rstd:
    dh = rstd * (g - xhat * mean(g * xhat)) + dh_next        (dh_next: the gradient reaching h from later on)
and dw = sum over rows of dy * xhat, accumulated per program and summed on the host (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import check_runnable, interpreting


@triton.jit
def _rmsnorm_fwd_kernel(
    X,
    RES,
    W,
    Y,
    H,
    RSTD,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    h = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(RES + row * stride_r + cols, mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=ok)
    h32 = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h32 * h32, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (h32 * rstd * w).to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY,
    DH_NEXT,
    H,
    W,
    RSTD,
    DX,
    DW_PART,
    stride_dy,
    stride_dhn,
    stride_h,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_prog,
    HAS_DH_NEXT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    # Walk the rows by advancing 64-bit pointers (the interpreter hands the loop plain Python ints).
    first = row_start.to(tl.int64)
    dy_ptr = DY + first * stride_dy
    dhn_ptr = DH_NEXT + first * stride_dhn
    h_ptr = H + first * stride_h
    dx_ptr = DX + first * stride_dx
    rstd_ptr = RSTD + first
    for _ in range(row_start, row_end):
        dy = tl.load(dy_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        xhat = h * rstd
        g = dy * w
        dh = rstd * (g - xhat * (tl.sum(g * xhat, 0) / n_cols))
        if HAS_DH_NEXT:
            dh += tl.load(dhn_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + cols, dh.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
        dy_ptr += stride_dy
        dhn_ptr += stride_dhn
        h_ptr += stride_h
        dx_ptr += stride_dx
        rstd_ptr += 1
    tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, dw, mask=ok)


def _block(n_cols: int) -> int:
    block = triton.next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"rmsnorm: hidden size {n_cols} is over the 65536 one row per program can hold")
    return block


def _num_warps(block: int, device: torch.device) -> dict:
    if device.type != "cuda" or interpreting():
        return {}
    return {"num_warps": min(max(block // 256, 1), 16)}


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape = x.shape
        n = shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        has_res = residual is not None
        r2 = residual.reshape(-1, n).contiguous() if has_res else x2
        rows = x2.shape[0]
        y = torch.empty_like(x2)
        h = torch.empty_like(x2) if has_res else x2
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        block = _block(n)
        _rmsnorm_fwd_kernel[(rows,)](
            x2, r2, weight, y, h, rstd, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), n, eps,
            HAS_RES=has_res, BLOCK=block, **_num_warps(block, x.device),
        )  # fmt: skip
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_res = has_res
        ctx.shape = shape
        if has_res:
            return y.view(shape), h.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, dh_next=None):
        h, weight, rstd = ctx.saved_tensors
        n = h.shape[1]
        rows = h.shape[0]
        dy2 = dy.reshape(-1, n).contiguous()
        has_next = dh_next is not None
        dhn2 = dh_next.reshape(-1, n).contiguous() if has_next else dy2
        dx = torch.empty_like(h)
        on_gpu = h.device.type == "cuda" and not interpreting()
        progs = min(
            rows, torch.cuda.get_device_properties(h.device).multi_processor_count * 4 if on_gpu else 4
        )
        progs = max(progs, 1)
        rows_per_prog = triton.cdiv(rows, progs)
        dw_part = torch.empty((progs, n), device=h.device, dtype=torch.float32)
        block = _block(n)
        _rmsnorm_bwd_kernel[(progs,)](
            dy2, dhn2, h, weight, rstd, dx, dw_part,
            dy2.stride(0), dhn2.stride(0), h.stride(0), dx.stride(0), rows, n, rows_per_prog,
            HAS_DH_NEXT=has_next, BLOCK=block, **_num_warps(block, h.device),
        )  # fmt: skip
        dw = dw_part.sum(0).to(weight.dtype)
        dx = dx.view(ctx.shape)
        return dx, (dx if ctx.has_res else None), dw, None


def add_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = x + residual (x itself when residual is None), y = rmsnorm(h) * weight, both in the wider of
    x's and residual's dtypes.

    x/residual [..., N], weight [N]. Differentiable in x, residual and weight.
    """
    check_runnable("x", x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rmsnorm: weight {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rmsnorm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if residual is None:
        return _AddRMSNorm.apply(x, None, weight.contiguous(), float(eps)), x
    # Under autocast the attention output is bf16 while the residual stream stays fp32: add in the wider dtype,
    # as the unfused `x + attn` does, so the residual stream never loses precision here.
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return _AddRMSNorm.apply(x.to(dtype), residual.to(dtype), weight.contiguous(), float(eps))
