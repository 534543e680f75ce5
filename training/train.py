"""The training loop: `instructlm train --config configs/train/demo.toml`, stages `pretrain` then `sft`.

One step = one global batch of `world * grad_accum * batch_size` packed rows. Every rank draws the same row stream
and keeps rows rank::world, so the data cursor does not depend on the world size's sharding and one process with
grad_accum * world micro-batches sees exactly the rows a multi-process run does. The loss is the sum of token
losses divided by the label-token count of the whole global batch (all-reduced), so micro-batches and ranks with
few label tokens weigh what their tokens weigh, not what their row count weighs (the mean-of-means bug).

Non-finite loss or gradient: the step is skipped (no update, the data is consumed), counted and logged, and the run
stops after `run.max_nonfinite` in a row. SIGTERM (or Ctrl-C): the current step finishes, a checkpoint is written,
the process exits 0; the same command resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, preset
from model.errors import CheckpointError, ConfigError, UserError
from model.tokenizer import Tokenizer
from training import checkpointing as ckpt
from training import distributed as D
from training import tokens as T
from training.lora import LoraSettings

log = logging.getLogger("instructlm.train")

Stage = Literal["pretrain", "sft"]


# -------------------------------------------------------------------------------------------------- config


class ModelSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    preset: str = "demo"
    # Shape fields over the preset (ModelConfig names); vocab_size and special ids come from the tokenizer.
    overrides: dict[str, int | float | bool] = {}
    # An HF-layout checkpoint to start the first stage from; its config must match the requested model.
    init_from: str = ""
    # "auto": Triton kernels on CUDA when installed (kernels.select_attn_backend), SDPA otherwise.
    attn_backend: Literal["auto", "sdpa", "triton"] = "auto"


class DataSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dataset: str = "runs/demo/dataset"
    tokenizer: str = "runs/demo/tokenizer"
    # Packed row length. 256 holds most demo chats whole (median about 90 tokens) at a quarter of the
    # attention cost of 512 on the CPU.
    seq_len: int = 256
    # Pretraining reads text records and, when true, every chat rendered in the chat format with loss on all
    # tokens (the demo dataset is nearly all chats).
    pretrain_include_chat: bool = True
    # Validation rows evaluated (packed, in file order); bounds the eval time.
    val_max_rows: int = 64


class StageSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    steps: int = 100
    batch_size: int = 8  # rows per micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 10
    eval_every: int = 0  # 0: at the end only
    checkpoint_every: int = 50
    # Wall-clock cap for this stage in seconds (0 = none): the stage ends early at the first step past it, with a
    # final evaluation and checkpoint, and says so. Guarantees `make demo`'s time on a slow or busy machine; the
    # learning rate has then not finished its decay, so a capped run is not comparable step for step.
    max_seconds: float = 0.0


class OptimSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    weight_decay: float = 0.1  # on matrices only: norms' gains are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still measured and logged)


class RunSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = torch's default (which follows OMP_NUM_THREADS)
    compile: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"
    max_nonfinite: int = 5  # consecutive skipped steps before the run stops
    log_every: int = 10
    keep_last: int = 2
    tensorboard: bool = True  # when the tensorboard package is installed
    plots: bool = True  # curves.png per stage (matplotlib's import costs about 2 s)
    samples_per_task: int = 1
    sample_tokens: int = 48


class TrainConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    out_dir: str = "runs/demo"
    stages: list[Stage] = msgspec.field(default_factory=lambda: ["pretrain", "sft"])
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    data: DataSection = msgspec.field(default_factory=DataSection)
    pretrain: StageSection = msgspec.field(default_factory=StageSection)
    sft: StageSection = msgspec.field(default_factory=StageSection)
    optim: OptimSection = msgspec.field(default_factory=OptimSection)
    run: RunSection = msgspec.field(default_factory=RunSection)
    # LoRA (training/lora.py): each stage trains adapters only and merges them into its final checkpoint.
    lora: LoraSettings | None = None


# Keys that may change between a run and its resume (they do not change the numbers).
RESUME_FREE = {
    "run.log_every",
    "run.tensorboard",
    "run.plots",
    "run.samples_per_task",
    "run.sample_tokens",
    "run.threads",
}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    from model.toml_config import load

    cfg = load(path, TrainConfig, overrides)
    check_config(cfg, str(path))
    return cfg


def check_config(cfg: TrainConfig, source: str) -> None:
    if not cfg.stages:
        raise ConfigError(f"{source}: 'stages' is empty; use ['pretrain'], ['sft'] or ['pretrain', 'sft']")
    if len(set(cfg.stages)) != len(cfg.stages):
        raise ConfigError(f"{source}: 'stages' lists a stage twice: {cfg.stages}")
    for name in cfg.stages:
        s: StageSection = getattr(cfg, name)
        for key in ("steps", "batch_size", "grad_accum"):
            if getattr(s, key) < 1:
                raise ConfigError(f"{source}: {name}.{key} must be >= 1, got {getattr(s, key)}")
        if not (s.lr > 0 and math.isfinite(s.lr)):
            raise ConfigError(f"{source}: {name}.lr must be a positive number, got {s.lr}")
        if not 0 <= s.min_lr_ratio <= 1:
            raise ConfigError(f"{source}: {name}.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        if s.checkpoint_every < 1:
            raise ConfigError(f"{source}: {name}.checkpoint_every must be >= 1, got {s.checkpoint_every}")
    if cfg.data.seq_len < 2:
        raise ConfigError(f"{source}: data.seq_len must be >= 2, got {cfg.data.seq_len}")
    if cfg.lora is not None:
        cfg.lora.validate(f"{source}: lora")
    if cfg.run.max_nonfinite < 1:
        raise ConfigError(f"{source}: run.max_nonfinite must be >= 1, got {cfg.run.max_nonfinite}")


def flat_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat_dict(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flat_dict(old), flat_dict(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in RESUME_FREE and a.get(k) != b.get(k)
    ]


def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    overrides = dict(cfg.model.overrides)
    fixed = {"vocab_size", "eos_token_id", "pad_token_id", "bos_token_id"}
    if fixed & set(overrides):
        raise ConfigError(
            f"model.overrides: {sorted(fixed & set(overrides))} come from the tokenizer; remove them"
        )
    known = set(ModelConfig.__dataclass_fields__) - {"extra"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.overrides: unknown field '{unknown[0]}'{hint}")
    config = preset(
        cfg.model.preset,
        **overrides,
        vocab_size=tokenizer.vocab_size,
        eos_token_id=[tokenizer.eos_id, tokenizer.endoftext_id],
        pad_token_id=tokenizer.pad_id,
    )
    if cfg.data.seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    return config


# ---------------------------------------------------------------------------------------------- the step


def lr_at(step: int, s: StageSection, time_fraction: float = 0.0) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at the last step.

    With a max_seconds cap, progress is the larger of the step fraction and the elapsed-time fraction, so a slow
    machine still warms up and decays fully within its time; when time does not bind, this is the step schedule."""
    warm = s.warmup_steps / s.steps
    p = max(step / s.steps, min(time_fraction, 1.0))
    if p < warm:
        return s.lr * max((step + 1) / s.warmup_steps, p / warm)
    min_lr = s.lr * s.min_lr_ratio
    progress = (p - warm) / max(1e-12, 1 - warm)
    return min_lr + 0.5 * (s.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear weights, embedding), not vectors (RMSNorm gains)."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, o: OptimSection, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=lr, betas=(o.beta1, o.beta2), eps=o.eps)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, position_ids, labels: [B, S] each


def to_batch(rows: Sequence[T.Row], device: torch.device) -> Batch:
    ids, pos, labels = T.stack_rows(rows)
    return tuple(torch.from_numpy(a).to(device, non_blocking=True) for a in (ids, pos, labels))  # type: ignore[return-value]


def loss_sum(model: nn.Module, batch: Batch, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Sum of token cross-entropies over labelled positions (fp32)."""
    ids, pos, labels = batch
    with torch.autocast(ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(ids, pos)
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=T.IGNORE, reduction="sum"
    )


@dataclass
class StepResult:
    loss: float  # mean token loss over the global batch
    label_tokens: int  # global
    grad_norm: float
    applied: bool
    local_label_tokens: int = 0  # this rank's share


def accumulate(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    info: D.DistInfo,
    strategy: str = "ddp",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Backward over this rank's micro-batches; gradients end up as d(global mean token loss)/dw on every rank.
    Returns (global mean loss, global label-token count)."""
    local = sum(int((b[2] != T.IGNORE).sum()) for b in micro_batches)
    total = int(info.all_reduce_sum(local))
    # DDP and FSDP2 average gradients over ranks; scaling by world turns that average into the sum the global
    # token mean needs. An all-padding global batch (total 0) contributes zero gradient.
    scale = info.world_size / max(total, 1)
    local_loss = 0.0
    for j, batch in enumerate(micro_batches):
        with D.grad_sync(model, info, strategy, sync=j == len(micro_batches) - 1):
            ls = loss_sum(model, batch, autocast_dtype)
            (ls * scale).backward()
        local_loss += float(ls.detach())
    return info.all_reduce_sum(local_loss) / max(total, 1), total


def grad_norm_and_clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    info: D.DistInfo,
    o: OptimSection,
    lr: float,
    strategy: str = "ddp",
    autocast_dtype: torch.dtype | None = None,
) -> StepResult:
    for g in optimizer.param_groups:
        g["lr"] = lr
    loss, count = accumulate(model, micro_batches, info, strategy, autocast_dtype)
    norm = grad_norm_and_clip(model, o.grad_clip)
    applied = math.isfinite(loss) and math.isfinite(norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    local = sum(int((b[2] != T.IGNORE).sum()) for b in micro_batches)
    return StepResult(loss, count, norm, applied, local)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    rows: Sequence[T.Row],
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean token loss over `rows` (every rank evaluates all of them: FSDP needs every rank in each forward)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = to_batch(rows[i : i + batch_size], device)
        total += float(loss_sum(model, batch, autocast_dtype))
        count += int((batch[2] != T.IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def unigram_loss(train_labels: np.ndarray, val_labels: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy of the add-one-smoothed unigram distribution of the training targets on validation targets:
    the loss of a model that ignores context. A trained model must be clearly below it."""
    counts = (
        np.bincount(train_labels[train_labels != T.IGNORE], minlength=vocab_size).astype(np.float64) + 1.0
    )
    logp = np.log(counts / counts.sum())
    v = val_labels[val_labels != T.IGNORE]
    return float(-logp[v].mean()) if len(v) else float("nan")


# --------------------------------------------------------------------------------------------- the stages


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checks it between steps (all ranks agree via an all-reduce)."""

    def __init__(self) -> None:
        self.flag = False
        self.signal_name = ""
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps."""


@dataclass
class StageData:
    stream: Any  # PackedSFTStream | TokenWindowStream
    val_rows: list[T.Row]
    train_labels: np.ndarray  # for the unigram baseline
    summary: dict[str, Any]


def prepare_data(
    cfg: TrainConfig, stage: str, tokenizer: Tokenizer, info: D.DistInfo, seed: int
) -> StageData:
    from training.data.mixing import weights_from_manifest

    manifest = T.read_manifest(cfg.data.dataset)
    train = T.read_records(cfg.data.dataset, "train")
    val = T.read_records(cfg.data.dataset, "val")
    S = cfg.data.seq_len
    if stage == "pretrain":
        fp = T.fingerprint(
            Path(cfg.data.dataset) / "train.jsonl",
            Path(cfg.data.dataset) / "val.jsonl",
            Path(cfg.data.tokenizer) / "tokenizer.json",
        )
        tag = f"{fp}-{'chat' if cfg.data.pretrain_include_chat else 'text'}"
        token_dir = Path(cfg.out_dir) / "train" / "tokens"
        paths = {s: token_dir / f"{s}-{tag}.bin" for s in ("train", "val")}
        if info.is_main:
            for split, records in (("train", train), ("val", val)):
                if not paths[split].exists():
                    T.write_token_file(tokenizer, records, paths[split], cfg.data.pretrain_include_chat)
        info.barrier()
        toks = T.open_token_file(paths["train"], tokenizer.vocab_size)
        stream = T.TokenWindowStream(toks, S, seed, tokenizer.endoftext_id)
        val_toks = T.open_token_file(paths["val"], tokenizer.vocab_size)
        val_rows = []
        if len(val_toks) > S:
            vs = T.TokenWindowStream(val_toks, S, seed, tokenizer.endoftext_id)
            val_rows = [vs.window(w) for w in range(min(vs.num_windows, cfg.data.val_max_rows))]
        summary = {"train_tokens": len(toks), "windows": stream.num_windows, "val_rows": len(val_rows)}
        return StageData(stream, val_rows, np.asarray(toks[1:], dtype=np.int64), summary)

    weights = weights_from_manifest(manifest)
    data = T.sft_examples(tokenizer, train, S)
    if data.num_examples == 0:
        raise T.DatasetError(
            f"{cfg.data.dataset}/train.jsonl: no chat record with an assistant turn to train on"
        )
    unused = sorted(t for t, w in weights.items() if w > 0 and t not in data.by_task)
    weights = {t: w for t, w in weights.items() if t in data.by_task}
    if not any(w > 0 for w in weights.values()):
        raise T.DatasetError(
            f"{cfg.data.dataset}/manifest.json: no mixing weight for the chat tasks {sorted(data.by_task)}"
        )
    stream = T.PackedSFTStream(data.by_task, weights, seed, S, tokenizer.pad_id)
    val_data = T.sft_examples(tokenizer, val, S)
    val_examples = [ex for t in sorted(val_data.by_task) for ex in val_data.by_task[t]]
    val_rows = T.pack_in_order(val_examples, S, tokenizer.pad_id)[: cfg.data.val_max_rows]
    train_labels = np.concatenate([ex.labels for exs in data.by_task.values() for ex in exs]).astype(np.int64)
    total_w = sum(weights.values())
    summary = {
        "examples": {t: len(v) for t, v in sorted(data.by_task.items())},
        "mixing_weights": {t: w / total_w for t, w in sorted(weights.items())},
        "tasks_without_chat_examples": unused,
        "truncated": data.truncated,
        "dropped_without_labels": data.dropped,
        "text_records_skipped": data.skipped_text,
        "val_rows": len(val_rows),
    }
    return StageData(stream, val_rows, train_labels, summary)


class MetricsLog:
    """metrics.jsonl (rank 0), TensorBoard when installed."""

    def __init__(self, path: Path, resume_step: int, tensorboard: bool, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # After a resume, lines past the checkpoint's step were written by the killed run: drop them so the
        # file reads as one uninterrupted run.
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by the kill
            path.write_text("".join(k + "\n" for k in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                log.info("tensorboard not installed: metrics.jsonl and PNG curves only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('stage', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" else None  # fp32 on the CPU: exact and deterministic


def _attn_backend(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.model.attn_backend != "auto":
        return cfg.model.attn_backend
    if device.type != "cuda":
        return "sdpa"
    from kernels import select_attn_backend

    return select_attn_backend(device)


def _comparable_config(cfg: TrainConfig) -> dict[str, Any]:
    return msgspec.to_builtins(cfg)


def run_stage(
    cfg: TrainConfig,
    stage: str,
    stage_index: int,
    tokenizer: Tokenizer,
    config: ModelConfig,
    info: D.DistInfo,
    init_state: dict[str, torch.Tensor] | None,
    stop: StopRequested,
) -> dict[str, Any] | None:
    """Train one stage to its last step (resuming if a checkpoint exists). Returns the stage summary, or None when
    stopped by a signal."""
    from tqdm import tqdm

    s: StageSection = getattr(cfg, stage)
    stage_dir = Path(cfg.out_dir) / "train" / stage
    ckpt_dir = stage_dir / "ckpt"
    seed = cfg.run.seed * 1000 + stage_index
    torch.manual_seed(seed)
    data = prepare_data(cfg, stage, tokenizer, info, seed)
    device = info.device
    autocast_dtype = _autocast_dtype(device)

    model = __import__("model.transformer", fromlist=["Transformer"]).Transformer(
        config, attn_backend=_attn_backend(cfg, device)
    )
    model.init_weights(seed)
    if init_state is not None:
        model.load_state_dict(init_state, strict=False)
    lora = cfg.lora if cfg.lora is not None and cfg.lora.enabled else None
    if lora is not None:
        from training import lora as L

        L.add_lora(model, lora)
    model.to(device).train()
    wrapped = D.wrap(model, info, cfg.run.distributed)
    optimizer = build_optimizer(wrapped, cfg.optim, s.lr)

    start_step, tokens_seen, nonfinite_total, best_val = 0, 0, 0, float("inf")
    loaded, skipped = ckpt.load_latest(ckpt_dir, config)
    for line in skipped:
        if info.is_main:
            log.warning(line)
    if loaded is not None:
        meta = loaded.meta
        changes = config_changes(meta["train_config"], _comparable_config(cfg))
        if changes:
            raise ConfigError(
                f"resume: {loaded.path} was written with another config ({'; '.join(changes)}); restore the config "
                "or pass --fresh to start this run over"
            )
        if meta["world_size"] != info.world_size:
            raise ConfigError(
                f"resume: {loaded.path} was written by {meta['world_size']} process(es), this run has "
                f"{info.world_size}; the global batch would change. Resume with the same world size or --fresh"
            )
        model_state = loaded.model_state
        if lora is not None:
            model_state = L.join_state(model_state, L.load_adapter_tensors(loaded.path))
        D.load_full_state(wrapped, optimizer, model_state, loaded.optim_state)
        loaded.restore_rng()
        data.stream.load_state_dict(meta["data"])
        start_step = int(meta["step"])
        tokens_seen = int(meta["tokens_seen"])
        nonfinite_total = int(meta["nonfinite_total"])
        best_val = float(meta["best_val"])
        if info.is_main:
            log.info("%s: resumed from %s (step %d)", stage, loaded.path, start_step)
    # The compiled module runs the steps; state dicts are taken from `wrapped` (compile prefixes names).
    fwd = torch.compile(wrapped) if cfg.run.compile else wrapped

    metrics = MetricsLog(stage_dir / "metrics.jsonl", start_step, cfg.run.tensorboard, info.is_main)
    rows_per_rank = s.batch_size * s.grad_accum
    global_rows = rows_per_rank * info.world_size

    def save(step: int, where: Path | None = None) -> None:
        model_sd, optim_sd = D.full_state(wrapped, optimizer)
        if info.is_main:
            meta = {
                "stage": stage,
                "step": step,
                "tokens_seen": tokens_seen,
                "nonfinite_total": nonfinite_total,
                "best_val": best_val,
                "world_size": info.world_size,
                "data": data.stream.state_dict(),
                "train_config": _comparable_config(cfg),
            }
            extra = None
            if lora is not None:
                model_sd, adapters = L.split_state(model_sd)
                extra = {L.ADAPTER_WEIGHTS: L.adapter_bytes(adapters)}
            ckpt.save_training_checkpoint(
                where or ckpt.step_path(ckpt_dir, step),
                config,
                model_sd,
                optim_sd,
                meta,
                cfg.data.tokenizer,
                extra_files=extra,
            )
            if where is None:
                ckpt.prune(ckpt_dir, cfg.run.keep_last)
        info.barrier()

    bar = tqdm(
        total=s.steps,
        initial=start_step,
        desc=stage,
        disable=not info.is_main,
        dynamic_ncols=True,
        unit="step",
        mininterval=1.0,
    )
    nonfinite_row = 0
    step = start_step
    val_loss = float("nan")
    try:
        stage_t0 = time.perf_counter()
        out_of_time = False
        while step < s.steps and not out_of_time:
            t0 = time.perf_counter()
            rows = [data.stream.next_row() for _ in range(global_rows)]
            mine = rows[info.rank :: info.world_size]
            micro = [
                to_batch(mine[j * s.batch_size : (j + 1) * s.batch_size], device) for j in range(s.grad_accum)
            ]
            # Rank 0's clock, so every rank uses the same learning rate.
            time_fraction = (
                info.broadcast_object((time.perf_counter() - stage_t0) / s.max_seconds)
                if s.max_seconds
                else 0.0
            )
            lr = lr_at(step, s, time_fraction)
            result = train_step(
                fwd, optimizer, micro, info, cfg.optim, lr, cfg.run.distributed, autocast_dtype
            )
            step += 1
            step_tokens = global_rows * cfg.data.seq_len
            tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            record = {
                "stage": stage,
                "step": step,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "label_tokens": result.label_tokens,
                "rank_label_tokens": info.all_gather_int(result.local_label_tokens),
                "tokens_per_s": step_tokens / dt,
                "tokens_seen": tokens_seen,
            }
            if not result.applied:
                nonfinite_row += 1
                nonfinite_total += 1
                record.update(skipped=True, nonfinite_total=nonfinite_total)
                if info.is_main:
                    log.warning(
                        "%s step %d: non-finite loss %s / grad norm %s; step skipped (%d in a row, %d total)",
                        stage,
                        step,
                        result.loss,
                        result.grad_norm,
                        nonfinite_row,
                        nonfinite_total,
                    )
                if nonfinite_row >= cfg.run.max_nonfinite:
                    metrics.write(record)
                    raise TrainingDiverged(
                        f"{stage}: {nonfinite_row} non-finite steps in a row (run.max_nonfinite = "
                        f"{cfg.run.max_nonfinite}) ending at step {step}; lower {stage}.lr or check the data. The "
                        f"last good checkpoint is in {ckpt_dir}"
                    )
            else:
                nonfinite_row = 0
            # Every rank must agree on stopping (FSDP collectives): rank 0's clock decides.
            out_of_time = bool(s.max_seconds) and info.broadcast_object(
                time.perf_counter() - stage_t0 >= s.max_seconds
            )
            last = step == s.steps or out_of_time
            if (s.eval_every and step % s.eval_every == 0) or last:
                val_loss = evaluate(fwd, data.val_rows, s.batch_size, device, autocast_dtype)
                record["val_loss"] = val_loss
                # Rank 0 decides, so every rank joins the same collective save (FSDP gathers).
                if info.broadcast_object(val_loss < best_val):
                    best_val = val_loss
                    save(step, stage_dir / "best")
            metrics.write(record)
            bar.set_postfix(
                loss=f"{result.loss:.3f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                lr=f"{lr:.2e}",
                refresh=False,
            )
            bar.update(1)
            if step % cfg.run.log_every == 0 and info.is_main:
                bar.write(
                    f"{stage} step {step}/{s.steps} loss {result.loss:.4f} lr {lr:.2e} "
                    f"{record['tokens_per_s']:.0f} tok/s"
                )
            stop_now = info.all_reduce_sum(1.0 if stop.flag else 0.0) > 0
            if step % s.checkpoint_every == 0 or last or stop_now:
                save(step)
            if stop_now:
                if info.is_main:
                    bar.write(
                        f"{stage}: stopped by {stop.signal_name or 'a signal'} at step {step}; checkpoint saved in "
                        f"{ckpt.step_path(ckpt_dir, step)}. Run the same command to resume."
                    )
                return None
    finally:
        bar.close()
        metrics.close()

    if math.isnan(val_loss):  # resumed from the stage's last checkpoint: the loop had nothing left to run
        val_loss = evaluate(fwd, data.val_rows, s.batch_size, device, autocast_dtype)
    # The stage's result: an HF checkpoint with the tokenizer, which the next stage (or export) starts from.
    model_sd, _ = D.full_state(wrapped, optimizer)
    if lora is not None:
        model_sd = L.merged_state(model_sd, lora)
    if out_of_time and info.is_main:
        log.warning(
            "%s: max_seconds %.0f reached; stage ended at step %d of %d", stage, s.max_seconds, step, s.steps
        )
    summary = {
        "stage": stage,
        "steps_done": step,
        "seconds": round(time.perf_counter() - stage_t0, 1),
        "steps": s.steps,
        "val_loss": val_loss,
        "best_val_loss": best_val,
        "tokens_seen": tokens_seen,
        "nonfinite_steps": nonfinite_total,
        "world_size": info.world_size,
        "data": data.summary,
        "train_config": _comparable_config(cfg),
    }
    if info.is_main:
        from model.checkpoint import save_checkpoint

        train_labels = data.train_labels
        val_labels = (
            np.concatenate([r.labels for r in data.val_rows]) if data.val_rows else np.array([], np.int64)
        )
        summary["unigram_val_loss"] = unigram_loss(train_labels, val_labels, config.vocab_size)
        save_checkpoint(
            ckpt.model_from_state(config, model_sd),
            stage_dir / "final",
            tokenizer_dir=cfg.data.tokenizer,
            extra_files={"stage_summary.json": (json.dumps(summary, indent=1) + "\n").encode()},
        )
        if cfg.run.plots:
            try:
                from training.viz import plot_metrics

                plot_metrics(stage_dir / "metrics.jsonl", stage_dir / "curves.png", title=f"{stage}")
            except ImportError as exc:
                log.info("no curves.png (%s)", exc)
    info.barrier()
    return summary


def stage_done(cfg: TrainConfig, stage: str) -> Path | None:
    final = Path(cfg.out_dir) / "train" / stage / "final"
    return final if (final / "stage_summary.json").exists() else None


def reset_outputs(cfg: TrainConfig) -> None:
    import shutil

    for stage in cfg.stages:
        shutil.rmtree(Path(cfg.out_dir) / "train" / stage, ignore_errors=True)


def train(cfg: TrainConfig, fresh: bool = False) -> dict[str, Any] | None:
    """Run every configured stage; returns the report (also written to out_dir/eval/train_report.json), or None
    when a signal stopped the run."""
    info = D.init(cfg.run.device)
    try:
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if fresh and info.is_main:
            reset_outputs(cfg)
        info.barrier()
        tokenizer = Tokenizer.load(cfg.data.tokenizer)
        config = model_config(cfg, tokenizer)
        init_state = None
        if cfg.model.init_from:
            init_state = _read_init(cfg.model.init_from, config)
        summaries = []
        with StopRequested() as stop:
            for i, stage in enumerate(cfg.stages):
                done = stage_done(cfg, stage)
                if done is not None:
                    previous = json.loads((done / "stage_summary.json").read_text())
                    changes = config_changes(previous.get("train_config", {}), _comparable_config(cfg))
                    if "train_config" in previous and changes:
                        raise ConfigError(
                            f"{stage} was completed in {done} with another config ({'; '.join(changes)}); pass "
                            "--fresh to train again, or set out_dir to a new directory"
                        )
                    if info.is_main:
                        log.info("%s: already complete (%s); skipping", stage, done)
                    summaries.append(previous)
                else:
                    summary = run_stage(cfg, stage, i, tokenizer, config, info, init_state, stop)
                    if summary is None:
                        return None
                    summaries.append(summary)
                    done = stage_done(cfg, stage)
                init_state = _read_init(str(done), config) if done is not None else None
        report = {"stages": summaries}
        if info.is_main:
            report = finish(cfg, tokenizer, summaries)
        return report
    finally:
        D.shutdown()


def _read_init(path: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    from model.checkpoint import load_config, read_state_dict

    stored = load_config(path)
    mismatch = ckpt.config_mismatch(stored, config)
    if mismatch:
        raise CheckpointError(f"{path}: its config does not match the requested model: {mismatch}")
    state = read_state_dict(Path(path), stored)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def finish(cfg: TrainConfig, tokenizer: Tokenizer, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Copy the last stage's result to out_dir/checkpoint; report validation loss vs the unigram baseline and
    sample generations per task into out_dir/eval/."""
    import shutil

    from model.chat import encode_chat
    from model.checkpoint import load_checkpoint
    from model.generate import generate

    out = Path(cfg.out_dir)
    last = out / "train" / cfg.stages[-1] / "final"
    dest = out / "checkpoint"
    tmp = out / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last, tmp)
    (tmp / "stage_summary.json").unlink(missing_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)

    model = load_checkpoint(dest)
    samples = []
    by_task: dict[str, list[dict[str, Any]]] = {}
    # Validation records first; a task with none there is sampled from the test split (never from train).
    for split in ("val", "test"):
        path = Path(cfg.data.dataset) / f"{split}.jsonl"
        records = T.read_records(cfg.data.dataset, split) if path.exists() else []
        seen = set(by_task)
        for r in records:
            if (
                r["task"] not in seen
                and r["kind"] == "chat"
                and any(m["role"] == "assistant" for m in r["messages"])
            ):
                by_task.setdefault(r["task"], []).append(r)
    for task in sorted(by_task):
        for r in by_task[task][: cfg.run.samples_per_task]:
            msgs = r["messages"]
            cut = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompt = encode_chat(tokenizer, msgs[:cut], add_generation_prompt=True).ids
            room = model.config.max_position_embeddings - cfg.run.sample_tokens
            prompt = prompt[-room:]
            gen = generate(model, [prompt], cfg.run.sample_tokens, stop_ids=tokenizer.stop_ids)[0]
            samples.append(
                {
                    "task": task,
                    "id": r.get("id"),
                    "prompt": msgs[cut - 1]["content"] if cut else "",
                    "reference": msgs[cut]["content"],
                    "generated": tokenizer.decode(gen.tokens),
                    "finish_reason": gen.finish_reason,
                }
            )
    report = {"stages": summaries, "samples": samples, "checkpoint": str(dest)}
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "train_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    lines = [
        "# Training report",
        "",
        "| stage | steps | seconds | val loss | unigram baseline | val ppl | tokens seen |",
        "|---|---|---|---|---|---|---|",
    ]
    for sm in summaries:
        lines.append(
            f"| {sm['stage']} | {sm.get('steps_done', sm['steps'])}/{sm['steps']} | {sm.get('seconds', float('nan')):.0f} "
            f"| {sm['val_loss']:.4f} | {sm.get('unigram_val_loss', float('nan')):.4f} "
            f"| {math.exp(min(sm['val_loss'], 50)):.1f} | {sm['tokens_seen']:,} |"
        )
    lines += ["", "## Samples (greedy)", ""]
    for sm in samples:
        lines += [
            f"### {sm['task']} ({sm['id']})",
            "",
            f"**prompt**: {sm['prompt']}",
            "",
            f"**reference**: {sm['reference']}",
            "",
            f"**generated** ({sm['finish_reason']}): {sm['generated']}",
            "",
        ]
    (eval_dir / "train_report.md").write_text("\n".join(lines) + "\n")
    return report
