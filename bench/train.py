"""Training throughput: our Transformer vs transformers.LlamaForCausalLM, same config, weights, batch and optimizer.

One training step = forward, cross-entropy, backward, AdamW step (fp32 on the CPU; bf16 autocast on CUDA, our
model with the attention backend `kernels.select_attn_backend` picks). Prints the machine, the command, tokens/s,
an MFU estimate and ours/transformers ratios, all measured in this run.

MFU: model FLOPs per token = 6 * N (N = parameters of the matmuls, the tied LM head counted once as a matmul) +
12 * layers * hidden * seq (attention scores and values, forward + backward), over a peak. On CUDA the peak is the
GPU's nominal dense bf16 figure when known (--peak-tflops overrides); on the CPU it is the fp32 matmul rate this
process reaches on a 2048^3 matmul with the same threads (so "MFU" there is "fraction of this CPU's GEMM speed").

  PYTHONPATH=. python bench/train.py --presets tiny demo --threads 1
  PYTHONPATH=. python bench/train.py --device cuda --presets demo small --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# Nominal dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' datasheets.
NOMINAL_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    s = (
        f"{platform.node()} | {cpu} | {os.cpu_count()} CPUs | Python {platform.python_version()} | "
        f"torch {torch.__version__} | threads {torch.get_num_threads()}"
    )
    if device.type == "cuda":
        s += f" | {torch.cuda.get_device_name(device)}"
    return s


def model_flops_per_token(config, seq: int) -> float:
    h, i, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    matmul_params = L * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v  # LM head once
    return 6 * matmul_params + 12 * L * h * seq


def cpu_peak_flops(seconds: float = 1.0) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - t0)


def hf_model(ours, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.checkpoint import state_dict_hf

    hf_cfg = LlamaConfig(**{k: v for k, v in ours.config.to_hf_dict().items() if k not in ("architectures",)})
    hf_cfg._attn_implementation = "sdpa"
    m = LlamaForCausalLM(hf_cfg)
    missing, unexpected = m.load_state_dict(state_dict_hf(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return m.to(device).train()


def step_fn(kind: str, model, opt, ids, pos, labels, autocast):
    def step():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, pos) if kind == "ours" else model(input_ids=ids, position_ids=pos).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def time_interleaved(steps: dict, n: int, warmup: int, device) -> dict[str, list[float]]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        for step in steps.values():
            step()
    sync()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(n):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=0, help="override the preset's vocabulary size")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU (default: see the docstring)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from model.config import preset
    from model.transformer import Transformer

    print(f"machine: {machine(device)}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    autocast = device.type == "cuda"
    if args.peak_tflops:
        peak, peak_src = args.peak_tflops * 1e12, "given"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        nominal = next((v for k, v in NOMINAL_BF16.items() if k in name), None)
        peak, peak_src = (
            (nominal * 1e12, f"nominal bf16 {nominal:.0f} TFLOP/s") if nominal else (0.0, "unknown")
        )
    else:
        peak = cpu_peak_flops()
        peak_src = f"measured fp32 GEMM {peak / 1e9:.1f} GFLOP/s"
    print(
        f"batch {args.batch} x seq {args.seq}, {args.steps} timed steps after {args.warmup}; MFU peak: {peak_src}"
    )
    print()
    print(
        "| preset | params | ours tok/s | transformers tok/s | ours / transformers | ours MFU | transformers MFU |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.presets:
        overrides = {"vocab_size": args.vocab} if args.vocab else {}
        config = preset(name, **overrides)
        seq = min(args.seq, config.max_position_embeddings)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (args.batch, seq + 1), generator=g)
        inp, labels = ids[:, :-1].to(device), ids[:, 1:].to(device)
        pos = torch.arange(seq).expand(args.batch, seq).to(device)
        ours = Transformer(config)
        ours.init_weights(0)
        theirs = hf_model(ours, device)
        if device.type == "cuda":
            from kernels import select_attn_backend

            ours.set_attn_backend(select_attn_backend(device))
        ours = ours.to(device).train()
        steps = {}
        for kind, model in (("ours", ours), ("transformers", theirs)):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            steps[kind] = step_fn(kind, model, opt, inp, pos, labels, autocast)
        # Interleaved, one step of each in turn, so a busy machine's load drifts hit both alike.
        times = time_interleaved(steps, args.steps, args.warmup, device)
        results = {k: args.batch * seq / statistics.median(t) for k, t in times.items()}
        fpt = model_flops_per_token(config, seq)
        mfu = {k: (v * fpt / peak if peak else float("nan")) for k, v in results.items()}
        print(
            f"| {name} | {config.num_parameters() / 1e6:.2f}M | {results['ours']:,.0f} | {results['transformers']:,.0f} "
            f"| {results['ours'] / results['transformers']:.2f}x | {mfu['ours']:.1%} | {mfu['transformers']:.1%} |"
        )
        del ours, theirs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
