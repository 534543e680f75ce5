"""gunicorn with one `uvicorn_worker.UvicornWorker`, built from validated Settings.

The worker builds the app after the fork (no preload), so the model and the engine thread live in the worker.
gunicorn's graceful timeout is the drain timeout plus 5 s: on SIGTERM the worker stops admitting, lets running
requests finish for up to `drain_timeout_s`, and exits; the master exits 0 once it has.
"""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from service.settings import Settings


class ServeApplication(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options = {
            "bind": f"{s.host}:{s.port}",
            "workers": 1,
            "worker_class": "uvicorn_worker.UvicornWorker",
            "graceful_timeout": int(s.drain_timeout_s) + 5,
            # The worker heartbeats from its event loop; model loading runs on a thread, so 120 s is plenty.
            "timeout": 120,
            "keepalive": 5,
            "loglevel": s.log_level,
            "accesslog": None,  # the app logs one JSON line per request
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        import sys

        from service.app import create_app

        # The engine thread needs the GIL back the moment onnxruntime returns; with the default 5 ms switch
        # interval a busy event loop (SSE writes) could hold it for a whole demo decode step (2-3 ms).
        sys.setswitchinterval(0.0005)

        return create_app(self.settings)


def serve(settings: Settings) -> int:
    ServeApplication(settings).run()
    return 0
