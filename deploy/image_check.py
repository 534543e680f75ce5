"""Runs inside the built image (`buildah run`, as the image's user): starts the server the way the image's
ENTRYPOINT does, waits for /health, exercises the API, checks the metrics the chart and dashboard read, runs
the image's HEALTHCHECK command, then sends SIGTERM and expects a clean exit within the drain timeout.

Standard library only (it runs with the image's Python). Prints one line per check; exit 0 when all pass.

    python3 image_check.py --port 18080 --entrypoint instructlm serve \
        --healthcheck-json '["python3", "-c", "..."]' --metrics-file /check/metrics.txt
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def written_since(t0: float, skip: tuple[str, ...]) -> list[str]:
    """Paths under / modified after t0, outside the `skip` trees."""
    found = []
    for root, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in files + dirs:
            path = os.path.join(root, name)
            if path in skip:
                continue
            try:
                if os.lstat(path).st_mtime > t0:
                    found.append(path)
            except OSError:
                continue
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--entrypoint", nargs="+", required=True, help="the image's ENTRYPOINT")
    parser.add_argument("--healthcheck-json", required=True, help="the image's HEALTHCHECK test, JSON list")
    parser.add_argument("--metrics-file", required=True, help="metric names that must be exposed, one a line")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    args = parser.parse_args()

    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"image check: {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)

    base = f"http://127.0.0.1:{args.port}"
    env = {
        **os.environ,
        "INSTRUCTLM_PORT": str(args.port),
        "INSTRUCTLM_DRAIN_TIMEOUT_S": str(args.drain_timeout),
    }
    check(os.getuid() != 0, f"runs as a non-root user (uid {os.getuid()})")
    try:
        import torch  # noqa: F401

        check(False, "torch is absent from the CPU image")
    except ImportError:
        check(True, "torch is absent from the CPU image")

    # Without a bundle the server refuses to start, with one line naming the path (the CLI's user-error exit 2).
    done = subprocess.run(
        args.entrypoint, env={**env, "INSTRUCTLM_MODEL": "/app"}, capture_output=True, text=True, timeout=60
    )
    check(
        done.returncode == 2 and "/app" in done.stderr and "bundle" in done.stderr,
        f"no bundle: exit {done.returncode}, {done.stderr.strip()[-120:]!r}",
    )

    started = time.time() - 1  # mtime granularity
    server = subprocess.Popen(args.entrypoint, env=env)
    try:
        t0 = time.monotonic()
        status = 0
        while time.monotonic() - t0 < args.start_timeout:
            if server.poll() is not None:
                break
            try:
                status, _ = get(f"{base}/health", timeout=2)
            except OSError:
                status = 0
            if status == 200:
                break
            time.sleep(0.5)
        check(
            status == 200, f"/health answers 200 after {time.monotonic() - t0:.1f} s (last status {status})"
        )
        if status != 200:
            return 1
        check(get(f"{base}/health/live")[0] == 200, "/health/live answers 200")
        check(get(f"{base}/health/ready")[0] == 200, "/health/ready answers 200")

        status, body = get(f"{base}/v1/models")
        models = [m["id"] for m in json.loads(body).get("data", [])] if status == 200 else []
        check(status == 200 and len(models) == 1, f"/v1/models lists one model: {models}")
        status, body = post(
            f"{base}/v1/chat/completions",
            {
                "model": models[0] if models else "",
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 8,
                "temperature": 0,
            },
        )
        choice = (body.get("choices") or [{}])[0]
        check(
            status == 200 and choice.get("finish_reason") in ("stop", "length"),
            f"POST /v1/chat/completions: {status}, finish_reason {choice.get('finish_reason')!r}, "
            f"{body.get('usage', {}).get('completion_tokens')} tokens",
        )

        status, body = get(f"{base}/metrics")
        exposed = {
            line.split("{")[0].split(" ")[0]
            for line in body.decode().splitlines()
            if line[:1] not in ("#", "")
        }
        with open(args.metrics_file, encoding="utf-8") as f:
            wanted = [n.strip() for n in f if n.strip()]
        missing = sorted(set(wanted) - exposed)
        check(
            status == 200 and not missing,
            f"/metrics exposes the {len(wanted)} series the chart and dashboard read (missing: {missing})",
        )

        test = json.loads(args.healthcheck_json)
        if test[0] == "CMD-SHELL":
            command = ["/bin/sh", "-c", test[1]]
        else:
            command = test[1:] if test[0] == "CMD" else test
        done = subprocess.run(command, env=env, timeout=30)
        check(done.returncode == 0, f"the image's HEALTHCHECK exits 0 ({' '.join(command)[:60]}...)")

        # SIGTERM with a stream open: the stream still ends with [DONE], then the process exits 0.
        req = urllib.request.Request(
            f"{base}/v1/completions",
            data=json.dumps(
                {
                    "model": models[0] if models else "",
                    "prompt": "Once upon a time",
                    "max_tokens": 200,
                    "temperature": 0,
                    "stream": True,
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        events = []
        with urllib.request.urlopen(req, timeout=60) as stream:
            first = stream.readline()
            server.send_signal(signal.SIGTERM)
            t1 = time.monotonic()
            events = [first, *stream.read().splitlines()]
        data = [e for e in events if e.startswith(b"data: ")]
        check(
            bool(data) and data[-1] == b"data: [DONE]",
            f"a stream open at SIGTERM completes: {len(data) - 1} chunks, then [DONE]",
        )
        try:
            code = server.wait(timeout=args.drain_timeout + 10)
        except subprocess.TimeoutExpired:
            code = None
        check(code == 0, f"SIGTERM: exit status {code} after {time.monotonic() - t1:.1f} s")
        done = subprocess.run(command, env=env, timeout=30, capture_output=True)
        check(done.returncode != 0, "the HEALTHCHECK fails once the server is gone")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    # The chart runs the pod with a read-only root and emptyDir volumes at /tmp and the cache directory: the
    # server must have written nowhere else.
    # /etc/hostname, hosts and resolv.conf are the container runtime's (Kubernetes mounts its own there too).
    runtime_files = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
    skip = ("/proc", "/sys", "/dev", "/run", "/check", "/tmp", "/var/tmp", *runtime_files)
    written = written_since(started, skip=skip)
    check(not written, f"wrote nothing outside /tmp (a read-only root suffices): {written[:5]}")
    print(f"image check: {'all passed' if not failures else f'{len(failures)} failed'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
