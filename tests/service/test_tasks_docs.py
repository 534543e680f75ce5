"""The curl, openai-client, WebSocket and settings examples of docs/customer-service.md, docs/content.md and
docs/translation.md, run as written against a live server (only the address is changed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.settings import load_settings
from tests.service.conftest import serve_settings
from tests.service.server import LiveServer
from tests.service.tasks_fixtures import build_long_checkpoint

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = ("customer-service.md", "content.md", "translation.md")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for kind, code in FENCE.findall((DOCS / page).read_text(encoding="utf-8")):
            if kind == lang:
                out.append((page, code))
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_tokenizer, torch_threads):
    with LiveServer(serve_settings(build_long_checkpoint(tmp_path_factory, tiny_tokenizer), "torch")) as srv:
        tasks = srv.app.state.tasks
        for _ in range(600):
            if tasks.scorer is not None:
                break
            time.sleep(0.05)
        yield srv


def _local(code: str, live) -> str:
    return code.replace("http://127.0.0.1:8000", live.url).replace(
        "ws://127.0.0.1:8000", f"ws://127.0.0.1:{live.port}"
    )


def test_every_page_has_curl_and_client_examples():
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        assert "```bash\ncurl" in text and "```python\nimport" in text, page


@pytest.mark.parametrize("page,code", blocks("bash"), ids=lambda v: v if v in PAGES else "")
def test_curl_examples(live, page, code):
    out = subprocess.run(["bash", "-c", _local(code, live)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if '"stream": true' in code:
        events = [line[6:] for line in out.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[0])["object"].endswith(".head")
    else:
        body = json.loads(out.stdout)
        assert "error" not in body and body["id"]


@pytest.mark.parametrize("page,code", blocks("python"), ids=lambda v: v if v in PAGES else "")
def test_python_examples(live, page, code):
    out = subprocess.run(
        [sys.executable, "-c", _local(code, live)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_settings_example_is_valid(tmp_path):
    (toml,) = [code for page, code in blocks("toml") if page == "customer-service.md"]
    path = tmp_path / "serve.toml"
    path.write_text(toml)
    cs = load_settings(path, environ={}).tasks.customer_service
    assert cs.guard.blocked_terms == ["idiot"] and cs.top_k == 3
