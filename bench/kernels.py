"""Triton kernels vs torch SDPA (flash backend), measured in the same run on one CUDA GPU.

    PYTHONPATH=. python bench/kernels.py [--quick] [--max-seq 16384]

Prefill: causal attention at 16k tokens per batch (batch = 16384 / seq), hidden 2048 (32 heads of 64 or 16 of
128), fp16 and bf16, forward and backward (timed apart), in TFLOP/s (causal forward = 2 * B * H * S^2 * D flops,
backward = 2.5x forward, the FlashAttention papers' convention). Decode: one token per row for 8 rows,
32 query heads over 8 KV heads (GQA 4), head dim 128, in microseconds per call; the SDPA baseline gets the
same cache rows gathered contiguous (what a gather-based runner pays is not counted against it).
Without CUDA it says so and exits 0: CI has no GPU.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys

import torch


def _machine() -> str:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (
        f"{gpu}; torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}"
    )


def _sdpa_flash(q, k, v, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _prefill_case(dtype, d: int, s: int) -> str:
    from triton.testing import do_bench

    from kernels.attention import attention_packed

    b, h = max(1, 16384 // s), 2048 // d
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    pos = torch.arange(s, device="cuda").expand(b, s).contiguous()
    do = torch.randn_like(q)
    fwd_flops = 2 * b * h * s * s * d  # causal: half of 4 * B*H*S^2*D
    impls = {"triton": lambda: attention_packed(q, k, v, pos), "sdpa": lambda: _sdpa_flash(q, k, v, True)}
    err = (impls["triton"]() - impls["sdpa"]()).abs().max().item()
    res = {}
    for name, fn in impls.items():
        ms_f = do_bench(fn)
        out = fn()
        ms_b = do_bench(lambda out=out: out.backward(do, retain_graph=True), grad_to_none=[q, k, v])
        res[name] = (fwd_flops / ms_f * 1e-9, 2.5 * fwd_flops / ms_b * 1e-9)
    t, sd = res["triton"], res["sdpa"]
    return (
        f"| prefill | {str(dtype)[6:]} | {d} | {s} | {b}x{h} | {t[0]:.1f} | {sd[0]:.1f} | "
        f"{t[0] / sd[0]:.2f}x | {t[1]:.1f} | {sd[1]:.1f} | {t[1] / sd[1]:.2f}x | {err:.1e} |"
    )


def _decode_case(dtype, ctx: int) -> str:
    from triton.testing import do_bench

    from kernels.decode import decode_attention, default_num_splits

    b, h, kv, d = 8, 32, 8, 128
    k_cache = torch.randn(b, kv, ctx, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(b, h, d, device="cuda", dtype=dtype)
    slots = torch.arange(b, device="cuda")
    lengths = torch.full((b,), ctx, device="cuda")
    # SDPA gets full-head K/V already laid out [B, H, ctx, D]: its best case, no gather or mask.
    k_full = k_cache.repeat_interleave(h // kv, dim=1)
    v_full = v_cache.repeat_interleave(h // kv, dim=1)

    def tri():
        return decode_attention(q, k_cache, v_cache, slots, lengths)

    def sdp():
        return _sdpa_flash(q[:, :, None], k_full, v_full, False)

    err = (tri() - sdp()[:, :, 0]).abs().max().item()
    us_t, us_s = do_bench(tri) * 1e3, do_bench(sdp) * 1e3
    splits = default_num_splits(b, kv, ctx, q.device)
    return (
        f"| decode | {str(dtype)[6:]} | {d} | {ctx} | {b} rows, {splits} splits | {us_t:.1f} us | "
        f"{us_s:.1f} us | {us_s / us_t:.2f}x | | | | {err:.1e} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fp16 and bf16 at head dim 128, 2k and 8k only")
    parser.add_argument(
        "--max-seq", type=int, default=16384, help="longest prefill sequence / decode context"
    )
    args = parser.parse_args(argv)
    print("command:", "PYTHONPATH=. python", shlex.join(["bench/kernels.py", *(argv or sys.argv[1:])]))
    if not torch.cuda.is_available():
        print(f"machine: {platform.node()} ({platform.machine()}), no CUDA device: nothing measured.")
        return 0
    torch.manual_seed(0)
    print("machine:", _machine())
    dtypes = [torch.float16, torch.bfloat16]
    seqs = [s for s in (512, 1024, 2048, 4096, 8192, 16384) if s <= args.max_seq]
    head_dims = [64, 128]
    contexts = [c for c in (1024, 4096, 8192, 16384) if c <= args.max_seq]
    if args.quick:
        seqs, head_dims, contexts = [s for s in (2048, 8192) if s <= args.max_seq], [128], [4096]
    rows = [
        "| kernel | dtype | head dim | seq / context | batch | triton fwd | sdpa fwd | ratio | triton bwd "
        "| sdpa bwd | ratio | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    # Decode first: it is quick, so a run cut short by a time limit still has it.
    for dtype in dtypes:
        for ctx in contexts:
            rows.append(_decode_case(dtype, ctx))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    for dtype in dtypes:
        for d in head_dims:
            for s in seqs:
                rows.append(_prefill_case(dtype, d, s))
                print(rows[-1], flush=True)
                torch.cuda.empty_cache()
    print(
        "\nPrefill columns are TFLOP/s (higher is better); decode columns are microseconds per call and the ratio"
    )
    print("is sdpa time / triton time (above 1: triton faster).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
