"""Health (Kubernetes probes) and Prometheus metrics."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.datastructures import State

from service.api.protocol import Health
from service.metrics import CONTENT_TYPE


class HealthController(Controller):
    path = "/health"
    tags = ["health"]

    @get(summary="200 once the model is loaded and one forward has run; 503 before and while draining")
    async def health(self, state: State) -> Response[Health]:
        return _readiness(state)

    @get("/live", summary="200 while the process serves HTTP (liveness)")
    async def live(self) -> Health:
        return Health(status="alive", ready=True)

    @get("/ready", summary="Readiness: as /health; fails at once on SIGTERM so traffic drains away")
    async def ready(self, state: State) -> Response[Health]:
        return _readiness(state)


def _readiness(state: State) -> Response[Health]:
    srv = state.server
    if srv.draining:
        return Response(Health(status="draining", ready=False), status_code=503)
    if srv.load_error:
        return Response(Health(status=f"load failed: {srv.load_error[:200]}", ready=False), status_code=503)
    if not srv.ready:
        return Response(Health(status="loading", ready=False), status_code=503)
    return Response(Health(status="ok", ready=True), status_code=200)


class MetricsController(Controller):
    path = "/metrics"
    tags = ["health"]

    @get(summary="Prometheus metrics (text exposition format)", media_type=CONTENT_TYPE)
    async def metrics(self, state: State) -> Response[bytes]:
        return Response(state.server.metrics.render(), media_type=CONTENT_TYPE)
