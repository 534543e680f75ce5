"""Serving benchmark (in the manner of vLLM's `bench serve`): a live `instructlm serve` over the demo-shape bundle,
a fixed prompt set at concurrency 1, 4, 16, 64, and in the same run the baselines on the same weights.

    PYTHONPATH=. .venv/bin/python bench/serve.py [--model runs/demo/bundle] [--threads 1] [--write]
        [--llama-server /tmp/llbuild/bin/llama-server]

Without --model (or when runs/demo/bundle is missing) it builds a random-weight model of the demo shape (6.5M
parameters; speed does not depend on the weights) with a tokenizer trained on data/seed, exports it, and uses
that. Requests are greedy with `ignore_eos` so every one generates exactly --max-tokens tokens; each stream sends
8 of them over one kept-alive connection (--requests-per-level, --no-keep-alive).

Reported: TTFT, TPOT and ITL p50/p99 (client side, SSE), output tokens/s and requests/s per concurrency; the
bare ONNX runner's decode step at batch 1 and 16; transformers `generate`; llama.cpp via llama-cpp-python on the
GGUF export when it is installed (the optional `bench` extra); the engine's per-step profile from /metrics.
With --llama-server (a `llama-server` binary built from llama.cpp's source; it is not on PyPI), llama.cpp's own
HTTP server runs on the same f32 GGUF with 16 slots and continuous batching, and gets the same requests at
concurrency 16 right after ours in every sweep.
--write replaces the serving section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds export.py: with this script's folder first on sys.path, `import export` would find it.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
PROMPTS = [
    "How do I reset my voicemail PIN?",
    "What plans does Kestrel Mobile offer?",
    "My bill is higher than usual this month. Why?",
    "Can I keep my number if I switch to Kestrel?",
    "Write a short note announcing longer store hours.",
    "Translate to German: Where is the nearest store?",
    "How do I turn on Wi-Fi calling?",
    "Is roaming included in the Flex plan?",
    "Summarize the benefits of eSIM in two sentences.",
    "My phone shows no service after the update.",
    "Translate to Chinese: Thank you for waiting.",
    "How do I pay my bill with a card?",
    "Write a friendly reply to a customer who lost their phone.",
    "What is the Travel Pass and how much does it cost?",
    "How can I check my data usage?",
    "Explain what a SIM lock is.",
]


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores (load average {load}: shared with other jobs), "
        f"Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, {platform.system()} {platform.release()}"
    )


# --- the model ----------------------------------------------------------------------------------------------
def build_demo_model(root: Path) -> tuple[Path, Path]:
    """A random demo-shape checkpoint (tokenizer trained on the seed data) and its bundle."""
    import torch

    from export.onnx_export import export_bundle
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.tokenizer import train_tokenizer
    from model.transformer import Transformer

    texts = []
    for f in sorted((ROOT / "data" / "seed").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            texts.extend(v for v in rec.values() if isinstance(v, str))
    tok = train_tokenizer(texts, vocab_size=8192, min_frequency=2, model_max_length=1024)
    tok.save(root / "tokenizer", model_max_length=1024)
    cfg = preset(
        "demo", eos_token_id=[tok.eos_id, tok.endoftext_id], pad_token_id=tok.pad_id
    )  # vocab 8192 whatever the tokenizer learnt: the cost is the model's
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    ckpt = save_checkpoint(model, root / "checkpoint", tokenizer_dir=root / "tokenizer")
    export_bundle(ckpt, root / "bundle", threads=1)
    return ckpt, root / "bundle"


# --- baselines ----------------------------------------------------------------------------------------------
class Bare:
    """The bare runner kept open, so it can be measured right before and after each load level: on a shared
    machine the baseline must come from the same minutes as the served numbers it divides."""

    def __init__(
        self, bundle: Path, threads: int, prompt_ids: list[list[int]], cpus: set[int] | None = None
    ) -> None:
        from export.runtime import OnnxRunner

        self.runner = OnnxRunner(bundle, num_slots=16, max_len=1024, threads=threads)
        self.prompts = prompt_ids
        self.cpus = cpus  # with --engine-cpus: measured on the CPUs the server's engine runs on

    def measure(self, batch: int, steps: int) -> tuple[float, float]:
        """(median step seconds, mean tokens/s) of `steps` greedy decode steps after a real prefill: called with
        max_tokens - 1, the steps decode the same positions the served requests do (a step's cost grows with
        its context, so fewer steps would time shorter contexts than the server runs). The first 4 are warm-up."""
        if self.cpus:
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, self.cpus)
            try:
                return self._measure(batch, steps)
            finally:
                os.sched_setaffinity(0, before)
        return self._measure(batch, steps)

    def _measure(self, batch: int, steps: int) -> tuple[float, float]:
        r = self.runner
        rows = [self.prompts[i % len(self.prompts)] for i in range(batch)]
        for slot in range(batch):
            r.release(slot)
        tokens = np.asarray(r.prefill(rows, list(range(batch)), [0] * batch)).argmax(-1)
        pos, slots, times = np.array([len(x) for x in rows]), np.arange(batch), []
        for _ in range(steps):
            t0 = time.perf_counter()
            tokens = r.decode(tokens, slots, pos).argmax(-1)
            times.append(time.perf_counter() - t0)
            pos = pos + 1
        times = times[4:]
        return statistics.median(times), batch * len(times) / sum(times)


def transformers_generate(ckpt: Path, threads: int, prompt_ids: list[int], new: int) -> float | None:
    """Tokens/s of `transformers` greedy generate (batch 1, its own KV cache), same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ids = torch.tensor([prompt_ids])
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        t0 = time.perf_counter()
        model.generate(ids, **kw)
    return new / (time.perf_counter() - t0)


def gguf_f32(ckpt: Path, root: Path) -> Path:
    """The f32 GGUF export of the checkpoint (what `instructlm export gguf --type f32` writes), made once."""
    from export.gguf_export import export_gguf

    gguf = root / "model.f32.gguf"
    if not gguf.exists():
        export_gguf(ckpt, gguf, weight_type="f32")
    return gguf


def llama_cpp(ckpt: Path, root: Path, threads: int, prompts: list[list[int]], new: int) -> dict | str:
    """llama.cpp on the f32 GGUF export of the same weights: one stream (the high-level API, greedy), and 16
    sequences decoded together through one `llama_decode` per step (the low-level batch API)."""
    try:
        import llama_cpp as L
        from llama_cpp import Llama
    except ImportError:
        return "llama-cpp-python is not installed (`pip install -e '.[bench]'`, about 12 minutes to compile)"
    gguf = gguf_f32(ckpt, root)
    out: dict = {"version": L.__version__}
    llm = Llama(
        model_path=str(gguf),
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    llm.eval(prompts[0])
    t0 = time.perf_counter()
    for _ in range(new):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    out["single_step_s"] = (time.perf_counter() - t0) / new
    del llm

    n_seq = 16
    try:
        params = L.llama_context_default_params()
        params.n_ctx = 2048
        params.n_batch = 2048
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads
        model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        ctx = L.llama_init_from_model(model, params)
        vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        batch = L.llama_batch_init(2048, 0, n_seq)

        def run(rows: list[tuple[int, int, int, bool]]) -> None:
            for i, (token, pos, seq, logits) in enumerate(rows):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, logits
            batch.n_tokens = len(rows)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        def argmax(i: int) -> int:
            return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax())

        rows, pos = [], []
        for s in range(n_seq):
            p = prompts[s % len(prompts)]
            rows += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
            pos.append(len(p))
        run(rows)
        last = np.cumsum([len(prompts[s % len(prompts)]) for s in range(n_seq)]) - 1
        toks = [argmax(int(i)) for i in last]
        times = []
        for _ in range(new):
            t0 = time.perf_counter()
            run([(toks[s], pos[s], s, True) for s in range(n_seq)])
            toks = [argmax(s) for s in range(n_seq)]
            times.append(time.perf_counter() - t0)
            pos = [p + 1 for p in pos]
        out["batch16_step_s"] = statistics.median(times[4:])
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    except (AttributeError, RuntimeError) as exc:
        out["batch16_error"] = f"{type(exc).__name__}: {exc}"
    return out


# --- the server ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    bundle: Path, threads: int, max_seqs: int, engine_cpus: str | None = None, root: Path = ROOT
) -> tuple[subprocess.Popen, str, float]:
    """`instructlm serve` from the source tree `root` (another checkout: bench/serve_ab.py)."""
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "INSTRUCTLM_LOG_LEVEL": "warning",
        "PYTHONPATH": str(root),
    }
    cmd = [
        sys.executable, "-m", "instructlm", "serve", "--model", str(bundle), "--port", str(port),
        "--threads", str(threads), "--max-num-seqs", str(max_seqs), "--served-model-name", "bench",
    ] + (["--engine-cpus", engine_cpus] if engine_cpus else [])  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return wait_healthy(proc, f"http://127.0.0.1:{port}", t0, "server", lambda: proc.stderr.read()[-2000:])


def wait_healthy(
    proc: subprocess.Popen, url: str, t0: float, name: str, tail
) -> tuple[subprocess.Popen, str, float]:
    """Poll `url`/health until 200 (both servers answer 503 while loading); exit naming `name` and the end of
    its log (`tail()`) if it dies or is not ready in 120 s."""
    import httpx

    while time.perf_counter() - t0 < 120:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}): {tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{name} not ready in 120 s: {tail()}")


def start_llama_server(
    binary: Path, gguf: Path, threads: int, slots: int, per_slot_ctx: int, log: Path
) -> tuple[subprocess.Popen, str, float]:
    """llama.cpp's own server on the GGUF: `slots` slots of `per_slot_ctx` positions each (as ours: the model's
    window per slot), continuous batching, the GGUF's chat template through jinja, `threads` compute threads."""
    port = free_port()
    cmd = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", "bench",
        "--parallel", str(slots), "-c", str(slots * per_slot_ctx), "--cont-batching",
        "--threads", str(threads), "--threads-batch", str(threads), "--jinja", "--no-webui",
    ]  # fmt: skip
    t0 = time.perf_counter()
    # Its log goes to a file: it writes a line per request, which would fill a pipe nobody reads.
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    return wait_healthy(proc, f"http://127.0.0.1:{port}", t0, "llama-server", lambda: log.read_text()[-2000:])


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Connection:
    """One client's HTTP/1.1 connection to a server, reused for its requests (keep-alive, as vLLM's `bench serve`
    and the OpenAI SDK do) unless `keep_alive` is off. The client shares the 2 cores with the server, so it does
    as little as it can: no HTTP library, no JSON per token; only the usage chunk is parsed."""

    def __init__(self, host: str, port: int, keep_alive: bool = True) -> None:
        self.host, self.port, self.keep_alive = host, port, keep_alive
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def request(self, prompt: str, max_tokens: int) -> dict:
        body = json.dumps(
            {
                "model": "bench",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        for _ in range(2):
            reused = self.writer is not None
            t0 = time.perf_counter()
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Connection: %s\r\nContent-Length: %d\r\n\r\n%s"
                    % (b"keep-alive" if self.keep_alive else b"close", len(body), body)
                )
                status = await self.reader.readline()
            except ConnectionError:
                if not reused:
                    raise
                status = b""
            if status or not reused:
                break
            # The server closed the kept connection after its last response (llama-server does after a
            # stream, whatever its Keep-Alive header says): open a new one and send again, as HTTP clients do.
            await self.close()
        reader = self.reader
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP {status!r}: {(await reader.read(300))!r}")
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip().lower()
        if headers.get("transfer-encoding") != "chunked":
            raise RuntimeError(f"expected a chunked SSE response, got headers {headers}")
        times: list[float] = []
        usage = None
        while True:  # one chunk at a time; the servers send each SSE event in one chunk
            size = int((await reader.readline()).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            for ev in data.split(b"\n"):
                if not ev.startswith(b"data: {"):
                    continue
                if b'"usage":{' in ev:
                    usage = json.loads(ev[6:])["usage"]
                elif b'"content":' in ev and b'"role":"assistant"' not in ev:
                    times.append(time.perf_counter())
        end = time.perf_counter()
        if not self.keep_alive or headers.get("connection") == "close":
            await self.close()
        n = usage["completion_tokens"] if usage else len(times)
        prompt_n = usage.get("prompt_tokens") if usage else None
        return {"start": t0, "times": times, "end": end, "tokens": n, "prompt_tokens": prompt_n}


async def load(
    url: str, concurrency: int, num_requests: int, max_tokens: int, keep_alive: bool = True
) -> tuple[list[dict], float]:
    host, port = url.removeprefix("http://").split(":")
    queue = list(range(num_requests))
    results: list[dict] = []

    async def worker():
        conn = Connection(host, int(port), keep_alive)
        try:
            while queue:
                i = queue.pop()
                results.append(await conn.request(PROMPTS[i % len(PROMPTS)], max_tokens))
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def summarize(results: list[dict], wall: float) -> dict:
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    tpot = [(r["end"] - r["times"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1 and r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return float(np.percentile(xs, q)) * 1000 if xs else float("nan")

    prompt_n = [r["prompt_tokens"] for r in results if r.get("prompt_tokens") is not None]
    return {
        "requests": len(results),
        "tokens_per_request": tokens / max(len(results), 1),
        "prompt_tokens_mean": statistics.fmean(prompt_n) if prompt_n else float("nan"),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
        "out_tok_s": tokens / wall,
        "req_s": len(results) / wall,
    }


def scrape_profile(url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name == "instructlm_engine_step_seconds_total":
                out[s.labels["phase"]] = s.value
            elif s.name == "instructlm_engine_steps_total":
                out["steps"] = s.value
            elif s.name == "instructlm_generation_tokens_total":
                out["tokens"] = s.value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", help="bundle directory (default runs/demo/bundle, else a random demo-shape one)"
    )
    ap.add_argument("--checkpoint", help="the bundle's checkpoint (for the transformers/llama.cpp baselines)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--requests-per-level",
        type=int,
        default=0,
        help="0: max(8, 8 x concurrency): every stream sends 8 requests, so the start and the tail of a sweep "
        "(streams joining and leaving) weigh little against the steady state the bare rate is",
    )
    ap.add_argument(
        "--engine-cpus",
        help="the server's engine_cpus (auto, or a list like 1): the engine on CPUs of its own; the load generator "
        "then runs on the others and the bare runner on the engine's (default: off)",
    )
    ap.add_argument(
        "--no-keep-alive",
        action="store_true",
        help="a new connection per request (default: each stream keeps one, as vLLM's bench and the OpenAI SDK)",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="sweeps; tables give medians, ratios median [min-max]"
    )
    ap.add_argument("--write", action="store_true", help="replace the serving section of docs/BENCHMARKS.md")
    ap.add_argument(
        "--llama-server",
        type=Path,
        help="path of a llama.cpp `llama-server` binary: run it as a baseline at concurrency 16 (needs 16 in "
        "--concurrency)",
    )
    args = ap.parse_args()
    if args.llama_server and 16 not in args.concurrency:
        ap.error("--llama-server compares at concurrency 16: add 16 to --concurrency")
    if args.llama_server and not (args.llama_server.is_file() and os.access(args.llama_server, os.X_OK)):
        ap.error(f"--llama-server {args.llama_server}: not an executable file")
    command = "PYTHONPATH=. .venv/bin/python bench/serve.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"machine: {machine()}\ncommand: {command}\n", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    bundle = Path(args.model) if args.model else ROOT / "runs/demo/bundle"
    ckpt = Path(args.checkpoint) if args.checkpoint else ROOT / "runs/demo/checkpoint"
    if not (bundle / "model.onnx").exists() or not (ckpt / "model.safetensors").exists():
        print("building a random demo-shape checkpoint and bundle ...", flush=True)
        ckpt, bundle = build_demo_model(tmp)
        source = "random-weight demo shape (6.5M parameters, vocab 8192), f32"
    else:
        source = f"{bundle} (f32)"
    from model.chat import encode_chat
    from model.tokenizer import Tokenizer

    tok = Tokenizer.load(bundle)
    prompt_ids = [encode_chat(tok, [{"role": "user", "content": p}], True).ids for p in PROMPTS]

    print("baseline: transformers generate ...", flush=True)
    hf_tok_s = transformers_generate(ckpt, args.threads, prompt_ids[0], args.max_tokens)
    print("baseline: llama.cpp ...", flush=True)
    llama = llama_cpp(ckpt, tmp, args.threads, prompt_ids, args.max_tokens)
    plan = None
    if args.engine_cpus:
        from service.affinity import cpu_plan

        plan = cpu_plan(args.engine_cpus, args.threads)
        if plan is None:
            ap.error(f"--engine-cpus {args.engine_cpus}: this machine has no CPU to set aside")
    args.cpu_plan = plan
    bare = Bare(bundle, args.threads, prompt_ids, plan[0] if plan else None)

    lls = None  # llama.cpp's server: (process, url, seconds to ready)
    if args.llama_server:
        print("baseline: llama.cpp's server ...", flush=True)
        window = json.loads((ckpt / "config.json").read_text())["max_position_embeddings"]
        gguf = gguf_f32(ckpt, tmp)
        lls = start_llama_server(args.llama_server, gguf, args.threads, 16, window, tmp / "llama-server.log")
    lls_runs: list[dict] = []

    proc, url, ready_s = start_server(bundle, args.threads, max(args.concurrency), args.engine_cpus)
    if plan:
        # The load generator off the engine's CPUs, as the server's own HTTP side (llama-server, started
        # above, keeps every CPU).
        os.sched_setaffinity(0, plan[1])
    per_c: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    prof_c: dict[int, dict] = {c: {} for c in args.concurrency}
    ratios: dict[str, list[float]] = {"itl": [], "tpot": [], "tps16": [], "vs_llama_server": []}
    bare_seen: dict[int, list[tuple[float, float]]] = {1: [], 16: []}
    try:
        # Warm-up, one unmeasured round at each level: sessions, allocator, the
        # batch shapes and the slots' cache pages are first touched here, not in the first measured sweep.
        for c in args.concurrency:
            asyncio.run(load(url, c, c, args.max_tokens))
        if lls:
            asyncio.run(load(lls[1], 2, 4, 8))
        for rep in range(args.repeat):
            for c in args.concurrency:
                n = args.requests_per_level or max(8, 8 * c)
                b = 1 if c == 1 else 16 if c == 16 else None
                pre = bare.measure(b, args.max_tokens - 1) if b else None
                before = scrape_profile(url)
                results, wall = asyncio.run(load(url, c, n, args.max_tokens, not args.no_keep_alive))
                after = scrape_profile(url)
                post = bare.measure(b, args.max_tokens - 1) if b else None
                for k in after:
                    prof_c[c][k] = prof_c[c].get(k, 0) + after.get(k, 0) - before.get(k, 0)
                st = summarize(results, wall)
                per_c[c].append(st)
                if b:
                    step = (pre[0] + post[0]) / 2
                    rate = (pre[1] + post[1]) / 2
                    bare_seen[b].append((step, rate))
                    if b == 1:
                        ratios["itl"].append(st["itl_p50_ms"] / (step * 1000))
                        ratios["tpot"].append(st["tpot_p50_ms"] / (step * 1000))
                    else:
                        ratios["tps16"].append(st["out_tok_s"] / rate)
                print(
                    f"rep {rep} c={c:<3} ttft p50 {st['ttft_p50_ms']:.1f} ms  itl p50 {st['itl_p50_ms']:.2f} ms  "
                    f"tpot p50 {st['tpot_p50_ms']:.2f} ms  {st['out_tok_s']:.0f} tok/s"
                    + (f"  (bare b={b}: {step * 1000:.2f} ms, {rate:.0f} tok/s)" if b else ""),
                    flush=True,
                )
                if lls and c == 16:
                    # Right after ours, same prompts, same count, same max_tokens, greedy with ignore_eos.
                    theirs = summarize(
                        *asyncio.run(load(lls[1], c, n, args.max_tokens, not args.no_keep_alive))
                    )
                    lls_runs.append(theirs)
                    ratios["vs_llama_server"].append(st["out_tok_s"] / theirs["out_tok_s"])
                    print(
                        f"rep {rep} c={c:<3} llama-server: ttft p50 {theirs['ttft_p50_ms']:.1f} ms  itl p50 "
                        f"{theirs['itl_p50_ms']:.2f} ms  tpot p50 {theirs['tpot_p50_ms']:.2f} ms  "
                        f"{theirs['out_tok_s']:.0f} tok/s  (ours / theirs {ratios['vs_llama_server'][-1]:.2f})",
                        flush=True,
                    )
    finally:
        stop(proc)
        if lls:
            stop(lls[0])
    rows = [
        (c, {k: statistics.median(x[k] for x in per_c[c]) for k in per_c[c][0]}, prof_c[c]) for c in per_c
    ]
    bare_med = {
        b: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
        for b, v in bare_seen.items()
        if v
    }

    lls_med = (
        {k: statistics.median(x[k] for x in lls_runs) for k in lls_runs[0]} | {"ready_s": lls[2]}
        if lls_runs
        else None
    )
    report = render(args, command, source, bare_med, ratios, hf_tok_s, llama, rows, ready_s, lls_med)
    print("\n" + report)
    if args.write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", report)
        print("wrote docs/BENCHMARKS.md (serving section)")
    return 0


def render(args, command, source, bare, ratios, hf_tok_s, llama, rows, ready_s, lls=None) -> str:
    def rng(xs: list[float]) -> str:
        return f"**{statistics.median(xs):.2f}** [{min(xs):.2f}-{max(xs):.2f}]" if xs else "not measured"

    lines = [
        "## Serving (HTTP + SSE, continuous batching)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Model: {source}; ONNX runner, {args.threads} intra-op thread(s); greedy, `ignore_eos`, "
        f"{args.max_tokens} output tokens per request; "
        + (
            "a new connection per request"
            if args.no_keep_alive
            else "each stream keeps its connection (keep-alive)"
        )
        + (
            f"; engine on CPUs {sorted(args.cpu_plan[0])} (`--engine-cpus {args.engine_cpus}`), HTTP and the load "
            f"generator on {sorted(args.cpu_plan[1])}"
            if args.cpu_plan
            else ""
        )
        + f"; {args.repeat} sweeps, medians shown; server ready "
        f"{ready_s:.1f} s after start (warm start).",
        "",
        "| concurrency | requests | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms | ITL p99 ms | output tok/s | req/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, s, _ in rows:
        lines.append(
            f"| {c} | {s['requests']:.0f} | {s['ttft_p50_ms']:.1f} | {s['ttft_p99_ms']:.1f} | {s['tpot_p50_ms']:.2f} | "
            f"{s['itl_p50_ms']:.2f} | {s['itl_p99_ms']:.2f} | {s['out_tok_s']:.0f} | {s['req_s']:.2f} |"
        )
    by_c = {c: s for c, s, _ in rows}
    if lls and 16 in by_c:
        lines += [
            "",
            "llama.cpp's own server (`llama-server`, same f32 GGUF, 16 slots of the model's window, continuous "
            f"batching, {args.threads} thread(s)), ready {lls['ready_s']:.1f} s after start; the same requests "
            "at concurrency 16 right after ours in each sweep, medians:",
            "",
            "| server (concurrency 16) | prompt tokens (mean) | output tokens/request | TTFT p50 ms | "
            "TTFT p99 ms | TPOT p50 ms | ITL p50 ms | ITL p99 ms | output tok/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, x in (("instructlm", by_c[16]), ("llama-server", lls)):
            lines.append(
                f"| {name} | {x['prompt_tokens_mean']:.1f} | {x['tokens_per_request']:.1f} | "
                f"{x['ttft_p50_ms']:.1f} | {x['ttft_p99_ms']:.1f} | {x['tpot_p50_ms']:.2f} | "
                f"{x['itl_p50_ms']:.2f} | {x['itl_p99_ms']:.2f} | {x['out_tok_s']:.0f} |"
            )
    lines += ["", "Baselines, same weights, same run:", ""]
    if 1 in bare and 16 in bare:
        lines.append(
            f"- bare ONNX runner decode step (measured right before and after each matching load level): batch 1 "
            f"{bare[1][0] * 1000:.2f} ms ({bare[1][1]:.0f} tok/s), batch 16 {bare[16][0] * 1000:.2f} ms "
            f"({bare[16][1]:.0f} tok/s)"
        )
    lines.append(f"- transformers `generate` (torch eager, batch 1): {hf_tok_s:.0f} tok/s")
    if isinstance(llama, dict):
        lines.append(
            f"- llama.cpp (llama-cpp-python {llama['version']}, f32 GGUF) single stream: "
            f"{llama['single_step_s'] * 1000:.2f} ms/step"
        )
        if "batch16_step_s" in llama:
            b16 = llama["batch16_step_s"]
            lines.append(
                f"- llama.cpp 16 sequences, one llama_decode per step: {b16 * 1000:.2f} ms/step ({16 / b16:.0f} tok/s)"
            )
        else:
            lines.append(f"- llama.cpp 16 sequences: not measured ({llama.get('batch16_error')})")
    else:
        lines.append(f"- llama.cpp: not measured: {llama}")
    lines += [
        "",
        "Ratios (each sweep against the bare runner measured beside it; median [min-max] over sweeps). The",
        "machine is shared with other jobs: the ranges show how far the same ratio moved from sweep to sweep.",
        "",
    ]
    lines.append(
        f"- engine overhead, ITL p50 at concurrency 1 / bare step at batch 1: {rng(ratios['itl'])} (required <= 1.2)"
    )
    lines.append(
        f"- the same with TPOT p50 (immune to tokens arriving together in one read): {rng(ratios['tpot'])}"
    )
    lines.append(
        f"- served output tok/s at concurrency 16 / bare batch-16 rate: {rng(ratios['tps16'])} (required >= 0.8)"
    )
    if 1 in by_c and hf_tok_s:
        lines.append(
            f"- served single stream / transformers generate: {1000 / by_c[1]['tpot_p50_ms'] / hf_tok_s:.1f}x"
        )
    if isinstance(llama, dict) and 1 in by_c:
        lines.append(
            f"- ITL p50 / llama.cpp step: {by_c[1]['itl_p50_ms'] / (llama['single_step_s'] * 1000):.2f} (goal <= 1.2)"
        )
    if isinstance(llama, dict) and "batch16_step_s" in llama and 16 in by_c:
        ratio = by_c[16]["out_tok_s"] / (16 / llama["batch16_step_s"])
        lines.append(
            f"- served tok/s at concurrency 16 / llama.cpp batched decode of 16 (no HTTP, no prefill): {ratio:.2f}"
            + ("" if ratios["vs_llama_server"] else " (llama.cpp's server not run: pass --llama-server)")
        )
    if ratios["vs_llama_server"]:
        lines.append(
            "- served output tok/s at concurrency 16 / llama.cpp's server at concurrency 16, same sweep: "
            f"{rng(ratios['vs_llama_server'])} (goal >= 1.2)"
        )
    lines += [
        "",
        "Per-step profile from `/metrics` (`instructlm_engine_step_seconds_total{phase}`), ms per step, all sweeps:",
        "",
        "| concurrency | steps | tokens/step | schedule | prefill | mixed (prefill + decode in one call) | decode "
        "| update (sample, detok, emit) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, _, p in rows:
        steps = max(p.get("steps", 0), 1)
        lines.append(
            f"| {c} | {steps:.0f} | {p.get('tokens', 0) / steps:.1f} | "
            + " | ".join(
                f"{p.get(ph, 0) / steps * 1000:.3f}"
                for ph in ("schedule", "prefill", "mixed", "decode", "update")
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- bench/serve.py:begin -->", "<!-- bench/serve.py:end -->"


def write_section(path: Path, report: str) -> None:
    text = path.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{report}{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
