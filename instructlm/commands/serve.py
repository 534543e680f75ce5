"""`instructlm serve --model BUNDLE_OR_CHECKPOINT`: the OpenAI-compatible server under gunicorn, one uvicorn worker.

One worker on purpose: one engine per process holds one copy of the model and batches every request together;
N workers would mean N model copies and split batches. Scale with pods.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a bundle or checkpoint over an OpenAI-compatible HTTP API",
        description="Settings: defaults < --config TOML (or $INSTRUCTLM_SETTINGS) < INSTRUCTLM_* environment < flags.",
    )
    p.add_argument(
        "--model", help="bundle (model.onnx + export_report.json) or HF-layout checkpoint directory"
    )
    p.add_argument(
        "--runner", choices=["auto", "onnx", "torch"], help="auto: onnx for a bundle, torch for a checkpoint"
    )
    p.add_argument("--config", help="serve settings TOML (configs/serve/*.toml)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--served-model-name", dest="served_model_name")
    p.add_argument("--device", help="torch runner: cpu or cuda")
    p.add_argument("--threads", type=int, help="intra-op threads of the runner")
    p.add_argument(
        "--engine-cpus",
        dest="engine_cpus",
        help="CPUs of the engine's own, the rest serve HTTP: auto, off, or a list like 1 or 2-5,7 (default off)",
    )
    p.add_argument(
        "--max-num-seqs", dest="max_num_seqs", type=int, help="KV-cache slots (concurrent sequences)"
    )
    p.add_argument(
        "--max-model-len", dest="max_model_len", type=int, help="positions per slot (0: the model's)"
    )
    p.add_argument("--log-level", dest="log_level")
    p.add_argument("--check", action="store_true", help="validate the settings and the model path, then exit")
    p.set_defaults(func=run)


FLAG_FIELDS = (
    "model",
    "runner",
    "host",
    "port",
    "served_model_name",
    "device",
    "threads",
    "engine_cpus",
    "max_num_seqs",
    "max_model_len",
    "log_level",
)


def run(args: argparse.Namespace) -> int:
    from service.runners.base import model_kind
    from service.settings import load_settings

    settings = load_settings(args.config, {k: getattr(args, k) for k in FLAG_FIELDS})
    kind = model_kind(settings.model)
    settings.resolved_api_keys()  # a missing key file fails here, before the server starts
    from service.affinity import cpu_plan

    plan = cpu_plan(settings.engine_cpus, settings.threads)  # CPUs this machine lacks fail here too
    if args.check:
        pinned = f", engine on CPUs {sorted(plan[0])}, HTTP on {sorted(plan[1])}" if plan else ""
        print(
            f"settings ok: {kind} {settings.model}, runner {settings.runner}, {settings.host}:{settings.port}"
            + pinned
        )
        return 0
    from service.gunicorn_app import serve

    return serve(settings)
