"""Checkpoint -> ONNX bundle: the served graph (optimized, optionally int8), the optimum-layout graph, and
export_report.json with parity against PyTorch for every file.

Exporter choice: the TorchScript-based exporter (`dynamo=False`, opset 17) traces both graphs in about 0.4 s
each on the tiny preset; the dynamo exporter took about 15 s for one graph on this machine. Both matched
PyTorch to about 1e-6 (the team's NOTES.md), and the served graph's shapes all follow from its inputs' dynamic
axes, so tracing loses nothing here while keeping the shared test fixture (one export per test run) inside the
CI budget. onnxruntime's extended graph optimizations then fuse RMSNorm into SimplifiedLayerNormalization, SiLU
into QuickGelu and the scaled QK^T into FusedMatMul, and fold the shape arithmetic (1293 -> 595 nodes at the
demo shape); the report counts ops before and after so the fusions are visible.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.runtime import (
    ATTENTION_DESIGNS,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CUSTOM_DOMAIN,
    OPTIMUM,
    REPORT,
    SERVED,
    SERVED_INPUTS,
    SERVED_INT8,
    SLOT_INPUTS,
    OnnxRunner,
    open_bundle,
    sha256_file,
)
from model.errors import CheckpointError, UserError

OPSET = 17
# The parity gate for fp32 files (issue 7): max abs difference of logits and new keys/values vs PyTorch.
FP32_TOL = 1e-4
GREEDY_TOKENS = 64
DECODE_STEPS = 8
# Cache positions per row of the served graph's past inputs (ServedGraph's docstring: one Gather index per
# 16 positions instead of per position made a batch-16 decode step 11% cheaper on the demo model).
KV_CHUNK = 16
# Config fields the bundle's graphs are bound to; open_bundle checks config.json against them.
GRAPH_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)


class ExportError(UserError):
    """An export request that cannot be carried out as asked (existing output, missing tokenizer...)."""


def served_io_names(n_layers: int, attention: str = "slot") -> tuple[list[str], list[str]]:
    past = [f"past_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    new = [f"new_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    fixed = SLOT_INPUTS if attention == "slot" else SERVED_INPUTS
    return [*fixed, *past], ["logits", *new]


def resolve_attention(attention: str) -> tuple[str, Path | None]:
    """("slot" or "gather", the custom op library for "slot"). "auto" is "slot" when the library is built."""
    from export.custom_ops import default_library, find_library

    if attention not in ("auto", *ATTENTION_DESIGNS):
        raise ExportError(f"--attention {attention!r}: one of auto, {', '.join(ATTENTION_DESIGNS)}")
    lib = find_library()
    if attention == "gather" or (attention == "auto" and lib is None):
        return "gather", None
    if lib is None:
        raise ExportError(
            f"--attention slot needs the SlotAttention op library, not found at {default_library()}: build it "
            "with `python -m export.custom_ops build` (make install does), or pass --attention gather"
        )
    return "slot", lib


def session_options(threads: int = 1, ops_library: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if ops_library is not None:
        opts.register_custom_ops_library(str(ops_library))
    return opts


def optimum_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_served(model, path: Path, attention: str = "slot", kv_chunk: int = KV_CHUNK) -> None:
    import torch

    from export.graphs import ServedGraph

    cfg = model.config
    n, kv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    if attention == "slot":
        # One packed row: a 3-token row at positions 2..4 of slot 3, a 2-token row at 0..1 of slot 1, one
        # padding token; logits of each row's last token.
        slots, cache_len = 4, 8
        args = (
            torch.zeros(1, 6, dtype=torch.long),
            torch.tensor([[2, 3, 4, 0, 1, -1]]),
            torch.tensor([[2, 4]]),
            torch.tensor([3, 1]),
            torch.tensor([3, 2]),
            *[torch.zeros(slots, kv, cache_len, d) for _ in range(2 * n)],
        )
        names_in, names_out = served_io_names(n, "slot")
        dyn = {
            "input_ids": {0: "batch", 1: "seq"},
            "position_ids": {0: "batch", 1: "seq"},
            "logits_index": {0: "batch", 1: "n_logits"},
            "slot_ids": {0: "rows"},
            "seq_lens": {0: "rows"},
            "logits": {0: "batch", 1: "n_logits"},
        }
        # The whole cache of each layer, [slots, KV, cache_len, D], bound once by the runner.
        dyn.update({name: {0: "slots", 2: "cache_len"} for name in names_in[len(SLOT_INPUTS) :]})
        dyn.update({name: {0: "batch", 1: "seq"} for name in names_out[1:]})  # [B, S, KV, D]
        _trace(ServedGraph(model, "slot").eval(), args, path, names_in, names_out, dyn, custom=True)
        return
    b, s, chunks, rows = 2, 3, 2, 2 * kv * 8
    args = (
        torch.zeros(b, s, dtype=torch.long),
        torch.arange(s).repeat(b, 1) + chunks * kv_chunk,
        torch.full((b, 1), s - 1),
        torch.arange(b * kv * chunks).reshape(b, kv, chunks),
        *[torch.zeros(rows, kv_chunk * d) for _ in range(2 * n)],
    )
    names_in, names_out = served_io_names(n, "gather")
    dyn: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits_index": {0: "batch", 1: "n_logits"},
        "kv_index": {0: "batch", 2: "past"},  # KV heads stay fixed: the runner checks them against config
        "logits": {0: "batch", 1: "n_logits"},
    }
    dyn.update({name: {0: "cache_rows"} for name in names_in[len(SERVED_INPUTS) :]})
    dyn.update({name: {0: "batch", 2: "seq"} for name in names_out[1:]})  # [B, KV, S, D]
    _trace(ServedGraph(model, "gather").eval(), args, path, names_in, names_out, dyn)


def export_optimum(model, path: Path) -> None:
    import torch

    from export.graphs import OptimumGraph

    cfg = model.config
    n, kv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    b, s, p = 2, 3, 2
    args = (
        torch.zeros(b, s, dtype=torch.long),
        torch.ones(b, p + s, dtype=torch.long),
        torch.arange(p, p + s).repeat(b, 1),
        *[torch.zeros(b, kv, p, d) for _ in range(2 * n)],
    )
    names_in, names_out = optimum_io_names(n)
    dyn = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    dyn.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in names_in[3:]})
    dyn.update({name: {0: "batch_size", 2: "total_sequence_length"} for name in names_out[1:]})
    _trace(OptimumGraph(model).eval(), args, path, names_in, names_out, dyn)


def _trace(module, args, path: Path, names_in, names_out, dyn, custom: bool = False) -> None:
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every shape-derived Python value; they are all exported as shape ops.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dyn,
            opset_version=OPSET,
            dynamo=False,
            custom_opsets={CUSTOM_DOMAIN: 1} if custom else None,
        )
    # The checker validates every standard node; a custom-domain node has no schema for it to check.
    onnx.checker.check_model(str(path), full_check=True)


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts = Counter(
        (f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in graph.node
    )
    return dict(sorted(counts.items()))


def optimize(src: Path, dst: Path, threads: int = 1, ops_library: Path | None = None) -> None:
    """onnxruntime's extended graph optimizations (fusions into its CPU/CUDA contrib ops), saved to `dst`.
    Not ORT_ENABLE_ALL: its layout transforms are specific to the machine that ran them."""
    import onnxruntime as ort

    opts = session_options(threads, ops_library)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def rotation_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose constant operand is `rotate_half_matrix` (the served graph's rotary)."""
    import onnx
    from onnx import numpy_helper

    from export.graphs import rotate_half_matrix

    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    consts.update({t.name: t for t in graph.initializer})
    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in consts:
            continue
        value = numpy_helper.to_array(consts[node.input[1]])
        square = value.ndim == 2 and value.shape[0] == value.shape[1]
        if square and np.array_equal(value, rotate_half_matrix(value.shape[0]).numpy()):
            found.append(node.name)
    return found


def quantize_int8(src: Path, dst: Path, threads: int = 1, ops_library: Path | None = None) -> None:
    """Dynamic quantization: MatMul weights to int8 (per output channel), activations quantized per call."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(dst.stem + ".q.onnx")
    # The quantizer logs a "consider pre-processing" hint at WARNING on every call; the graph is already clean.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    # The rotate_half MatMuls stay fp32: their weight is an exact +-1 permutation, so int8 would only add the
    # rounding of their activations.
    keep = rotation_matmuls(src)
    quantize_dynamic(
        src,
        tmp,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        nodes_to_exclude=keep,
    )
    optimize(
        tmp, dst, threads, ops_library
    )  # fuses DynamicQuantizeLinear + MatMulInteger into DynamicQuantizeMatMul
    tmp.unlink()


# --- parity ------------------------------------------------------------------------------------------------
def parity_prompts(config, tokenizer=None, seed: int = 0) -> list[list[int]]:
    """Three rows of different lengths (7, 3 and 12 tokens): ragged in every call."""
    rng = np.random.default_rng(seed)
    lens = [7, 3, 12]
    if tokenizer is not None:
        text = "Hello! How do I reset my password? Roaming costs extra in some countries, 2026."
        ids = tokenizer.encode(text)
        if len(ids) >= max(lens):
            return [ids[:n] for n in lens]
    return [rng.integers(3, config.vocab_size, n).tolist() for n in lens]


def _maxabs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def served_parity(model, runner: OnnxRunner, prompts: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Ragged prefill, a ragged second chunk (starts > 0), then DECODE_STEPS decode steps, in scattered slots;
    logits and the cache entries written are compared with model.transformer over model.cache.KVCache."""
    import torch

    from model.cache import KVCache
    from model.generate import ragged_batch

    cfg = model.config
    b = len(prompts)
    slots = list(range(runner.num_slots - 1, runner.num_slots - 1 - b, -1))  # reversed: slot != row
    slot_t = torch.tensor(slots)
    cache = KVCache(cfg, runner.num_slots, runner.max_len)
    for s in range(runner.num_slots):
        runner.release(s)
    logits_err, kv_err = 0.0, 0.0

    def compare_kv(row_positions):
        nonlocal kv_err
        for slot, positions in row_positions:
            for li in range(cfg.num_hidden_layers):
                kv_err = max(
                    kv_err,
                    _maxabs(runner.k[li, slot][:, positions], cache.k[li, slot][:, positions].numpy()),
                    _maxabs(runner.v[li, slot][:, positions], cache.v[li, slot][:, positions].numpy()),
                )

    # 1. prefill the first part of every row (all logits); 2. the rest as a second chunk.
    cut = [max(1, len(p) // 2) for p in prompts]
    chunks = [([p[:c] for p, c in zip(prompts, cut, strict=True)], [0] * b)]
    rest = [(i, p[c:], c) for i, (p, c) in enumerate(zip(prompts, cut, strict=True)) if len(p) > c]
    with torch.no_grad():
        for rows, starts in chunks:
            got = runner.prefill(rows, slots, starts, all_logits=True)
            ids, pos = ragged_batch(rows, starts)
            ref = model(ids, pos, cache, slot_t)
            for i, r in enumerate(rows):
                logits_err = max(logits_err, _maxabs(got[i], ref[i, : len(r)].numpy()))
            compare_kv([(slots[i], list(range(starts[i], starts[i] + len(r)))) for i, r in enumerate(rows)])
        rows2 = [r for _, r, _ in rest]
        slots2 = [slots[i] for i, _, _ in rest]
        starts2 = [c for _, _, c in rest]
        got = runner.prefill(rows2, slots2, starts2)
        ids, pos = ragged_batch(rows2, starts2)
        with torch.no_grad():
            ref = model(ids, pos, cache, torch.tensor(slots2))
        last = torch.tensor([len(r) - 1 for r in rows2])
        prefill_logits_err = max(logits_err, _maxabs(got, ref[torch.arange(len(rows2)), last].numpy()))
        compare_kv([(s, list(range(c, c + len(r)))) for s, r, c in zip(slots2, rows2, starts2, strict=True)])
        prefill_kv_err = kv_err
        # Decode: every row feeds PyTorch's greedy token, so both sides see the same inputs.
        positions = np.array([len(p) for p in prompts])
        tokens = np.array([0] * b)
        with torch.no_grad():
            full = model(*ragged_batch(prompts))
        tokens = np.array([int(full[i, len(p) - 1].argmax()) for i, p in enumerate(prompts)])
        decode_err, kv_err = 0.0, 0.0
        for _ in range(DECODE_STEPS):
            got = runner.decode(tokens, np.array(slots), positions)
            ref = model(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], cache, slot_t)[:, 0]
            decode_err = max(decode_err, _maxabs(got, ref.numpy()))
            compare_kv([(slots[i], [int(positions[i])]) for i in range(b)])
            tokens = ref.argmax(-1).numpy()
            positions = positions + 1
    return {
        "rows": [len(p) for p in prompts],
        "decode_steps": DECODE_STEPS,
        "prefill_logits_max_abs": prefill_logits_err,
        "prefill_kv_max_abs": prefill_kv_err,
        "decode_logits_max_abs": decode_err,
        "decode_kv_max_abs": kv_err,
    }


def runner_greedy(
    runner: OnnxRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy generation through the runner (no stop tokens): the loop the engine runs, minus scheduling."""
    slots = list(range(len(prompts)))
    for s in slots:
        runner.release(s)
    logits = runner.prefill([list(p) for p in prompts], slots, [0] * len(prompts))
    out = [[int(t)] for t in logits.argmax(-1)]
    positions = np.array([len(p) for p in prompts])
    for _ in range(max_new_tokens - 1):
        logits = runner.decode(np.array([o[-1] for o in out]), np.array(slots), positions)
        for o, t in zip(out, logits.argmax(-1), strict=True):
            o.append(int(t))
        positions = positions + 1
    return out


def torch_greedy(model, prompts, n: int) -> list[list[int]]:
    from model.generate import generate
    from model.sampling import GREEDY

    return [g.tokens for g in generate(model, prompts, n, GREEDY, stop_ids=())]


def greedy_parity(ref: list[list[int]], runner: OnnxRunner, prompts) -> dict[str, Any]:
    """`ref`: torch_greedy's tokens for the same prompts (computed once for every file checked)."""
    n = len(ref[0])
    got = runner_greedy(runner, prompts, n)
    matching = []
    for r, g in zip(ref, got, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r))
        matching.append(n)
    return {
        "greedy_tokens": n,
        "greedy_matching_prefix": matching,
        "greedy_identical": got == ref,
    }


def optimum_parity(model, path: Path, prompts, threads: int = 1) -> dict[str, Any]:
    """Left-padded batch as transformers feeds it: prefill with empty past, then DECODE_STEPS steps that feed
    present back as past. Compared with model.transformer (no padding, per-row positions)."""
    import onnxruntime as ort
    import torch

    from model.cache import KVCache
    from model.generate import ragged_batch

    cfg = model.config
    n = cfg.num_hidden_layers
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((b, width), np.int64)
    mask = np.zeros((b, width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    past = {
        f"past_key_values.{i}.{k}": np.zeros((b, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
        for i in range(n)
        for k in ("key", "value")
    }
    out = sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
    cache = KVCache(cfg, b, width + DECODE_STEPS + 1)
    slots = torch.arange(b)
    with torch.no_grad():
        ref = model(*ragged_batch(prompts), cache, slots)
    prefill_err = max(
        _maxabs(out[0][i, width - len(p) :], ref[i, : len(p)].numpy()) for i, p in enumerate(prompts)
    )
    kv_err = 0.0
    for li in range(n):
        for i, p in enumerate(prompts):
            kv_err = max(
                kv_err,
                _maxabs(out[1 + 2 * li][i, :, width - len(p) :], cache.k[li, i, :, : len(p)].numpy()),
                _maxabs(out[2 + 2 * li][i, :, width - len(p) :], cache.v[li, i, :, : len(p)].numpy()),
            )
    prefill_kv = kv_err
    tokens = np.array([int(ref[i, len(p) - 1].argmax()) for i, p in enumerate(prompts)])
    positions = np.array([len(p) for p in prompts])
    decode_err, kv_err = 0.0, 0.0
    for _ in range(DECODE_STEPS):
        past = {name: out[1 + j] for j, name in enumerate(past)}
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        out = sess.run(
            None,
            {
                "input_ids": tokens[:, None],
                "attention_mask": mask,
                "position_ids": positions[:, None],
                **past,
            },
        )
        with torch.no_grad():
            r = model(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], cache, slots)[:, 0]
        decode_err = max(decode_err, _maxabs(out[0][:, 0], r.numpy()))
        for li in range(n):
            for i in range(b):
                kv_err = max(
                    kv_err,
                    _maxabs(out[1 + 2 * li][i, :, -1], cache.k[li, i, :, positions[i]].numpy()),
                    _maxabs(out[2 + 2 * li][i, :, -1], cache.v[li, i, :, positions[i]].numpy()),
                )
        tokens = r.argmax(-1).numpy()
        positions = positions + 1
    return {
        "rows": [len(p) for p in prompts],
        "padding": "left",
        "decode_steps": DECODE_STEPS,
        "prefill_logits_max_abs": prefill_err,
        "prefill_kv_max_abs": prefill_kv,
        "decode_logits_max_abs": decode_err,
        "decode_kv_max_abs": kv_err,
    }


def _within(parity: dict[str, Any], tol: float) -> bool:
    return all(v <= tol for k, v in parity.items() if k.endswith("_max_abs"))


# --- perplexity and speed ----------------------------------------------------------------------------------
def read_val_texts(path: Path, tokenizer, limit_tokens: int) -> list[list[int]]:
    """Token sequences from a dataset split (JSONL records with `text` or `messages`) or a plain text file."""
    from model.chat import ChatFormatError, encode_chat

    if not path.is_file():
        raise ExportError(f"--val-data {path}: file not found")
    seqs, total = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ExportError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if rec.get("messages"):
                    try:
                        ids = encode_chat(tokenizer, rec["messages"], add_generation_prompt=False).ids
                    except ChatFormatError as exc:
                        raise ExportError(f"{path}:{lineno}: {exc}") from None
                elif rec.get("text"):
                    ids = tokenizer.encode(rec["text"])
                else:
                    raise ExportError(f"{path}:{lineno}: record has neither `messages` nor `text`")
            else:
                ids = tokenizer.encode(line)
            if len(ids) >= 2:
                seqs.append(ids)
                total += len(ids)
            if total >= limit_tokens:
                break
    if not seqs:
        raise ExportError(f"--val-data {path}: no sequence of 2 or more tokens")
    return seqs


def runner_perplexity(runner: OnnxRunner, seqs: Sequence[Sequence[int]], batch: int = 8) -> float:
    nll, count = 0.0, 0
    batch = min(batch, runner.num_slots)
    seqs = [list(s[: runner.max_len]) for s in seqs]
    for i in range(0, len(seqs), batch):
        rows = seqs[i : i + batch]
        n = len(rows)
        outs = runner.prefill(rows, list(range(n)), [0] * n, all_logits=True)
        for row, logits in zip(rows, outs, strict=True):
            x = logits[:-1].astype(np.float64)
            lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
            nll += float((lse - x[np.arange(len(row) - 1), row[1:]]).sum())
            count += len(row) - 1
    return float(np.exp(nll / count))


def decode_ms(runner: OnnxRunner, batch: int = 1, steps: int = 32, prompt_len: int = 32) -> float:
    rng = np.random.default_rng(0)
    slots = list(range(batch))
    rows = [rng.integers(3, runner.config.vocab_size, prompt_len).tolist() for _ in slots]
    runner.prefill(rows, slots, [0] * batch)
    tokens = np.full(batch, 3)
    t0 = time.perf_counter()
    for step in range(steps):
        runner.decode(tokens, np.array(slots), np.full(batch, prompt_len + step))
    return (time.perf_counter() - t0) / steps * 1e3


# --- the bundle --------------------------------------------------------------------------------------------
def _file_entry(path: Path, kind: str, precision: str) -> dict[str, Any]:
    return {"kind": kind, "precision": precision, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.exists() and force and any(out.iterdir()) and not (out / REPORT).exists():
        # --force replaces bundles, never an unrelated directory a typo pointed at.
        raise ExportError(f"{out}: exists, is not empty and is not a bundle; refusing to replace it")


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    quantize: str | None = None,
    val_data: str | Path | None = None,
    threads: int = 1,
    parity_slots: int = 4,
    progress: Callable[[str, int], None] | None = None,
    attention: str = "auto",
) -> dict[str, Any]:
    """Write a complete bundle to `out` (built in a sibling temp dir, renamed into place) and return its report.
    attention: the served graph's design, "slot" (the SlotAttention op; needs its library built), "gather"
    (standard ONNX ops only) or "auto" (slot when the library is built)."""
    import onnxruntime as ort
    import torch

    from model.checkpoint import TOKENIZER_FILES, load_checkpoint
    from model.tokenizer import Tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize!r}: only 'int8' is supported")
    _check_out(out, force)
    attention, ops_library = resolve_attention(attention)
    # One call per stage, with the number of stages, so a caller can draw a bar with an ETA.
    total = 6 + (3 if quantize == "int8" else 0) + (1 if val_data and quantize != "int8" else 0)

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg, total)

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint)
    missing = [n for n in ("tokenizer.json", "tokenizer_config.json") if not (checkpoint / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{checkpoint}: {', '.join(missing)} missing; a bundle needs the tokenizer files"
        )
    tokenizer = Tokenizer.load(checkpoint)
    cfg = model.config
    val_seqs = read_val_texts(Path(val_data), tokenizer, 20_000) if val_data else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        say("exporting the served graph")
        raw = tmp / "served.raw.onnx"
        export_served(model, raw, attention)
        say("optimizing it with onnxruntime")
        optimize(raw, tmp / SERVED, threads, ops_library)
        say("exporting the optimum-layout graph")
        export_optimum(model, tmp / OPTIMUM)
        timings["export_s"] = time.perf_counter() - t
        if quantize == "int8":
            t = time.perf_counter()
            say("quantizing MatMul weights to int8")
            # From the traced graph, not the optimized one: the quantizer infers types over standard ops only.
            quantize_int8(raw, tmp / SERVED_INT8, threads, ops_library)
            timings["quantize_s"] = time.perf_counter() - t
        if not (checkpoint / "generation_config.json").is_file():
            # Checkpoints written elsewhere may lack it; the service reads its stop tokens from it.
            gen = {"do_sample": False, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            shutil.copyfile(tmp / "generation_config.json", tmp / "optimum" / "generation_config.json")
        for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, tmp / name)
                shutil.copyfile(checkpoint / name, tmp / "optimum" / name)
        files = {
            SERVED: _file_entry(tmp / SERVED, "served", "fp32"),
            OPTIMUM: _file_entry(tmp / OPTIMUM, "optimum", "fp32"),
        }
        if quantize == "int8":
            files[SERVED_INT8] = _file_entry(tmp / SERVED_INT8, "served", "int8")
        names_in, names_out = served_io_names(cfg.num_hidden_layers, attention)
        report: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "checkpoint": str(checkpoint),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "opset": OPSET},
            "config": {k: getattr(cfg, k) for k in GRAPH_CONFIG_KEYS},
            "served_graph": {"attention": attention, "inputs": names_in, "outputs": names_out},
            "files": files,
            "ops": {
                "served_exported": op_counts(raw),
                "served_optimized": op_counts(tmp / SERVED),
                "optimum": op_counts(tmp / OPTIMUM),
            },
            "tolerance": {"fp32_max_abs": FP32_TOL},
            # Both traced graphs pass onnx.checker (full_check) at export. The optimized model.onnx holds
            # onnxruntime's own fused ops (SimplifiedLayerNormalization is not an opset-17 op), which the
            # checker rejects by design: onnxruntime loading it (and the parity below) is its check.
            "onnx_checker": {"served (as exported)": "passed", OPTIMUM: "passed"},
        }
        if quantize == "int8":
            report["ops"]["served_int8"] = op_counts(tmp / SERVED_INT8)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")

        # Parity for every file the service may run; the exported (unoptimized) graph is checked too, so a
        # difference is traced to the exporter or to the optimizer.
        prompts = parity_prompts(cfg, tokenizer)
        longest = max(len(p) for p in prompts)
        # 64 greedy tokens unless the context window is shorter (a tiny config): then as many as fit.
        n_greedy = min(GREEDY_TOKENS, cfg.max_position_embeddings - longest)
        if n_greedy < DECODE_STEPS:
            raise ExportError(
                f"{checkpoint}: max_position_embeddings {cfg.max_position_embeddings} leaves no room for the "
                f"parity check ({longest} prompt + {DECODE_STEPS} decode positions)"
            )
        max_len = min(cfg.max_position_embeddings, max(256, longest + n_greedy))
        raw_entry = _file_entry(raw, "served", "fp32")
        report["files"]["served.raw.onnx"] = raw_entry  # so open_bundle accepts it for the check below
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        runners = {}
        greedy_ref = torch_greedy(model, prompts, n_greedy)
        for name in ("served.raw.onnx", SERVED, SERVED_INT8):
            if name not in report["files"]:
                continue
            say(f"parity of {'the traced graph' if name.endswith('raw.onnx') else name} with PyTorch")
            runner = OnnxRunner(
                tmp, parity_slots, max_len, model_file=name, threads=threads, verify_hash=False
            )
            runners[name] = runner
            parity = served_parity(model, runner, prompts)
            parity.update(greedy_parity(greedy_ref, runner, prompts))
            fp32 = report["files"][name]["precision"] == "fp32"
            if fp32:
                parity["passed"] = _within(parity, FP32_TOL) and parity["greedy_identical"]
            report["files"][name]["parity"] = parity
        say(f"parity of {OPTIMUM} with PyTorch")
        report["files"][OPTIMUM]["parity"] = op = optimum_parity(model, tmp / OPTIMUM, prompts, threads)
        op["passed"] = _within(op, FP32_TOL)
        report["exported_graph_parity"] = report["files"].pop("served.raw.onnx")["parity"]
        raw.unlink()

        if quantize == "int8":
            say("int8: size, speed and perplexity")
            fp, q8 = runners[SERVED], runners[SERVED_INT8]
            int8 = {
                "size_ratio": files[SERVED_INT8]["bytes"] / files[SERVED]["bytes"],
                "decode_ms_batch1_fp32": decode_ms(fp),
                "decode_ms_batch1_int8": decode_ms(q8),
            }
            int8["speedup"] = int8["decode_ms_batch1_fp32"] / int8["decode_ms_batch1_int8"]
            if val_seqs:
                for r in (fp, q8):
                    r.k[:] = 0  # the runner's cache is reused: fresh slots, nothing stale is read
                ppl_fp, ppl_q8 = runner_perplexity(fp, val_seqs), runner_perplexity(q8, val_seqs)
                int8.update(
                    {
                        "val_data": str(val_data),
                        "val_tokens": sum(len(s) for s in val_seqs),
                        "perplexity_fp32": ppl_fp,
                        "perplexity_int8": ppl_q8,
                        "perplexity_rel_change": ppl_q8 / ppl_fp - 1.0,
                    }
                )
            else:
                int8["perplexity"] = "not measured: no --val-data given"
            report["int8"] = int8
        elif val_seqs:
            say("validation perplexity")
            report["perplexity_fp32"] = runner_perplexity(runners[SERVED], val_seqs)
        report["timings"] = timings
        report["passed"] = all(f["parity"].get("passed", True) for f in report["files"].values())
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    open_bundle(out)  # what the service will do first: fail here, not in production
    return report
