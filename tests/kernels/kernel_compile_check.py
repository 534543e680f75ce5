"""Compile every Triton kernel for NVIDIA GPUs ahead of time, on a machine without one.

The interpreter runs the kernels' arithmetic but not the compiler: a construct that only the compiler rejects
(a type mismatch in a loop-carried value, a dot shape under the MMA minimum, a tile that overflows shared
memory) would first show up on the GPU. `triton.compile` with an explicit GPUTarget runs the whole pipeline down
to a cubin (ptxas ships in the triton wheel) with no driver. Must run with TRITON_INTERPRET unset, so the test
calls this file in a subprocess:

    python tests/kernels/kernel_compile_check.py [--full]

Default: bf16, head dim 128, one config per kernel, sm_90. --full: fp16/bf16 x head dims 64/128 x every autotune
config of the forward, plus fp32 with the fixed configs, for sm_80 and sm_90 (--arch picks one). Prints one line per compile; exits 1 on any failure or on a
fixed-size kernel whose shared memory exceeds the target's limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_compile_check: unset TRITON_INTERPRET (it must compile, not interpret)")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import attention, decode, rmsnorm, rotary  # noqa: E402

# Opt-in dynamic shared memory per block: A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
FLOAT_ARGS = {"qk_scale", "sm_scale", "eps"}


def _signature(fn, dtype: str, pointers: dict[str, str | None], constexprs: dict) -> dict[str, str]:
    """Pointer args named in `pointers` (None = the activation dtype), floats by name, other args i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + (pointers[name] or dtype)
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def _compile(fn, dtype, pointers, constexprs, arch, fixed, **options) -> bool:
    label = f"sm_{arch} {fn.__name__} {dtype} {constexprs} {options}"
    start = time.time()
    try:
        src = ASTSource(fn=fn, signature=_signature(fn, dtype, pointers, constexprs), constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # report every failing kernel, not only the first
        print(
            f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True
        )
        return False
    shared = kernel.metadata.shared
    over = shared > SHARED_LIMIT[arch]
    # An autotune config over the limit is pruned at run time (OutOfResources); a fixed one would fail.
    verdict = "FAIL" if over and fixed else ("skip" if over else "ok")
    print(f"{verdict} {label}: shared {shared} B, {time.time() - start:.1f}s", flush=True)
    return not (over and fixed)


ATTN_FWD = {"LSE": "fp32", "kv_index_ptr": "i32", "q_start_ptr": "i32", "q_len_ptr": "i32", "seg_ptr": "i32"}
ATTN_FWD.update({n: None for n in ("Q", "K", "V", "Out")})
ATTN_BWD = {"LSE": "fp32", "DELTA": "fp32", "seg_start_ptr": "i32", "seg_end_ptr": "i32"}
ATTN_BWD.update({n: None for n in ("Q", "K", "V", "DO", "DK", "DV", "DQ")})
DECODE = {n: None for n in ("Q", "K", "V")} | {
    "PART_O": "fp32",
    "PART_LSE": "fp32",
    "slots_ptr": "i32",
    "ctx_len_ptr": "i32",
}
MERGE = {"PART_O": "fp32", "PART_LSE": "fp32", "Out": None}
NORM_F = {n: None for n in ("X", "RES", "W", "Y", "H")} | {"RSTD": "fp32"}
NORM_B = {n: None for n in ("DY", "DH_NEXT", "H", "W", "DX")} | {"RSTD": "fp32", "DW_PART": "fp32"}
ROT = {"X": None, "Y": None, "COS": "fp32", "SIN": "fp32"}


def _attention_set(arch: int, dtype: str, d: int, all_configs: bool) -> bool:
    ieee = dtype == "fp32"
    ok = True
    configs = [(128, 64, 8, 3, False)]
    if all_configs:
        configs = [
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, False)
            for c in attention._FWD_CONFIGS
        ]
    if ieee:
        configs = []  # fp32 (IEEE dots) checks the fixed config only: one forward took 2 minutes to compile
    configs.append((64, 64, 4, 3, True))  # the INSTRUCTLM_TRITON_AUTOTUNE=0 config
    for bm, bn, warps, stages, fixed in configs:
        cx = dict(GROUP=2, HEAD_DIM=d, HAS_SEG=True, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn)
        ok &= _compile(
            attention._attn_fwd_kernel, dtype, ATTN_FWD, cx, arch, fixed, num_warps=warps, num_stages=stages
        )
    cx = dict(GROUP=2, HEAD_DIM=d, IEEE=ieee, BLOCK_M=64, BLOCK_N=64)
    for fn in (attention._attn_bwd_dkdv_kernel, attention._attn_bwd_dq_kernel):
        ok &= _compile(fn, dtype, ATTN_BWD, cx, arch, True, num_warps=4 if d <= 64 else 8, num_stages=2)
    cx = dict(GROUP=4, BLOCK_H=16, HEAD_DIM=d, NUM_SPLITS=8, IEEE=ieee, BLOCK_N=64)
    ok &= _compile(decode._decode_split_kernel, dtype, DECODE, cx, arch, True, num_warps=4, num_stages=2)
    ok &= _compile(
        decode._decode_merge_kernel, dtype, MERGE, dict(HEAD_DIM=d, NUM_SPLITS=8, BLOCK_S=8), arch, True
    )
    cx = dict(HALF=d // 2, BLOCK_HALF=d // 2, BLOCK_H=16, BACKWARD=True)
    ok &= _compile(rotary._rotary_kernel, dtype, ROT, cx, arch, True)
    return ok


def _norm_set(arch: int, dtype: str) -> bool:
    ok = _compile(
        rmsnorm._rmsnorm_fwd_kernel, dtype, NORM_F, dict(HAS_RES=True, BLOCK=2048), arch, True, num_warps=8
    )
    cx = dict(HAS_DH_NEXT=True, BLOCK=2048)
    return ok & _compile(rmsnorm._rmsnorm_bwd_kernel, dtype, NORM_B, cx, arch, True, num_warps=8)


def run(full: bool, archs: tuple[int, ...]) -> bool:
    """Default: bf16, head dim 128, one forward config. Full: fp16/bf16 x head dims 64/128 x every autotune config,
    plus fp32 (IEEE dots) at head dim 64 with the fixed configs: an fp32 forward took 2 minutes to compile."""
    if not full:
        return all([_attention_set(a, "bf16", 128, False) & _norm_set(a, "bf16") for a in archs])
    ok = True
    for arch in archs:
        for dtype in ("fp16", "bf16"):
            for d in (64, 128):
                ok &= _attention_set(arch, dtype, d, True)
            ok &= _norm_set(arch, dtype)
        ok &= _attention_set(arch, "fp32", 64, False) & _norm_set(arch, "fp32")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every dtype, head dim and autotune config")
    parser.add_argument(
        "--arch",
        type=int,
        action="append",
        choices=sorted(SHARED_LIMIT),
        help="default: 90 (--full: 80 and 90)",
    )
    args = parser.parse_args()
    archs = tuple(args.arch or ((80, 90) if args.full else (90,)))
    sys.exit(0 if run(args.full, archs) else 1)
