"""The torch-free ONNX runner core: open a bundle, check it, own the slot KV cache, run prefill and decode.

The serving engine wraps `OnnxRunner` (service/runners/onnx.py). Imports: numpy, onnxruntime and the torch-free
parts of `model` only, so the CPU serving image needs no torch.

The cache lives in numpy, preallocated: k, v [layers, slots, kv_heads, cache_len, head_dim]. Each layer's
slice is bound to the session once through IO binding (no copy: the OrtValue aliases the numpy memory). With
the slot graph (the default, export_report.json's served_graph.attention) it is bound as it is, cache_len =
max_len, and the graph's SlotAttention op (built by export/custom_ops.py, registered here) reads each row's
positions in place. With the gather graph cache_len is max_len rounded up to the graph's chunk (16
positions), the slice is bound as a [slots*kv_heads*cache_len/chunk, chunk*head_dim] view and the graph
gathers only the chunks a call reads (ServedGraph's docstring compares the two). Either way the runner writes
the new keys/values the graph returns in place with one fancy-index assignment for all layers. Nothing grows,
and no step copies the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.errors import CheckpointError

REPORT = "export_report.json"
SERVED = "model.onnx"
SERVED_INT8 = "model.int8.onnx"
OPTIMUM = "optimum/model.onnx"
# Files every bundle carries beside its graphs (the tokenizer's and transformers' names).
BUNDLE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", REPORT)
BUNDLE_FORMAT = "instructlm-onnx-bundle"
BUNDLE_VERSION = 1
# The served graph's two attention designs (export/graphs.py, ServedGraph): "slot" reads the cache in place
# through the ai.instructlm::SlotAttention custom op, "gather" uses standard ONNX ops only.
ATTENTION_DESIGNS = ("slot", "gather")
CUSTOM_DOMAIN = "ai.instructlm"
# The served graph's fixed inputs; past_key.{i} / past_value.{i} follow, one pair per layer.
SERVED_INPUTS = ("input_ids", "position_ids", "logits_index", "kv_index")  # attention="gather"
# attention="slot": a call's rows are packed into one [1, T] row of tokens (no padding), seq_lens says how many
# tokens each row has, slot_ids where its cache is.
SLOT_INPUTS = ("input_ids", "position_ids", "logits_index", "slot_ids", "seq_lens")


class BundleError(CheckpointError):
    """A bundle directory is missing a file, or a file does not match what the rest of the bundle says."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    config: ModelConfig
    report: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        return self.path / name


def open_bundle(path: str | Path, model_file: str = SERVED, verify_hash: bool = True) -> Bundle:
    """Check that a bundle directory is complete and self-consistent; every error names the file and what was
    expected. `verify_hash` re-hashes the graph file against export_report.json (about 30 ms per 100 MB)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory does not exist")
    for name in BUNDLE_FILES:
        if not (path / name).is_file():
            raise BundleError(
                f"{path / name}: missing (a bundle holds {', '.join(BUNDLE_FILES)} and the graphs)"
            )
    try:
        report = json.loads((path / REPORT).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path / REPORT}: not valid JSON ({exc})") from None
    if not isinstance(report, dict) or report.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path / REPORT}: not an instructlm bundle report (expected format {BUNDLE_FORMAT!r})"
        )
    if report.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{path / REPORT}: bundle version {report.get('version')!r}, this runner reads {BUNDLE_VERSION}"
        )
    config = ModelConfig.load(path / "config.json")
    expected = report.get("config", {})
    for key, value in expected.items():
        got = getattr(config, key, None)
        if got != value:
            raise BundleError(
                f"{path / 'config.json'}: {key} is {got!r} but {REPORT} says the graphs were exported with {value!r}"
            )
    entry = report.get("files", {}).get(model_file)
    graph = path / model_file
    if entry is None:
        raise BundleError(
            f"{path / REPORT}: has no entry for {model_file} (listed: {', '.join(report.get('files', {}))})"
        )
    if not graph.is_file():
        raise BundleError(f"{graph}: missing ({REPORT} lists it)")
    size = graph.stat().st_size
    if size != entry.get("bytes"):
        raise BundleError(
            f"{graph}: {size} bytes, {REPORT} expects {entry.get('bytes')} (truncated or replaced?)"
        )
    if verify_hash and sha256_file(graph) != entry.get("sha256"):
        raise BundleError(f"{graph}: sha256 differs from the one in {REPORT} (file corrupted or replaced)")
    gen_file = path / "generation_config.json"
    try:
        gen = json.loads(gen_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{gen_file}: not valid JSON ({exc})") from None
    return Bundle(path=path, config=config, report=report, generation_config=gen)


def pick_providers(prefer_cuda: bool = True) -> list[str]:
    """CUDA first only when onnxruntime-gpu is installed; whether it actually works is checked on the real
    session (`OnnxRunner.providers`), because onnxruntime-gpu lists CUDA even where no device or driver exists."""
    import onnxruntime as ort

    if prefer_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _dims(value_info) -> list[Any]:
    return list(value_info.shape)


class OnnxRunner:
    """The Runner interface over the served graph: `prefill`, `decode`, `copy_prefix`, `release`.

    One engine thread calls it; it is not thread-safe.
    """

    def __init__(
        self,
        bundle: str | Path | Bundle,
        num_slots: int = 8,
        max_len: int | None = None,
        *,
        model_file: str = SERVED,
        threads: int = 1,
        providers: Sequence[str] | None = None,
        verify_hash: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, model_file, verify_hash)
        self.config = cfg = self.bundle.config
        self.num_slots = int(num_slots)
        self.max_len = int(max_len or cfg.max_position_embeddings)
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        if not 1 <= self.max_len <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_len must be in 1..{cfg.max_position_embeddings} (max_position_embeddings), got {max_len}"
            )
        self.model_file = self.bundle.file(model_file)
        # The served graph's attention design (bundles written before the slot op have no entry: gather).
        self.attention = self.bundle.report.get("served_graph", {}).get("attention", "gather")
        if self.attention not in ATTENTION_DESIGNS:
            raise BundleError(
                f"{self.bundle.file(REPORT)}: served_graph.attention is {self.attention!r}, this runner knows "
                f"{', '.join(ATTENTION_DESIGNS)}"
            )
        opts = ort.SessionOptions()
        # 2 cores shared: an unset pool oversubscribes (a prefill ran 25x slower); the caller says how many.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # The saved graph already carries the portable fusions; ALL adds this machine's kernel layouts
        # (decode at batch 1: 1.40 ms vs 1.65 ms with BASIC, demo shape, 1 thread).
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.attention == "slot":
            from export.custom_ops import default_library, find_library

            lib = find_library()
            if lib is None:
                raise BundleError(
                    f"{self.model_file}: its attention is the {CUSTOM_DOMAIN}::SlotAttention op, whose library "
                    f"{default_library()} is not built; build it with `python -m export.custom_ops build` "
                    "(make install does) or export the bundle with --attention gather"
                )
            opts.register_custom_ops_library(str(lib))
            # The op is a CPU kernel: on another provider onnxruntime would copy the whole cache to the CPU and
            # back around it at every call. The GPU path is the torch runner with the Triton kernels.
            providers = ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        requested = [p for p in (providers if providers is not None else pick_providers()) if p in available]
        if "CPUExecutionProvider" not in requested:
            requested.append("CPUExecutionProvider")  # the fallback for every node another provider lacks
        try:
            self.session = ort.InferenceSession(str(self.model_file), opts, providers=requested)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"{self.model_file}: onnxruntime cannot load it ({exc})") from None
        # What onnxruntime actually registered: CUDA is dropped here when its libraries or device are absent.
        self.providers = self.session.get_providers()
        self._inputs = SLOT_INPUTS if self.attention == "slot" else SERVED_INPUTS
        chunk = self._check_graph()

        n, kv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        # Positions per row of the bound past (read from the graph: 1 in bundles traced before chunking).
        self.kv_chunk = chunk
        cache_len = -(-self.max_len // chunk) * chunk  # whole chunks; positions >= max_len are never written
        # One array [layers, 2, slots, KV, cache_len, D] so a step writes every layer's keys and values with
        # one fancy-index assignment (batch 16, demo shape: 9 us, vs 21 us for one per layer and kind, timed
        # alone); k and v are views of it, and each layer's k or v is one contiguous block, bound below.
        self._kv = np.zeros((n, 2, self.num_slots, kv, cache_len, d), dtype=np.float32)
        # Commit the memory now (np.zeros maps pages lazily): otherwise each slot's first use page-faults in
        # the middle of serving, and the process's memory grows under load instead of being known at start.
        self._kv.fill(0.0)
        self.k, self.v = self._kv[:, 0], self._kv[:, 1]
        self.lengths = np.zeros(self.num_slots, dtype=np.int64)
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        # Two bindings of one session: prefill's inputs change shape every call, decode's stay bound while the
        # batch (its slots and chunk count) is unchanged, so a decode step only writes its tokens and positions.
        self._io = self.session.io_binding()
        self._dio = self.session.io_binding()
        # Bound once: OrtValues over the numpy memory (CPU), so in-place writes are seen by the next run.
        self._past = []
        for i in range(n):
            for kind, cache in (("key", self.k), ("value", self.v)):
                # slot: [slots, KV, cache_len, D] as it is; gather: its [slots*KV*cache_len/chunk, chunk*D] view
                view = cache[i] if self.attention == "slot" else cache[i].reshape(-1, chunk * d)
                ov = ort.OrtValue.ortvalue_from_numpy(view)
                self._io.bind_ortvalue_input(f"past_{kind}.{i}", ov)
                self._dio.bind_ortvalue_input(f"past_{kind}.{i}", ov)
                self._past.append(ov)
        self._out_shape: tuple[int, int] | None = None
        self._dec: _DecodeBinding | None = None
        # Chunk-row offsets of (slot, kv head) in the bound view: kv_index = base[slot, h] + chunk number.
        self._base = (np.arange(self.num_slots * kv, dtype=np.int64) * (cache_len // chunk)).reshape(
            self.num_slots, kv
        )

    # --- checks ------------------------------------------------------------------------------------------
    def _check_graph(self) -> int:
        """Inputs and outputs against config.json; returns the cache positions per row of the past inputs."""
        cfg, f = self.config, self.model_file
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        n = cfg.num_hidden_layers
        fixed = SLOT_INPUTS if self.attention == "slot" else SERVED_INPUTS
        want_in = [*fixed] + [f"past_{k}.{i}" for i in range(n) for k in ("key", "value")]
        missing = [name for name in want_in if name not in inputs]
        if missing:
            layers = sum(1 for name in inputs if name.startswith("past_key."))
            raise BundleError(
                f"{f}: graph lacks input(s) {', '.join(missing[:4])}; config.json has {n} layers, "
                f"the graph has {layers}, and {REPORT} says its attention is {self.attention!r}"
            )
        extra = sorted(set(inputs) - set(want_in))
        if extra:
            raise BundleError(
                f"{f}: graph has input(s) {', '.join(extra[:4])} that config.json ({n} layers) lacks"
            )
        if self.attention == "slot":
            past = _dims(inputs["past_key.0"])  # [slots, KV, cache_len, D]
            if len(past) != 4 or past[1] != cfg.num_key_value_heads or past[3] != cfg.head_dim:
                raise BundleError(
                    f"{f}: past_key.0 is {past}, config.json wants [slots, {cfg.num_key_value_heads}, "
                    f"cache_len, {cfg.head_dim}]"
                )
        past_d = _dims(inputs["past_key.0"])[-1]
        if not isinstance(past_d, int) or past_d % cfg.head_dim:
            raise BundleError(
                f"{f}: past_key.0 rows hold {past_d} values, not whole positions of head_dim {cfg.head_dim} "
                "(config.json)"
            )
        kv = _dims(inputs["kv_index"])[1] if self.attention == "gather" else cfg.num_key_value_heads
        if kv != cfg.num_key_value_heads:
            raise BundleError(f"{f}: kv_index has {kv} KV heads, config.json says {cfg.num_key_value_heads}")
        want_out = ["logits"] + [f"new_{k}.{i}" for i in range(n) for k in ("key", "value")]
        missing = [name for name in want_out if name not in outputs]
        if missing:
            raise BundleError(f"{f}: graph lacks output(s) {', '.join(missing[:4])}")
        vocab = _dims(outputs["logits"])[-1]
        if vocab != cfg.vocab_size:
            raise BundleError(f"{f}: logits have vocab {vocab}, config.json says {cfg.vocab_size}")
        # slot: the op reads positions directly, the cache needs no rounding to chunks
        return 1 if self.attention == "slot" else past_d // cfg.head_dim

    def _check_rows(self, slots: Sequence[int] | np.ndarray, ends: Sequence[int] | np.ndarray) -> None:
        # Vectorized: a per-row Python loop was a measurable part of the runner's ~0.2 ms per batch-16 step.
        slots_a, ends_a = np.asarray(slots, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        bad = np.flatnonzero((slots_a < 0) | (slots_a >= self.num_slots))
        if bad.size:
            raise ValueError(f"slot {int(slots_a[bad[0]])} out of range 0..{self.num_slots - 1}")
        over = np.flatnonzero(ends_a > self.max_len)
        if over.size:
            i = int(over[0])
            raise ValueError(
                f"slot {int(slots_a[i])}: position {int(ends_a[i]) - 1} is past the cache length {self.max_len}"
            )

    def _check_starts(self, slots: np.ndarray, starts: np.ndarray) -> None:
        """A row continues its slot: it may start at or before the slot's length, never past it (positions in
        between would be read unwritten), and a slot appears once per call (two rows would race to write it)."""
        if np.bincount(slots, minlength=self.num_slots).max() > 1:
            raise ValueError(f"slots {slots.tolist()} repeat a slot within one call")
        bad = np.nonzero((starts < 0) | (starts > self.lengths[slots]))[0]
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"slot {int(slots[i])} holds {int(self.lengths[slots[i]])} positions; a row cannot start at "
                f"position {int(starts[i])}"
            )

    # --- the Runner interface ----------------------------------------------------------------------------
    def _index(self, slots: np.ndarray, past_len: int) -> np.ndarray:
        """The gather graph's kv_index [B, KV, C]: the chunks covering past_len positions (the graph masks each
        row's positions >= its start)."""
        chunks = -(-past_len // self.kv_chunk)
        return self._base[slots][:, :, None] + np.arange(chunks, dtype=np.int64)

    def _new_shape(self, b: int, s: int) -> tuple[int, int, int, int]:
        cfg = self.config
        if self.attention == "slot":
            return (b, s, cfg.num_key_value_heads, cfg.head_dim)
        return (b, cfg.num_key_value_heads, s, cfg.head_dim)

    def _run(self, ids, pos, logits_index, slots, past_len):
        """The gather graph over right-padded rows [B, S]: logits [B, N, V] and the new keys/values."""
        index = self._index(slots, past_len)
        for name, arr in zip(self._inputs, (ids, pos, logits_index, index), strict=True):
            self._io.bind_cpu_input(name, np.ascontiguousarray(arr, dtype=np.int64))
        logits = self._bind_outputs(*ids.shape, logits_index.shape[1])
        self.session.run_with_iobinding(self._io)
        return logits, self._new

    def _bind_outputs(self, b: int, s: int, n: int) -> np.ndarray:
        """Bind the call's outputs on `_io`; returns the logits array [b, n, V] onnxruntime will write.

        New keys/values go into one numpy buffer bound once per shape (B, S): consecutive calls of the same
        shape rebind nothing and copy nothing out (saved about 0.2 ms per step at batch 1)."""
        ort = _ort()
        cfg = self.config
        if self._out_shape != (b, s):
            # new_{key,value}.{i} are views of one [layers, 2, B, KV, S, D] array (slot: [.., B, S, KV, D]).
            self._new = np.empty((cfg.num_hidden_layers, 2, *self._new_shape(b, s)), np.float32)
            self._io.clear_binding_outputs()
            for i in range(cfg.num_hidden_layers):
                for j, kind in enumerate(("key", "value")):
                    self._io.bind_ortvalue_output(
                        f"new_{kind}.{i}", ort.OrtValue.ortvalue_from_numpy(self._new[i, j])
                    )
            self._out_shape = (b, s)
        # The logits leave the runner (the engine may keep them): a fresh array bound per call, written by
        # onnxruntime directly (binding it costs ~2 us; copying a bound one out cost ~30 us at batch 16).
        logits = np.empty((b, n, cfg.vocab_size), np.float32)
        self._io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        return logits

    def _run_packed(
        self,
        rows: Sequence[Sequence[int]],
        slots: np.ndarray,
        starts: np.ndarray,
        lens: np.ndarray,
        logits_index: np.ndarray,
    ) -> np.ndarray:
        """The slot graph over rows packed into one row of T tokens: logits [N, V] at `logits_index` (token
        indices); writes every token's new keys/values into its slot. Rows are checked by the caller."""
        t = int(lens.sum())
        ids = np.fromiter((x for r in rows for x in r), dtype=np.int64, count=t)
        first = np.cumsum(lens) - lens
        # position of token j of row i = starts[i] + j
        pos = np.arange(t, dtype=np.int64) + np.repeat(starts - first, lens)
        for name, arr in zip(
            SLOT_INPUTS, (ids[None], pos[None], logits_index[None], slots, lens), strict=True
        ):
            self._io.bind_cpu_input(name, np.ascontiguousarray(arr, dtype=np.int64))
        logits = self._bind_outputs(1, t, len(logits_index))
        self.session.run_with_iobinding(self._io)
        # cache[:, :, slot, :, pos] <- new[:, :, 0, token]: [T, layers, 2, KV, D] on both sides
        self._kv[:, :, np.repeat(slots, lens), :, pos] = self._new[:, :, 0].transpose(2, 0, 1, 3, 4)
        return logits[0]

    @property
    def has_mixed_step(self) -> bool:
        """Whether `step` runs decode rows and prefill chunks as one forward (the slot graph packs any rows)."""
        return self.attention == "slot"

    def step(
        self,
        rows: Sequence[Sequence[int]],
        slots: Sequence[int],
        starts: Sequence[int],
        tokens: np.ndarray,
        decode_slots: np.ndarray,
        positions: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A continuous-batching step in one forward: prefill chunks (as `prefill`) and decode rows (as
        `decode`) packed together, so the weights are read once for both. Returns (logits of each chunk's
        last token [R, V], logits of the decode rows [B, V]). Slot graph only (`has_mixed_step`)."""
        if not self.has_mixed_step:
            raise ValueError(f"{self.model_file}: the gather graph runs prefill and decode as separate calls")
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        dslots = np.asarray(decode_slots, dtype=np.int64).reshape(-1)
        dpos = np.asarray(positions, dtype=np.int64).reshape(-1)
        r = len(rows)
        if not (r == len(slots) == len(starts)) or not (len(tokens) == len(dslots) == len(dpos)):
            raise ValueError(
                f"step: {r} rows, {len(slots)} slots, {len(starts)} starts; {len(tokens)} tokens, "
                f"{len(dslots)} decode slots, {len(dpos)} positions"
            )
        clens = np.array([len(x) for x in rows], dtype=np.int64)
        if (clens == 0).any():
            raise ValueError(f"step: row {int(np.argmin(clens))} is empty")
        all_slots = np.concatenate([dslots, np.asarray(slots, dtype=np.int64)])
        all_starts = np.concatenate([dpos, np.asarray(starts, dtype=np.int64)])
        lens = np.concatenate([np.ones(len(tokens), np.int64), clens])
        if len(lens) == 0:
            raise ValueError("step: nothing to run")
        self._check_rows(all_slots, all_starts + lens)
        self._check_starts(all_slots, all_starts)
        ends = np.cumsum(lens) - 1  # decode rows are tokens 0..B-1, each chunk's last token follows
        logits = self._run_packed([*tokens[:, None], *rows], all_slots, all_starts, lens, ends)
        self.lengths[all_slots] = all_starts + lens
        b = len(tokens)
        return logits[b:], logits[:b]

    def prefill(
        self,
        rows: Sequence[Sequence[int]],
        slots: Sequence[int],
        starts: Sequence[int],
        all_logits: bool = False,
    ) -> np.ndarray | list[np.ndarray]:
        """Row i's tokens go to positions starts[i].. of slot slots[i]; positions below starts[i] must already be
        in the slot. Returns float32 [B, V] (each row's last token) or, with all_logits, a list of [len_i, V]."""
        b = len(rows)
        if not (b == len(slots) == len(starts)) or b == 0:
            raise ValueError(
                f"prefill: {len(rows)} rows, {len(slots)} slots, {len(starts)} starts (need equal, >0)"
            )
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        if (lens == 0).any():
            raise ValueError(f"prefill: row {int(np.argmin(lens))} is empty")
        starts_a = np.asarray(starts, dtype=np.int64)
        slots_a = np.asarray(slots, dtype=np.int64)
        self._check_rows(slots_a, starts_a + lens)
        self._check_starts(slots_a, starts_a)
        if self.attention == "slot":
            first = np.cumsum(lens) - lens  # each row's first token in the packed call
            t = int(lens.sum())
            logits_index = np.arange(t, dtype=np.int64) if all_logits else first + lens - 1
            logits = self._run_packed(rows, slots_a, starts_a, lens, logits_index)
            self.lengths[slots_a] = starts_a + lens
            if all_logits:
                return [logits[first[i] : first[i] + lens[i]] for i in range(b)]
            return logits
        s = int(lens.max())
        ids = np.full((b, s), self.pad_id, dtype=np.int64)
        pos = np.full((b, s), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : lens[i]] = r
            pos[i, : lens[i]] = np.arange(starts_a[i], starts_a[i] + lens[i])
        if all_logits:
            logits_index = np.minimum(
                np.arange(s)[None, :], (lens - 1)[:, None]
            )  # padding -> last real token
        else:
            logits_index = (lens - 1)[:, None]
        logits, new_kv = self._run(ids, pos, logits_index, slots_a, int(starts_a.max()))
        b_idx, s_idx = np.nonzero(pos >= 0)
        slot_idx, pos_idx = slots_a[b_idx], pos[b_idx, s_idx]
        # cache[:, :, slot, :, pos] <- new[:, :, b, :, s]: both sides [N, layers, 2, KV, D]
        self._kv[:, :, slot_idx, :, pos_idx] = new_kv[:, :, b_idx, :, s_idx]
        self.lengths[slots_a] = starts_a + lens
        if all_logits:
            return [logits[i, : lens[i]] for i in range(b)]
        return logits[:, 0]

    def decode(self, tokens: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token per row at `positions` of `slots` -> float32 logits [B, V].

        The engine calls this every step with mostly the same slots, so it costs as little Python as it can:
        right after onnxruntime's run every numpy call here meets cold CPU caches, so each one costs several
        times what it does in a tight loop. One combined test accepts a valid batch; the detailed checks run only to name what is wrong. The inputs stay bound
        while the batch's slots and chunk count stay the same (`_DecodeBinding`)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        slots_a = np.asarray(slots, dtype=np.int64).reshape(-1)
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        b = len(tokens)
        if not (b == len(slots_a) == len(pos)) or b == 0:
            raise ValueError(f"decode: {len(tokens)} tokens, {len(slots_a)} slots, {len(pos)} positions")
        pmax = int(pos.max())
        if (
            slots_a.min() < 0
            or slots_a.max() >= self.num_slots
            or pmax >= self.max_len
            or pos.min() < 0
            or (pos > self.lengths[slots_a]).any()
            or np.bincount(slots_a).max() > 1
        ):
            self._check_rows(slots_a, pos + 1)
            self._check_starts(slots_a, pos)
        # gather: the chunks of past this batch reads (the graph masks positions >= each row's start)
        chunks = 0 if self.attention == "slot" else -(-pmax // self.kv_chunk)
        dec = self._dec
        if dec is None or dec.chunks != chunks or not np.array_equal(dec.slots, slots_a):
            dec = self._dec = _DecodeBinding(self, slots_a, chunks, dec)
        # [B, 1] for the gather graph, [1, B] (one packed row) for the slot graph: the same order either way
        dec.ids.reshape(-1)[:] = tokens
        dec.pos.reshape(-1)[:] = pos
        # The logits leave the runner (the engine may keep them): a fresh array per call (see `_run`).
        logits = np.empty((*dec.ids.shape, self.config.vocab_size), np.float32)
        self._dio.bind_ortvalue_output("logits", _ort().OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(self._dio)
        # cache[:, :, slot_b, :, pos_b] <- new[:, :, b, :, 0]: [B, layers, 2, KV, D] on both sides
        new = (
            dec.new[:, :, 0] if self.attention == "slot" else dec.new[:, :, :, :, 0]
        )  # [layers, 2, B, KV, D]
        self._kv[:, :, slots_a, :, pos] = new.transpose(2, 0, 1, 3, 4)
        self.lengths[slots_a] = pos + 1
        return logits.reshape(b, -1)

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Prefix-cache hit: the first `length` positions of `src_slot` into `dst_slot`."""
        self._check_rows([src_slot, dst_slot], [length, length])
        self.k[:, dst_slot, :, :length] = self.k[:, src_slot, :, :length]
        self.v[:, dst_slot, :, :length] = self.v[:, src_slot, :, :length]
        self.lengths[dst_slot] = length

    def release(self, slot: int) -> None:
        """Free a slot: only its length resets; stale entries are never read (the graph masks l >= start)."""
        self._check_rows([slot], [0])
        self.lengths[slot] = 0


def _ort():
    import onnxruntime as ort

    return ort


class _DecodeBinding:
    """Decode's bound inputs for one batch (its slots, in order, and the chunks of past it reads): token and
    position buffers the runner overwrites each step, kv_index and the zero logits_index computed once, and
    the new keys/values bound to one [layers, 2, B, KV, 1, D] array ([.., B, 1, KV, D] for the slot graph;
    reused from `prev` when B is the same). The slot graph reads no chunks: its binding changes with the slots
    only."""

    __slots__ = ("slots", "chunks", "ids", "pos", "new", "_keep")

    def __init__(
        self, runner: OnnxRunner, slots: np.ndarray, chunks: int, prev: _DecodeBinding | None
    ) -> None:
        ort = _ort()
        cfg, io = runner.config, runner._dio
        b = len(slots)
        self.slots, self.chunks = slots.copy(), chunks
        if runner.attention == "slot":  # one packed row of B one-token rows
            self.ids = np.zeros((1, b), np.int64)
            self.pos = np.zeros((1, b), np.int64)
            logits_index = np.arange(b, dtype=np.int64)[None]
            values = (self.ids, self.pos, logits_index, self.slots, np.ones(b, np.int64))
        else:
            self.ids = np.zeros((b, 1), np.int64)
            self.pos = np.zeros((b, 1), np.int64)
            kv_index = runner._index(self.slots, chunks * runner.kv_chunk)
            values = (self.ids, self.pos, np.zeros((b, 1), np.int64), kv_index)
        # The OrtValues must outlive the binding: kept on the instance.
        self._keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in values]
        for name, ov in zip(runner._inputs, self._keep, strict=True):
            io.bind_ortvalue_input(name, ov)
        new_shape = runner._new_shape(1, b) if runner.attention == "slot" else runner._new_shape(b, 1)
        if prev is not None and prev.new.shape[2:] == new_shape:
            self.new = prev.new
            self._keep += prev._keep[len(values) :]
        else:
            self.new = np.empty((cfg.num_hidden_layers, 2, *new_shape), np.float32)
            for i in range(cfg.num_hidden_layers):
                for j, kind in enumerate(("key", "value")):
                    ov = ort.OrtValue.ortvalue_from_numpy(self.new[i, j])
                    io.bind_ortvalue_output(f"new_{kind}.{i}", ov)
                    self._keep.append(ov)
