"""Served ONNX graph (fp32, int8) vs PyTorch eager vs a bare onnxruntime loop over the optimum-layout graph.

    PYTHONPATH=. python bench/export.py [--checkpoint DIR] [--threads 2] [--context 128] [--steps 64]

Decode: milliseconds per step (one token per row) at batch 1 and 16, each row holding `--context` tokens.
Prefill: tokens/s for one 128- and one 512-token prompt. The served graph is the SlotAttention design (the
default export; needs `python -m export.custom_ops build`), the "gather graph" the standard-ops design
(`--attention gather`), both exported by this run. PyTorch eager is `model.transformer` over
`model.cache.KVCache` (what `model.generate` runs); the optimum loop is what a generic tool does: feed present
back as past, so the cache grows by a concat every step. With llama-cpp-python installed (the `bench` extra),
llama.cpp over an f32 GGUF of the same checkpoint is measured too (one sequence at a time: batch 1 only). Without --checkpoint it uses runs/demo/checkpoint when
it exists, else a random-weight model of the demo shape (same speed, no meaningful perplexity).
Prints the machine, the command and every time as a ratio to PyTorch eager measured in the same run. The
implementations take turns in short blocks (warm-up call of each block not counted). Three statistics: the
minimum wall-clock, the median wall-clock, and (with --threads 1) the median CPU time of the calling thread,
which leaves out time spent waiting for a core: on a shared machine other processes' load inflated wall-clock
medians up to 5-fold.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def machine(threads: int) -> str:
    import onnxruntime as ort
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {threads} thread(s); python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}"
    )


def demo_checkpoint(root: Path) -> Path:
    """A random-weight demo-shape checkpoint with a small tokenizer (ids beyond it are never produced)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.tokenizer import train_tokenizer
    from model.transformer import Transformer
    from tests.conftest import tiny_corpus

    tok = train_tokenizer(tiny_corpus(), vocab_size=512, min_frequency=1)
    tok.save(root / "tokenizer", model_max_length=1024)
    cfg = preset("demo", eos_token_id=[tok.eos_id, tok.endoftext_id], pad_token_id=tok.pad_id)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return save_checkpoint(model, root / "checkpoint", tokenizer_dir=root / "tokenizer")


class TorchEager:
    name = "pytorch eager"

    def __init__(self, model, slots, max_len):
        import torch

        from model.cache import KVCache

        self.torch, self.model = torch, model
        self.cache = KVCache(model.config, slots, max_len)

    def prefill(self, rows):
        t = self.torch
        with t.no_grad():
            ids = t.tensor(rows)
            pos = t.arange(ids.shape[1]).expand_as(ids)
            return self.model(ids, pos, self.cache, t.arange(len(rows)))[:, -1]

    def decode(self, tokens, positions):
        t = self.torch
        with t.no_grad():
            return self.model(
                t.tensor(tokens)[:, None], t.tensor(positions)[:, None], self.cache, t.arange(len(tokens))
            )[:, 0]


class Served:
    def __init__(self, bundle, slots, max_len, threads, model_file, name):
        from export.runtime import OnnxRunner

        self.name = name
        self.runner = OnnxRunner(bundle, slots, max_len, model_file=model_file, threads=threads)

    def prefill(self, rows):
        return self.runner.prefill(rows, list(range(len(rows))), [0] * len(rows))

    def decode(self, tokens, positions):
        return self.runner.decode(np.asarray(tokens), np.arange(len(tokens)), np.asarray(positions))


class LlamaCpp:
    """llama.cpp (llama-cpp-python, the optional `bench` extra) over an f32 GGUF of the same checkpoint; one
    sequence at a time, so batch 1 only."""

    name = "llama.cpp f32"
    max_batch = 1

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False
        )

    def prefill(self, rows):
        self.llm.reset()
        self.llm.eval(rows[0])
        return self.llm.scores[self.llm.n_tokens - 1]

    def decode(self, tokens, positions):
        self.llm.eval([int(tokens[0])])
        return self.llm.scores[self.llm.n_tokens - 1]


class _GQAOp:
    """com.microsoft GroupQueryAttention as a traceable op: forward only gives the tracer shapes."""

    @staticmethod
    def make():
        import torch

        class Op(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, heads, kv_heads):
                return q.clone(), past_k.clone(), past_v.clone()

            @staticmethod
            def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, heads, kv_heads):
                return g.op(
                    "com.microsoft::GroupQueryAttention",
                    q,
                    k,
                    v,
                    past_k,
                    past_v,
                    seqlens_k,
                    total_len,
                    num_heads_i=heads,
                    kv_num_heads_i=kv_heads,
                    outputs=3,
                )

        return Op


class GQAPrototype:
    """Design A of issue 7 as a whole decoder, for measurement only: every layer's attention is onnxruntime's
    GroupQueryAttention reading and writing a [rows, KV, max_len, D] buffer in place (present bound to past).
    Batch row b is buffer row b, every row has the same length: the restrictions the served graph avoids. The
    rest is the served graph's: fused q/k/v and gate/up MatMuls, rotate_half as one MatMul."""

    name = "GQA graph (prototype)"

    def __init__(self, model, tmp: Path, threads: int, max_len: int, rows: int):
        import warnings

        import onnxruntime as ort
        import torch

        from export.graphs import fused_mlp, fused_qkv, register_fused_projections, rotate_half_matrix

        op = _GQAOp.make()
        cfg = model.config
        n, kv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.num_attention_heads

        class Graph(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m  # a submodule, so its weights export as initializers
                self.register_buffer("rot", rotate_half_matrix(d), persistent=False)
                register_fused_projections(self, m)

            def forward(self, input_ids, position_ids, seqlens_k, total_len, *past):
                model = self.m
                b, s = input_ids.shape
                # [B, S, 1, D]: GQA takes [B, S, heads*D], so the rotation happens in that layout
                cos, sin = model.rope_cos[position_ids][:, :, None], model.rope_sin[position_ids][:, :, None]
                x, presents = model.embed_tokens(input_ids), []
                for i, layer in enumerate(model.layers):
                    q, k, v = fused_qkv(self, i, layer.input_layernorm(x), (b, s, h, kv, d))
                    q = (q * cos + torch.matmul(q, self.rot) * sin).reshape(b, s, h * d)
                    k = (k * cos + torch.matmul(k, self.rot) * sin).reshape(b, s, kv * d)
                    out, pk, pv = op.apply(
                        q,
                        k,
                        v.reshape(b, s, kv * d),
                        past[2 * i],
                        past[2 * i + 1],
                        seqlens_k,
                        total_len,
                        h,
                        kv,
                    )
                    hid = x + layer.self_attn.o_proj(out)
                    x = hid + fused_mlp(self, i, layer, layer.post_attention_layernorm(hid))
                    presents += [pk, pv]
                return (model.lm_head(model.norm(x)[:, -1:]), *presents)

        past_names = [f"past_{k}.{i}" for i in range(n) for k in ("key", "value")]
        self.present = [f"present_{k}.{i}" for i in range(n) for k in ("key", "value")]
        names_in = ["input_ids", "position_ids", "seqlens_k", "total_len", *past_names]
        dyn = {"input_ids": {0: "B", 1: "S"}, "position_ids": {0: "B", 1: "S"}, "seqlens_k": {0: "B"}}
        dyn.update({name: {0: "B"} for name in [*past_names, *self.present, "logits"]})
        args = (
            torch.zeros(2, 1, dtype=torch.long),
            torch.full((2, 1), 4),
            torch.full((2,), 4, dtype=torch.int32),
            torch.tensor(5, dtype=torch.int32),
            *[torch.zeros(2, kv, max_len, d) for _ in range(2 * n)],
        )
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Graph(model).eval(),
                args,
                str(tmp / "gqa.onnx"),
                input_names=names_in,
                output_names=["logits", *self.present],
                dynamic_axes=dyn,
                opset_version=17,
                dynamo=False,
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.ort = ort
        self.sess = ort.InferenceSession(str(tmp / "gqa.onnx"), opts, providers=["CPUExecutionProvider"])
        self.past_names = past_names
        self.k = np.zeros((n, rows, kv, max_len, d), np.float32)
        self.v = np.zeros_like(self.k)
        self.vocab = cfg.vocab_size
        self.b = -1

    def _bind(self, b):
        if b == self.b:
            return
        self.io = self.sess.io_binding()
        for j, name in enumerate(self.past_names):
            cache = self.k if j % 2 == 0 else self.v
            ov = self.ort.OrtValue.ortvalue_from_numpy(cache[j // 2][:b])  # rows 0..b-1: a contiguous view
            self.io.bind_ortvalue_input(name, ov)
            self.io.bind_ortvalue_output(self.present[j], ov)  # written in place
        self.logits = np.empty((b, 1, self.vocab), np.float32)
        self.io.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.b = b

    def _run(self, ids, pos, seqlens, total):
        self.io.bind_cpu_input("input_ids", ids)
        self.io.bind_cpu_input("position_ids", pos)
        self.io.bind_cpu_input("seqlens_k", seqlens.astype(np.int32))
        self.io.bind_cpu_input("total_len", np.array(total, np.int32))
        self.sess.run_with_iobinding(self.io)
        return self.logits[:, 0].copy()

    def prefill(self, rows):
        ids = np.asarray(rows, np.int64)
        b, s = ids.shape
        self._bind(b)
        return self._run(ids, np.tile(np.arange(s), (b, 1)), np.full(b, s - 1), s)

    def decode(self, tokens, positions):
        pos = np.asarray(positions, np.int64)
        self._bind(len(pos))
        return self._run(np.asarray(tokens, np.int64)[:, None], pos[:, None], pos, int(pos.max()) + 1)


class OptimumLoop:
    """A bare onnxruntime loop over optimum/model.onnx: past in, present out, fed back next step."""

    name = "optimum loop"

    def __init__(self, bundle, threads, config):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(
            str(bundle / "optimum/model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        self.names = [i.name for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.cfg = config

    def _empty(self, b):
        shape = (b, self.cfg.num_key_value_heads, 0, self.cfg.head_dim)
        return {n: np.zeros(shape, np.float32) for n in self.names}

    def prefill(self, rows):
        ids = np.asarray(rows, np.int64)
        b, s = ids.shape
        self.mask = np.ones((b, s), np.int64)
        out = self.sess.run(
            None,
            {
                "input_ids": ids,
                "attention_mask": self.mask,
                "position_ids": np.tile(np.arange(s), (b, 1)),
                **self._empty(b),
            },
        )
        self.past = dict(zip(self.names, out[1:], strict=True))
        return out[0][:, -1]

    def decode(self, tokens, positions):
        b = len(tokens)
        self.mask = np.ones((b, self.mask.shape[1] + 1), np.int64)
        out = self.sess.run(
            None,
            {
                "input_ids": np.asarray(tokens, np.int64)[:, None],
                "attention_mask": self.mask,
                "position_ids": np.asarray(positions, np.int64)[:, None],
                **self.past,
            },
        )
        self.past = dict(zip(self.names, out[1:], strict=True))
        return out[0][:, 0]


# --- the two served-graph designs, one attention layer in isolation ------------------------------------------
def _gqa_layer(h, kv, d, max_len) -> bytes:
    """Design A: onnxruntime's GroupQueryAttention over a shared past/present buffer [B, KV, max_len, D]
    (the new token's k/v written in place by the op; active slots must be rows 0..B-1 of the buffer)."""
    from onnx import TensorProto as T
    from onnx import helper

    f, i32 = T.FLOAT, T.INT32
    inputs = [
        helper.make_tensor_value_info("query", f, ["B", 1, h * d]),
        helper.make_tensor_value_info("key", f, ["B", 1, kv * d]),
        helper.make_tensor_value_info("value", f, ["B", 1, kv * d]),
        helper.make_tensor_value_info("past_key", f, ["B", kv, max_len, d]),
        helper.make_tensor_value_info("past_value", f, ["B", kv, max_len, d]),
        helper.make_tensor_value_info("seqlens_k", i32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    outputs = [
        helper.make_tensor_value_info("output", f, ["B", 1, h * d]),
        helper.make_tensor_value_info("present_key", f, ["B", kv, max_len, d]),
        helper.make_tensor_value_info("present_value", f, ["B", kv, max_len, d]),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        [i.name for i in inputs],
        [o.name for o in outputs],
        domain="com.microsoft",
        num_heads=h,
        kv_num_heads=kv,
    )
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=ops).SerializeToString()


def _mask_layer(h, kv, d, chunk, path: Path) -> None:
    """Design B (chosen): the served graph's attention: gather this batch's used chunks of positions from the
    cache, append the new k/v, grouped attention under an additive length mask; the runner writes the new
    k/v afterwards."""
    import torch

    from export.graphs import cached_attention

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, position_ids, kv_index, past_k, past_v):
            b, s = q.shape[0], q.shape[2]
            length = kv_index.shape[2] * chunk
            past_ok = (torch.arange(length)[None, :] < position_ids[:, :1])[:, None, :].expand(b, s, length)
            new_ok = torch.ones(s, s, dtype=torch.bool).tril()[None].expand(b, s, s)
            allowed = torch.cat([past_ok, new_ok], dim=2)
            bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None, None]
            pk = past_k[kv_index].reshape(b, kv, length, d)
            pv = past_v[kv_index].reshape(b, kv, length, d)
            return cached_attention(q, pk, pv, k, v, bias, (b, s, length, h, kv, d))

    args = (
        torch.zeros(2, h, 1, d),
        torch.zeros(2, kv, 1, d),
        torch.zeros(2, kv, 1, d),
        torch.full((2, 1), 4),
        torch.zeros(2, kv, 1, dtype=torch.long),
        torch.zeros(64, chunk * d),
        torch.zeros(64, chunk * d),
    )
    names = ["q", "k", "v", "position_ids", "kv_index", "past_k", "past_v"]
    dyn = {
        "q": {0: "B"},
        "k": {0: "B"},
        "v": {0: "B"},
        "position_ids": {0: "B"},
        "kv_index": {0: "B", 2: "C"},
    }
    dyn.update({"past_k": {0: "R"}, "past_v": {0: "R"}, "out": {0: "B"}})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Layer(),
            args,
            str(path),
            input_names=names,
            output_names=["out"],
            dynamic_axes=dyn,
            opset_version=17,
            dynamo=False,
        )


def design_comparison(threads: int, tmp: Path, repeat: int = 200) -> list[str]:
    """Microseconds per decode call of one attention layer at the demo shape (8 heads over 4 KV heads, head
    dim 32, a 1024-position cache of 16 slots), every design bound once through IO binding. One layer called
    over and over keeps its cache rows in the CPU caches, which a whole decoder step does not (its weights
    evict them): these figures are compute, the decoder tables below include the memory traffic."""
    import onnxruntime as ort

    from export.custom_ops import find_library, slot_attention_model
    from export.onnx_export import KV_CHUNK

    h, kv, d, slots, max_len, chunk = 8, 4, 32, 16, 1024, KV_CHUNK
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    gqa = ort.InferenceSession(_gqa_layer(h, kv, d, max_len), opts, providers=["CPUExecutionProvider"])
    _mask_layer(h, kv, d, chunk, tmp / "mask_layer.onnx")
    mask = ort.InferenceSession(str(tmp / "mask_layer.onnx"), opts, providers=["CPUExecutionProvider"])
    sopts = ort.SessionOptions()
    sopts.intra_op_num_threads = threads
    sopts.register_custom_ops_library(str(find_library()))
    slot = ort.InferenceSession(slot_attention_model(h, kv, d), sopts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ck = rng.standard_normal((slots, kv, max_len, d), dtype=np.float32)
    cv = rng.standard_normal((slots, kv, max_len, d), dtype=np.float32)
    lines = [
        "| batch | context | slot op, served (us) | GQA shared buffer (us) | gather + length mask (us) |",
        "|---|---|---|---|---|",
    ]
    for b in (1, 16):
        for ctx in (128, 512):
            q = rng.standard_normal((b, 1, h * d), dtype=np.float32)
            k = rng.standard_normal((b, 1, kv * d), dtype=np.float32)
            v = rng.standard_normal((b, 1, kv * d), dtype=np.float32)
            # A: rows 0..b-1 of the buffer are the active slots (a contiguous view, no copy).
            io = gqa.io_binding()
            pk, pv = ort.OrtValue.ortvalue_from_numpy(ck[:b]), ort.OrtValue.ortvalue_from_numpy(cv[:b])
            io.bind_ortvalue_input("past_key", pk)
            io.bind_ortvalue_input("past_value", pv)
            io.bind_ortvalue_output("present_key", pk)
            io.bind_ortvalue_output("present_value", pv)
            io.bind_output("output")

            def run_a(io=io, q=q, k=k, v=v, b=b, ctx=ctx):
                io.bind_cpu_input("query", q)
                io.bind_cpu_input("key", k)
                io.bind_cpu_input("value", v)
                io.bind_cpu_input("seqlens_k", np.full(b, ctx, np.int32))
                io.bind_cpu_input("total_sequence_length", np.array(ctx + 1, np.int32))
                gqa.run_with_iobinding(io)

            # B: the whole buffer bound as chunk rows; kv_index picks them; the new k/v written by numpy after.
            iob = mask.io_binding()
            iob.bind_ortvalue_input("past_k", ort.OrtValue.ortvalue_from_numpy(ck.reshape(-1, chunk * d)))
            iob.bind_ortvalue_input("past_v", ort.OrtValue.ortvalue_from_numpy(cv.reshape(-1, chunk * d)))
            base = (np.arange(slots * kv) * (max_len // chunk)).reshape(slots, kv)
            slot_ids = np.arange(b)[::-1].copy()  # any slots, not only the first b
            qb, kb, vb = q.reshape(b, h, 1, d), k.reshape(b, kv, 1, d), v.reshape(b, kv, 1, d)

            def run_b(iob=iob, b=b, ctx=ctx, slot_ids=slot_ids, qb=qb, kb=kb, vb=vb, base=base):
                kv_index = base[slot_ids][:, :, None] + np.arange(-(-ctx // chunk))
                for name, arr in (
                    ("q", qb),
                    ("k", kb),
                    ("v", vb),
                    ("position_ids", np.full((b, 1), ctx)),
                    ("kv_index", kv_index),
                ):
                    iob.bind_cpu_input(name, arr)
                iob.clear_binding_outputs()
                iob.bind_output("out")
                mask.run_with_iobinding(iob)
                ck[slot_ids, :, ctx] = kb[:, :, 0]
                cv[slot_ids, :, ctx] = vb[:, :, 0]

            # Served: the whole cache bound as it is; the op reads each row's slot in place.
            ios = slot.io_binding()
            ios.bind_ortvalue_input("past_k", ort.OrtValue.ortvalue_from_numpy(ck))
            ios.bind_ortvalue_input("past_v", ort.OrtValue.ortvalue_from_numpy(cv))
            # the b decode rows packed into one row of b tokens, as the runner calls it
            qs, ks, vs = q.reshape(1, b, h * d), k.reshape(1, b, kv, d), v.reshape(1, b, kv, d)

            def run_s(ios=ios, b=b, ctx=ctx, slot_ids=slot_ids, qs=qs, ks=ks, vs=vs):
                for name, arr in (
                    ("q", qs),
                    ("k", ks),
                    ("v", vs),
                    ("slot_ids", slot_ids),
                    ("position_ids", np.full((1, b), ctx)),
                    ("seq_lens", np.ones(b, np.int64)),
                ):
                    ios.bind_cpu_input(name, arr)
                ios.clear_binding_outputs()
                ios.bind_output("out")
                slot.run_with_iobinding(ios)
                ck[slot_ids, :, ctx] = ks[0]
                cv[slot_ids, :, ctx] = vs[0]

            ta, tb, ts = [], [], []
            for _ in range(repeat):  # interleaved, so load from other processes hits all alike
                ta.append(_time(run_a))
                tb.append(_time(run_b))
                ts.append(_time(run_s))
            a_us, b_us, s_us = np.min(ta) * 1e6, np.min(tb) * 1e6, np.min(ts) * 1e6
            lines.append(f"| {b} | {ctx} | {s_us:.0f} | {a_us:.0f} | {b_us:.0f} |")
    return lines


def _time(fn) -> float:
    return _times(fn)[0]


def _times(fn) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds). With one thread every implementation here computes on the
    calling thread, so CPU time leaves out the time spent waiting for a core on a shared machine."""
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w, time.thread_time() - c


def decode_ms(impls, batch, context, steps, vocab, block: int = 8) -> list[tuple[float, float, float] | None]:
    """(min wall, median wall, median CPU) ms per decode step for each implementation (None where it cannot run
    this batch size). Implementations take turns in blocks of
    `block` steps, so load drift from other processes falls on all alike; the first step of each block is not
    counted, because the previous implementation has just evicted this one's weights from the CPU caches
    (26 MB of fp32 weights at the demo shape do not fit twice)."""
    rng = np.random.default_rng(0)
    rows = rng.integers(3, vocab, (batch, context)).tolist()
    tokens = [3] * batch
    able = [batch <= getattr(impl, "max_batch", batch) for impl in impls]
    for impl, ok in zip(impls, able, strict=True):
        if ok:
            impl.prefill(rows)
    times: list[list[float]] = [[] for _ in impls]
    step = [0] * len(impls)
    for _ in range(max(1, steps // block)):
        for j, impl in enumerate(impls):
            if not able[j]:
                continue
            for k in range(block):
                pos = [context + step[j]] * batch
                dt = _times(lambda impl=impl, pos=pos: impl.decode(tokens, pos))
                step[j] += 1
                if k:
                    times[j].append(dt)
    out: list[tuple[float, float, float] | None] = []
    for t in times:
        if not t:
            out.append(None)
            continue
        wall, cpu = np.array(t).T * 1e3
        out.append((float(wall.min()), float(np.median(wall)), float(np.median(cpu))))
    return out


def prefill_tps(impls, n, repeat, vocab, block: int = 3) -> list[tuple[float, float, float]]:
    prompt = [np.random.default_rng(n).integers(3, vocab, n).tolist()]
    times: list[list[float]] = [[] for _ in impls]
    for _ in range(repeat):
        for t, impl in zip(times, impls, strict=True):
            for k in range(block):  # first call of a block warms the caches, not counted
                dt = _times(lambda impl=impl: impl.prefill(prompt))
                if k:
                    t.append(dt)
    out = []
    for t in times:
        wall, cpu = np.array(t).T
        out.append((n / float(wall.min()), n / float(np.median(wall)), n / float(np.median(cpu))))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: runs/demo/checkpoint, else a random demo-shape model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=128, help="tokens already in each row when decoding")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per case (median)")
    ap.add_argument("--repeat", type=int, default=5, help="prefill rounds per case (2 timed calls each)")
    ap.add_argument("--design-only", action="store_true", help="only the attention-design comparison")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from export.onnx_export import export_bundle
    from model.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    demo = Path("runs/demo/checkpoint")
    if args.checkpoint:
        ckpt, source = Path(args.checkpoint), args.checkpoint
    elif (demo / "model.safetensors").exists():
        ckpt, source = demo, str(demo)
    else:
        ckpt, source = demo_checkpoint(tmp), "random-weight demo-shape model (runs/demo/checkpoint absent)"
    print(f"machine: {machine(args.threads)}")
    print(f"command: PYTHONPATH=. python bench/export.py {shlex.join(sys.argv[1:])}")
    print(f"model:   {source}")
    print("\nattention design, one layer, decode (minimum of 200 interleaved calls):")
    print("\n".join(design_comparison(args.threads, tmp)))
    if args.design_only:
        return 0
    t = time.perf_counter()
    report = export_bundle(ckpt, tmp / "bundle", quantize="int8", threads=args.threads, attention="slot")
    print(f"export (served + int8 + optimum + parity): {time.perf_counter() - t:.1f} s")
    export_bundle(ckpt, tmp / "gather", threads=args.threads, attention="gather")
    model = load_checkpoint(ckpt)
    cfg = model.config
    print(
        f"shape:   {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads}, vocab {cfg.vocab_size}, {model.num_parameters() / 1e6:.1f}M parameters"
    )
    max_len = min(cfg.max_position_embeddings, max(512, args.context + args.steps) + 1)
    slots = 16
    impls = [
        TorchEager(model, slots, max_len),
        Served(tmp / "bundle", slots, max_len, args.threads, "model.onnx", "served fp32"),
        Served(tmp / "bundle", slots, max_len, args.threads, "model.int8.onnx", "served int8"),
        Served(tmp / "gather", slots, max_len, args.threads, "model.onnx", "gather graph fp32"),
        OptimumLoop(tmp / "bundle", args.threads, cfg),
    ]
    impls.append(GQAPrototype(model, tmp, args.threads, max_len, slots))
    if importlib.util.find_spec("llama_cpp") is not None:
        from export.gguf_export import export_gguf

        export_gguf(ckpt, tmp / "model.f32.gguf", weight_type="f32")
        impls.append(LlamaCpp(tmp / "model.f32.gguf", args.threads, max_len))
    else:
        print("llama.cpp: not measured (llama-cpp-python not installed; `pip install '.[bench]'`)")
    rows = []
    for batch in (1, 16):
        ms = decode_ms(impls, batch, args.context, args.steps, cfg.vocab_size)
        rows.append((f"decode ms/step, batch {batch}, context {args.context}", ms, "ms"))
    for n in (128, 512):
        rows.append(
            (
                f"prefill tokens/s, {n}-token prompt",
                prefill_tps(impls, n, args.repeat, cfg.vocab_size),
                "tok/s",
            )
        )

    tables = [(0, "minimum wall-clock over interleaved calls"), (1, "median wall-clock")]
    if args.threads == 1:
        tables.append((2, "median CPU time of the calling thread (1 thread: excludes waiting for a core)"))
    for stat, label in tables:
        print(f"\n{label}:")
        print("| case | " + " | ".join(i.name for i in impls) + " |")
        print("|" + "---|" * (len(impls) + 1))
        for case, vals, unit in rows:
            v = [None if x is None else x[stat] for x in vals]
            if unit == "ms":  # ratio > 1 = faster than PyTorch eager
                cells = ["n/a" if x is None else f"{x:.2f} ({v[0] / x:.2f}x)" for x in v]
            else:
                cells = ["n/a" if x is None else f"{x:,.0f} ({x / v[0]:.2f}x)" for x in v]
            print(f"| {case} | " + " | ".join(cells) + " |")
    probe = [np.random.default_rng(9).integers(3, cfg.vocab_size, 24).tolist()]
    gqa = next(i for i in impls if isinstance(i, GQAPrototype))
    print(
        f"\nGQA prototype vs served fp32, logits of a 24-token prompt: max |diff| "
        f"{float(np.abs(gqa.prefill(probe) - impls[1].prefill(probe)).max()):.1e}"
    )
    q = report["int8"]
    print(
        f"\nint8: file {q['size_ratio']:.2f}x the fp32 size; served fp32 parity "
        f"{report['files']['model.onnx']['parity']['decode_logits_max_abs']:.1e}, int8 "
        f"{report['files']['model.int8.onnx']['parity']['decode_logits_max_abs']:.1e} (max |logit diff| vs PyTorch)"
    )
    print("(x) = speed relative to PyTorch eager in this run; above 1 is faster.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
