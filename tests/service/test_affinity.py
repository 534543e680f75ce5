"""engine_cpus: the engine's CPUs and the HTTP side's, planned from the setting and applied to the live threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from model.errors import ConfigError
from service.affinity import cpu_plan, parse_cpu_list
from service.settings import Settings
from tests.service.server import LiveServer


def test_cpu_lists_parse_and_bad_ones_name_the_setting():
    assert parse_cpu_list("1") == {1}
    assert parse_cpu_list("2-5,7") == {2, 3, 4, 5, 7}
    assert parse_cpu_list(" 0 , 3-3 ") == {0, 3}
    for bad in ("x", "1-", "3-1", "-2", "1,,2"):
        with pytest.raises(ConfigError, match="engine_cpus"):
            parse_cpu_list(bad)
    with pytest.raises(ConfigError, match="engine_cpus"):
        Settings(engine_cpus="one")  # syntax is checked with the other settings


def test_plans_give_the_engine_its_cpus_and_leave_the_rest_to_http():
    four = {0, 1, 2, 3}
    assert cpu_plan("", 1, four) is None and cpu_plan("off", 1, four) is None
    assert cpu_plan("auto", 1, four) == ({3}, {0, 1, 2})
    assert cpu_plan("auto", 3, four) == ({1, 2, 3}, {0})
    assert cpu_plan("auto", 4, four) is None  # nothing would be left for HTTP: no pinning
    assert cpu_plan("auto", 1, {5}) is None
    assert cpu_plan("1-2", 2, four) == ({1, 2}, {0, 3})
    with pytest.raises(ConfigError, match=r"CPU 7 is not one this process may use \(0,1,2,3\)"):
        cpu_plan("2,7", 1, four)
    with pytest.raises(ConfigError, match="threads is 2"):
        cpu_plan("3", 2, four)
    with pytest.raises(ConfigError, match="leave one for the HTTP side"):
        cpu_plan("0-3", 1, four)


def _allowed(tid: int) -> set[int]:
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    raise AssertionError(f"no Cpus_allowed_list for thread {tid}")


def test_live_server_runs_the_engine_on_its_own_cpu(tiny_bundle):
    """engine_cpus=auto on this machine: the engine thread on the last CPU, the event loop on the others, and
    requests still served. With a single CPU there is nothing to set aside, and nothing is pinned."""
    available = set(os.sched_getaffinity(0))
    settings = Settings(
        model=str(tiny_bundle),
        runner="onnx",
        served_model_name="m",
        max_num_seqs=2,
        engine_cpus="auto",
        log_level="warning",
    )
    with LiveServer(settings) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
        engine_tid, loop_tid = srv.engine._thread.native_id, srv.thread.native_id
        engine_cpus, loop_cpus = _allowed(engine_tid), _allowed(loop_tid)
        plan = srv.state.cpu_plan
    if len(available) >= 2:
        last = max(available)
        assert plan == ({last}, available - {last})
        assert engine_cpus == {last}
        assert loop_cpus == available - {last}
    else:
        assert plan is None and engine_cpus == loop_cpus == available
    assert set(os.sched_getaffinity(0)) == available  # the test's own thread was left alone


def test_serve_check_rejects_cpus_the_machine_lacks(tiny_bundle):
    missing = max(os.sched_getaffinity(0)) + 1
    r = subprocess.run(
        [sys.executable, "-m", "instructlm", "serve", "--model", str(tiny_bundle), "--engine-cpus",
         str(missing), "--check"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"engine_cpus '{missing}': CPU {missing} is not one this process may use" in r.stderr
