"""The engine: continuous batching over a runner, one `step()` = schedule, execute, update (vLLM's
EngineCore.step), run on its own thread so the asyncio side never blocks on the model.

- schedule: drop cancelled and timed-out sequences, admit waiting ones into free slots (prefix-cache lookup
  first), and split a per-step token budget: every decoding sequence costs 1, prefill chunks get the rest;
- execute: with a runner that packs rows (`has_mixed_step`: the ONNX slot graph), one `step` call for the
  decode rows and the prefill chunks together, so the weights are read once a step and no row is padded;
  otherwise one `prefill` call for the chunk rows and one `decode` call for all decoding rows, so a decode row
  is never padded to a chunk's length;
- update: sample every row that produced a next-token distribution in one vectorized call, detokenize
  incrementally, match stop tokens/strings, emit, free finished slots.

Outputs reach the API through `Sequence.deliver` (the API wraps an asyncio queue with
`loop.call_soon_threadsafe`), batched once per step per event loop.

Torch-free.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from model.sampling import SamplingParams, make_rng, sample, token_logprobs
from model.tokenizer import Tokenizer
from service.detokenizer import IncrementalDetokenizer, StopMatcher
from service.metrics import Metrics
from service.prefix_cache import PrefixCache
from service.runners.base import Runner

log = logging.getLogger("instructlm.engine")


class QueueFullError(Exception):
    """The waiting queue is at its bound: the API answers 429 with Retry-After."""


class DrainingError(Exception):
    """The engine is shutting down (or not started): the API answers 503."""


@dataclass(slots=True)
class Output:
    """One step's result for one sequence."""

    index: int  # choice index within the request
    text: str  # the new text (may be '' while a character or a possible stop string is held back)
    token: int | None  # the sampled token (None on an abort/error end)
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    step: int = 0  # the engine step that produced it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens copied from the prefix cache


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; 0..5: the chosen token's logprob plus that many alternatives
    index: int = 0
    deliver: Callable[[list[Output]], None] | None = None  # called on the engine thread unless `loop` is set
    loop: object | None = None  # an asyncio loop: deliver runs there via call_soon_threadsafe
    request_id: str = ""
    timeout_s: float = 0.0
    ignore_eos: bool = False
    # --- engine state -------------------------------------------------------------------------------------
    id: int = field(default_factory=itertools.count().__next__)
    arrival: float = field(default_factory=time.perf_counter)
    slot: int = -1
    computed: int = 0  # prompt tokens in the cache
    cached_tokens: int = 0
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    cancel_reason: str = "client_disconnect"
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    steps: list[int] = field(default_factory=list)  # the step of each emitted token (tests read it)

    def cancel(self, reason: str = "client_disconnect") -> None:
        self.cancel_reason = reason
        self.cancelled = True

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt)


class _SeqState:
    """Per-sequence helpers created at admission (kept out of the dataclass so it stays cheap to build)."""

    __slots__ = ("detok", "stopper", "rng")

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, stop_ids: frozenset[int]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_ids=stop_ids)
        self.stopper = StopMatcher(seq.stop)
        self.rng = make_rng(seq.params.seed)


class Engine:
    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int = 256,
        max_waiting: int = 64,
        prefix_cache_slots: int = 0,
        prefix_cache_min_tokens: int = 16,
        metrics: Metrics | None = None,
        stop_ids: tuple[int, ...] | None = None,
    ) -> None:
        if runner.num_slots < max_num_seqs + prefix_cache_slots:
            raise ValueError(
                f"runner has {runner.num_slots} slots; need {max_num_seqs} + {prefix_cache_slots} prefix slots"
            )
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_len = runner.max_len
        self.budget = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self.stop_ids = frozenset(tokenizer.stop_ids if stop_ids is None else stop_ids)
        self.prefix_cache = (
            PrefixCache(
                runner, list(range(max_num_seqs, max_num_seqs + prefix_cache_slots)), prefix_cache_min_tokens
            )
            if prefix_cache_slots
            else None
        )
        self.free_slots: deque[int] = deque(range(max_num_seqs))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._states: dict[int, _SeqState] = {}
        self._inbox: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self._num_queued = 0  # inbox + waiting, under _lock (the bound the API checks)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.accepting = True
        # Counters the tests and the benchmark read (plain ints: written on the engine thread only).
        self.step_count = 0
        self.prefill_tokens = 0  # prompt tokens run through the model (prefix-cache hits excluded)
        self.decode_rows = 0
        self.mixed_steps = 0  # steps whose prefill chunks and decode rows ran as one forward
        # "mixed": that one forward (what is prefill + decode in a step that runs them apart)
        self.timings = {"schedule": 0.0, "prefill": 0.0, "mixed": 0.0, "decode": 0.0, "update": 0.0}

    # --- the API side (any thread) --------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences (its n choices) together, or none of them."""
        with self._lock:
            if not self.accepting:
                self.metrics.failure.labels(reason="draining").inc()
                raise DrainingError("the server is shutting down")
            if self._num_queued + len(seqs) > self.max_waiting:
                self.metrics.failure.labels(reason="queue_full").inc()
                raise QueueFullError(f"{self._num_queued} requests are waiting (limit {self.max_waiting})")
            self._num_queued += len(seqs)
            self._inbox.extend(seqs)
        self.metrics.waiting.set(self._num_queued)
        self._wake.set()

    def abort(self, seq: Sequence, reason: str = "client_disconnect") -> None:
        if seq.finish_reason is None:
            seq.cancel(reason)
            self._wake.set()

    @property
    def num_waiting(self) -> int:
        return self._num_queued

    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.running)

    # --- thread ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="instructlm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()
            if not self.has_work():
                self._wake.wait(0.5)
                continue
            self.step()

    def warmup(self) -> None:
        """Real forwards at the largest shapes a step can have (a full-budget prefill chunk, a decode over every
        slot), so /health reports ready only once the model runs, and the runtime's memory arena has grown
        before the first burst instead of during it (the first 16-row prefill took 540 ms cold, 70 ms warm)."""
        tok = self.tokenizer.im_start_id
        slot = self.free_slots[0]
        n = max(1, min(self.budget, self.max_len - 1))
        self.runner.prefill([[tok] * n], [slot], [0])
        self.runner.release(slot)
        slots = np.array(list(self.free_slots), dtype=np.int64)
        zeros = np.zeros(len(slots), dtype=np.int64)
        self.runner.decode(np.full(len(slots), tok, dtype=np.int64), slots, zeros)
        for s in slots.tolist():
            self.runner.release(s)

    # --- step -----------------------------------------------------------------------------------------------
    def step(self) -> int:
        """Schedule, execute, update. Returns the number of rows run."""
        t0 = time.perf_counter()
        self.step_count += 1
        self.metrics.steps.inc()
        outputs: list[tuple[Sequence, Output]] = []
        self._drain_inbox()
        self._drop_cancelled(outputs, t0)
        self._admit(t0)
        decoding = [s for s in self.running if s.prefilled]
        budget = self.budget - len(decoding)
        chunks: list[tuple[Sequence, int]] = []  # (sequence, chunk length)
        for s in self.running:
            if budget <= 0:
                break
            if not s.prefilled:
                n = min(len(s.prompt) - s.computed, budget)
                chunks.append((s, n))
                budget -= n
        t1 = time.perf_counter()

        mixed = bool(chunks and decoding and getattr(self.runner, "has_mixed_step", False))
        try:
            sample_rows: list[Sequence] = []
            logits_parts: list[np.ndarray] = []
            if decoding:
                tokens = np.fromiter((s.output[-1] for s in decoding), dtype=np.int64, count=len(decoding))
                slots = np.fromiter((s.slot for s in decoding), dtype=np.int64, count=len(decoding))
                positions = np.fromiter(
                    (len(s.prompt) + len(s.output) - 1 for s in decoding), dtype=np.int64, count=len(decoding)
                )
            if chunks:
                rows = [s.prompt[s.computed : s.computed + n] for s, n in chunks]
                cslots, cstarts = [s.slot for s, _ in chunks], [s.computed for s, _ in chunks]
                if mixed:  # one forward: the prompt tokens ride along with the decode rows' weight reads
                    logits_p, logits_d = self.runner.step(rows, cslots, cstarts, tokens, slots, positions)
                else:
                    logits_p = self.runner.prefill(rows, cslots, cstarts)
                done = []
                for i, (s, n) in enumerate(chunks):
                    s.computed += n
                    self.prefill_tokens += n
                    if s.prefilled:
                        done.append(i)
                        sample_rows.append(s)
                        if self.prefix_cache is not None:
                            self.prefix_cache.insert(s.prompt, s.slot)
                if done:
                    logits_parts.append(np.asarray(logits_p)[done])
            t2 = time.perf_counter()
            if decoding:
                if not mixed:
                    logits_d = self.runner.decode(tokens, slots, positions)
                logits_parts.append(logits_d)
                sample_rows.extend(decoding)
                self.decode_rows += len(decoding)
            t3 = time.perf_counter()
        except Exception:
            log.exception(
                "engine step %d failed; failing its %d running sequences", self.step_count, len(self.running)
            )
            for s in list(self.running):
                self._finish(s, "error", outputs, time.perf_counter(), emit_token=None)
            self._dispatch(outputs)
            return 0

        if sample_rows:
            self._update(sample_rows, np.concatenate(logits_parts, axis=0), outputs)
        self._dispatch(outputs)
        self._set_gauges()
        t4 = time.perf_counter()  # update = sample + detokenize + stop checks + emit + gauges
        tm, ph = self.timings, self.metrics.phase
        self.mixed_steps += mixed
        for name, dt in (
            ("schedule", t1 - t0),
            ("mixed" if mixed else "prefill", t2 - t1),
            ("decode", t3 - t2),
            ("update", t4 - t3),
        ):
            tm[name] += dt
            ph[name].inc(dt)
        return sum(n for _, n in chunks) + len(decoding)

    # --- schedule helpers -----------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while self._inbox:
            self.waiting.append(self._inbox.popleft())

    def _drop_cancelled(self, outputs: list[tuple[Sequence, Output]], now: float) -> None:
        for s in list(self.running):
            if s.cancelled:
                self._finish(s, "abort", outputs, now, emit_token=None)
            elif s.timeout_s and now - s.arrival > s.timeout_s:
                self.metrics.failure.labels(reason="timeout").inc()
                self._finish(s, "length", outputs, now, emit_token=None)
        if any(s.cancelled or (s.timeout_s and now - s.arrival > s.timeout_s) for s in self.waiting):
            keep: deque[Sequence] = deque()
            for s in self.waiting:
                if s.cancelled:
                    self._dequeued(1)
                    self._count_abort(s)
                    s.finish_reason = "abort"
                    outputs.append(
                        (s, Output(s.index, "", None, finish_reason="abort", step=self.step_count))
                    )
                elif s.timeout_s and now - s.arrival > s.timeout_s:
                    self._dequeued(1)
                    self.metrics.failure.labels(reason="timeout").inc()
                    s.finish_reason = "length"
                    outputs.append(
                        (
                            s,
                            Output(
                                s.index,
                                "",
                                None,
                                finish_reason="length",
                                step=self.step_count,
                                prompt_tokens=len(s.prompt),
                            ),
                        )
                    )
                else:
                    keep.append(s)
            self.waiting = keep

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._num_queued -= n

    def _count_abort(self, s: Sequence) -> None:
        if s.cancel_reason == "client_disconnect":
            self.metrics.disconnects.inc()
        self.metrics.failure.labels(reason=s.cancel_reason).inc()

    def _admit(self, now: float) -> None:
        while self.waiting and self.free_slots:
            s = self.waiting.popleft()
            self._dequeued(1)
            s.slot = self.free_slots.popleft()
            self._states[s.id] = _SeqState(s, self.tokenizer, self.stop_ids)
            if self.prefix_cache is not None:
                hit = self.prefix_cache.lookup(s.prompt, s.slot)
                self.metrics.prefix_queries.inc()
                if hit:
                    self.metrics.prefix_hits.inc()
                    self.metrics.prefix_hit_tokens.inc(hit)
                s.computed = s.cached_tokens = hit
            self.running.append(s)
            self.metrics.queue_time.observe(now - s.arrival)
            self.metrics.prompt_tokens.inc(len(s.prompt))
            self.metrics.req_prompt_tokens.observe(len(s.prompt))

    # --- update ---------------------------------------------------------------------------------------------
    def _update(
        self, rows: list[Sequence], logits: np.ndarray, outputs: list[tuple[Sequence, Output]]
    ) -> None:
        params = [s.params for s in rows]
        rngs = [self._states[s.id].rng for s in rows]
        penalized = any(
            p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty for p in params
        )
        tokens = sample(
            logits,
            params,
            rngs,
            output_tokens=[s.output for s in rows] if penalized else None,
            prompt_tokens=[s.prompt for s in rows] if penalized else None,
        )
        want_lp = [i for i, s in enumerate(rows) if s.logprobs is not None]
        lp_chosen = lp_ids = lp_vals = None
        if want_lp:
            top_n = max(rows[i].logprobs or 0 for i in want_lp)
            lp_chosen, lp_ids, lp_vals = token_logprobs(logits[want_lp], tokens[want_lp], top_n)
        lp_row = {r: j for j, r in enumerate(want_lp)}
        now = time.perf_counter()
        m = self.metrics
        m.generation_tokens.inc(len(rows))
        for i, s in enumerate(rows):
            tok = int(tokens[i])
            s.output.append(tok)
            s.steps.append(self.step_count)
            if s.first_token_at == 0.0:
                s.first_token_at = now
                m.ttft.observe(now - s.arrival)
            else:
                m.itl.observe(now - s.last_token_at)
            s.last_token_at = now
            st = self._states[s.id]
            out = Output(s.index, "", tok, step=self.step_count)
            if i in lp_row:
                j = lp_row[i]
                out.logprob = float(lp_chosen[j])
                k = s.logprobs or 0
                out.top = [(int(a), float(b)) for a, b in zip(lp_ids[j, :k], lp_vals[j, :k], strict=True)]
            reason = None
            if tok in self.stop_ids and not s.ignore_eos:
                reason = "stop"
            else:
                text, hit = st.stopper.push(st.detok.push(tok))
                out.text = text
                if hit:
                    reason = "stop"
            if reason is None and (
                len(s.output) >= s.max_tokens or len(s.prompt) + len(s.output) >= self.max_len
            ):
                reason = "length"
            if reason is not None:
                if reason == "length" or (tok in self.stop_ids and not s.ignore_eos):
                    out.text += st.stopper.push(st.detok.flush())[0] + st.stopper.flush()
                self._finish(s, reason, outputs, now, emit_token=out)
            else:
                outputs.append((s, out))

    def _finish(
        self,
        s: Sequence,
        reason: str,
        outputs: list[tuple[Sequence, Output]],
        now: float,
        emit_token: Output | None,
    ) -> None:
        s.finish_reason = reason
        out = emit_token or Output(s.index, "", None, step=self.step_count)
        out.finish_reason = reason
        out.prompt_tokens = len(s.prompt)
        out.completion_tokens = len(s.output)
        out.cached_tokens = s.cached_tokens
        outputs.append((s, out))
        self.running.remove(s)
        self._states.pop(s.id, None)
        self.runner.release(s.slot)
        # Most recently freed first: its cache rows are still in the CPU caches, and under light load a few
        # slots serve every request instead of all of them taking turns.
        self.free_slots.appendleft(s.slot)
        m = self.metrics
        if reason in ("stop", "length"):
            m.success.labels(finished_reason=reason).inc()
            m.e2e.observe(now - s.arrival)
            m.req_generation_tokens.observe(len(s.output))
        elif reason == "abort":
            self._count_abort(s)
        else:
            m.failure.labels(reason="error").inc()

    def _dispatch(self, outputs: list[tuple[Sequence, Output]]) -> None:
        if not outputs:
            return
        by_loop: dict[int, tuple[object, list[tuple[Callable, list[Output]]]]] = {}
        per_seq: dict[int, tuple[Sequence, list[Output]]] = {}
        for s, out in outputs:
            per_seq.setdefault(s.id, (s, []))[1].append(out)
        for s, outs in per_seq.values():
            if s.deliver is None:
                continue
            if s.loop is None:
                s.deliver(outs)
            else:
                by_loop.setdefault(id(s.loop), (s.loop, []))[1].append((s.deliver, outs))
        for loop, calls in by_loop.values():
            # A closed loop (its server stopped) has nobody left to deliver to.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver_all, calls)  # type: ignore[attr-defined]

    def _set_gauges(self) -> None:
        m = self.metrics
        m.running.set(len(self.running))
        m.waiting.set(self._num_queued)
        m.kv_cache_usage = len(self.running) / self.max_num_seqs
        m.kv_usage.set(m.kv_cache_usage)


def _deliver_all(calls: list[tuple[Callable, list[Output]]]) -> None:
    for deliver, outs in calls:
        deliver(outs)
