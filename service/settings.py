"""Serving settings: defaults < TOML file < environment (`INSTRUCTLM_*`) < flags, validated once at start.

Torch-free (the ONNX serving image has no torch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import msgspec

from model.errors import ConfigError
from service.tasks.settings import TaskSettings

ENV_PREFIX = "INSTRUCTLM_"


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A bundle (model.onnx + export_report.json) or an HF-layout checkpoint (model.safetensors + config.json).
    model: str = "runs/demo/bundle"
    # "auto": onnx for a bundle, torch for a checkpoint.
    runner: Literal["auto", "onnx", "torch"] = "auto"
    # The id /v1/models lists and requests must name; "" means the model directory's name.
    served_model_name: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    # torch runner only: "cuda" uses the Triton attention kernels when they are usable.
    device: str = "cpu"
    # Intra-op threads of torch / onnxruntime. 2 cores: more threads than cores slowed a prefill 25x.
    threads: int = 1
    # CPUs of the engine's own (service/affinity.py): "" off, "auto" (the last `threads` CPUs when one is left
    # for HTTP), or a list like "1" / "2-5,7". For dedicated machines and exclusive Kubernetes cores only.
    engine_cpus: str = ""
    # KV-cache slots = the most sequences decoding at once (vLLM's max_num_seqs).
    max_num_seqs: int = 16
    # Positions per slot; 0 means the model's context window.
    max_model_len: int = 0
    # Tokens one step may run (decode rows count 1 each, prefill chunks the rest): bounds a step's latency so
    # running streams keep getting a token while a long prompt is prefilled.
    max_num_batched_tokens: int = 256
    # Requests allowed to wait for a slot; one more gets 429 with Retry-After.
    max_waiting: int = 64
    # Seconds a request may live (queue + generation); past it the output is cut (finish_reason "length",
    # counted as failure reason "timeout"). 0: off.
    request_timeout_s: float = 600.0
    # On SIGTERM: readiness fails at once, running requests get this long to finish.
    drain_timeout_s: float = 30.0
    max_tokens_default: int = 256
    # Prefix cache: slots set aside to hold prefilled prompt prefixes (0: off), and the shortest prefix kept.
    prefix_cache_slots: int = 4
    prefix_cache_min_tokens: int = 16
    # Bearer API keys: from this environment variable (comma-separated) or file (one per line); none: no auth.
    api_keys: list[str] = msgspec.field(default_factory=list)
    api_key_file: str = ""
    max_body_bytes: int = 1_000_000
    # CORS is off unless origins are listed.
    cors_origins: list[str] = msgspec.field(default_factory=list)
    # Prompt and output text never reach the logs unless this is set.
    log_prompts: bool = False
    log_level: str = "info"
    # The task endpoints (customer service, content, translation): the `[tasks]` table.
    tasks: TaskSettings = msgspec.field(default_factory=TaskSettings)

    def __post_init__(self) -> None:
        checks = [
            ("threads", self.threads >= 1, "must be >= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_model_len", self.max_model_len >= 0, "must be >= 0 (0: the model's window)"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 16, "must be >= 16"),
            ("max_waiting", self.max_waiting >= 0, "must be >= 0"),
            ("request_timeout_s", self.request_timeout_s >= 0, "must be >= 0 (0: no timeout)"),
            ("drain_timeout_s", self.drain_timeout_s >= 0, "must be >= 0"),
            ("max_tokens_default", self.max_tokens_default >= 1, "must be >= 1"),
            ("prefix_cache_slots", self.prefix_cache_slots >= 0, "must be >= 0"),
            ("prefix_cache_min_tokens", self.prefix_cache_min_tokens >= 1, "must be >= 1"),
            ("max_body_bytes", self.max_body_bytes >= 1024, "must be >= 1024"),
            ("port", 0 <= self.port < 65536, "must be in [0, 65535]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"serve settings: {name} {why}, got {getattr(self, name)!r}")
        if self.engine_cpus.strip() not in ("", "off", "auto"):
            from service.affinity import parse_cpu_list

            parse_cpu_list(self.engine_cpus)  # the syntax now; the machine's CPUs when the server starts

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name

    def resolved_api_keys(self) -> list[str]:
        keys = [k for k in self.api_keys if k]
        if self.api_key_file:
            path = Path(self.api_key_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(f"serve settings: api_key_file {path}: {exc.strerror}") from None
            keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return keys


def _fields() -> dict[str, Any]:
    return {f.encode_name: f.type for f in msgspec.inspect.type_info(Settings).fields}


def from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """INSTRUCTLM_<FIELD> variables as raw values (lists comma-separated); unknown INSTRUCTLM_ names fail."""
    environ = os.environ if environ is None else environ
    fields = _fields()
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in fields:
            if name in ("api_key",):  # common slip: the singular
                name = "api_keys"
            else:
                continue  # other tools share the prefix (e.g. INSTRUCTLM_SETTINGS names the file)
        if isinstance(fields[name], msgspec.inspect.ListType):
            out[name] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            out[name] = value
    return out


def load_settings(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Defaults < TOML file (`path`, or $INSTRUCTLM_SETTINGS) < environment < `overrides` (flags; None = unset)."""
    from model import toml_config

    environ = os.environ if environ is None else environ
    path = path or environ.get(f"{ENV_PREFIX}SETTINGS") or None
    data: dict[str, Any] = {}
    if path is not None:
        import tomllib

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"serve settings file not found: {p}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
        source = str(p)
        # Validate the file alone first, so its own errors name the file.
        toml_config.convert(dict(data), Settings, source)
    env = from_env(environ)
    if env:
        toml_config.convert({**data, **env}, Settings, "environment (INSTRUCTLM_*)")
    data.update(env)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return toml_config.convert(data, Settings, "serve settings")
