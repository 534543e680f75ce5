"""Serving fixtures: a live server (uvicorn on 127.0.0.1, a free port) per test module and runner."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.service.server import LiveServer

MODEL_NAME = "tiny"


def serve_settings(model_path, runner: str, **overrides) -> Settings:
    base = dict(
        model=str(model_path),
        runner=runner,
        served_model_name=MODEL_NAME,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        prefix_cache_slots=2,
        prefix_cache_min_tokens=8,
        threads=1,
        log_level="warning",
    )
    base.update(overrides)
    return Settings(**base)


def model_path(request, runner: str):
    return request.getfixturevalue("tiny_bundle" if runner == "onnx" else "tiny_checkpoint")


@pytest.fixture(scope="module", params=["torch", "onnx"])
def live(request, torch_threads):
    """A running server over the tiny model, once with each runner."""
    runner = request.param
    with LiveServer(serve_settings(model_path(request, runner), runner)) as srv:
        yield srv


@pytest.fixture()
def client(live):
    import openai

    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
