"""`instructlm export onnx|gguf`: a checkpoint as an ONNX bundle (what the CPU service runs) or a GGUF file
(llama.cpp and the tools built on it). Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export a checkpoint to an ONNX bundle or a GGUF file")
    verbs = parser.add_subparsers(dest="export_command", metavar="FORMAT")
    verbs.required = True

    onnx = verbs.add_parser(
        "onnx",
        help="served ONNX graph (+ int8) and optimum-layout graph, with a parity report",
        description="Write a bundle: model.onnx (served graph, optimized), optional model.int8.onnx, "
        "optimum/model.onnx, config and tokenizer files, export_report.json with parity against PyTorch.",
    )
    onnx.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (HF Llama layout, with tokenizer)"
    )
    onnx.add_argument("--out", required=True, help="bundle directory to write")
    onnx.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    onnx.add_argument(
        "--quantize", choices=["int8"], help="also write model.int8.onnx (dynamic int8 MatMuls)"
    )
    onnx.add_argument(
        "--val-data",
        help="JSONL split (records with text or messages) or text file: perplexity fp32 vs int8 in the report",
    )
    onnx.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1)")
    onnx.add_argument(
        "--attention",
        choices=["auto", "slot", "gather"],
        default="auto",
        help="served graph's attention: slot (the SlotAttention op reading the cache in place; its library "
        "is built by `make install` / `python -m export.custom_ops build`), gather (standard ONNX ops only), "
        "auto (slot when the library is built; default)",
    )
    onnx.set_defaults(func=run_onnx)

    gguf = verbs.add_parser(
        "gguf",
        help="GGUF file for llama.cpp (f32, f16 or q8_0)",
        description="Write one GGUF file: llama metadata, the BPE vocabulary and merges, the chat template, "
        "and the weights under llama.cpp's names.",
    )
    gguf.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (HF Llama layout, with tokenizer)"
    )
    gguf.add_argument("--out", required=True, help="GGUF file to write")
    gguf.add_argument(
        "--type", choices=["f32", "f16", "q8_0"], default="f16", help="weight type (default f16)"
    )
    gguf.add_argument("--force", action="store_true", help="replace an existing file at --out")
    gguf.set_defaults(func=run_gguf)


def run_onnx(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from export.onnx_export import export_bundle

    bar = None

    def say(msg: str, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="export onnx", unit="stage", file=sys.stderr)
        else:
            bar.update(1)
        bar.set_postfix_str(msg)

    try:
        report = export_bundle(
            args.checkpoint,
            args.out,
            force=args.force,
            quantize=args.quantize,
            val_data=args.val_data,
            threads=args.threads,
            progress=say,
            attention=args.attention,
        )
    finally:
        if bar is not None:
            bar.update(bar.total - bar.n)
            bar.close()
    for name, entry in report["files"].items():
        p = entry["parity"]
        worst = max(v for k, v in p.items() if k.endswith("_max_abs"))
        greedy = "" if "greedy_identical" not in p else f", greedy 64 identical: {p['greedy_identical']}"
        print(f"{name:22s} {entry['bytes'] / 2**20:8.2f} MiB  max |diff| vs PyTorch {worst:.2e}{greedy}")
    if "int8" in report and "perplexity_rel_change" in report["int8"]:
        q = report["int8"]
        print(
            f"int8 perplexity {q['perplexity_int8']:.3f} vs fp32 {q['perplexity_fp32']:.3f} "
            f"({q['perplexity_rel_change']:+.2%})"
        )
    print(f"served graph attention: {report['served_graph']['attention']}")
    print(f"wrote {args.out} (report: {args.out}/export_report.json)")
    if not report["passed"]:
        print("export onnx: parity check FAILED for an fp32 file; see export_report.json", file=sys.stderr)
        return 1
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    from export.gguf_export import export_gguf

    info = export_gguf(args.checkpoint, args.out, weight_type=args.type, force=args.force)
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['bytes'] / 2**20:.2f} MiB, type {args.type}")
    return 0
