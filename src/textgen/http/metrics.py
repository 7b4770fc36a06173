"""``GET /metrics``: the Prometheus scrape, behind the admin token when one is set.

``textgen serve`` answers it on its own port; ``textgen worker --metrics-port`` serves it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from textgen import metrics
from textgen.errors import ConfigurationError, TextgenError, Unauthorized
from textgen.http.errors import handle
from textgen.services import Services

log = logging.getLogger("textgen.http")


def check_token(request: Request, token: str | None) -> None:
    """With an admin token configured, require ``Authorization: Bearer <token>`` (compared in constant time)."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized(
            "metrics: send Authorization: Bearer <TEXTGEN_ADMIN_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _queue_depth(svc: Services, request: Request) -> metrics.QueueDepth:
    depth: metrics.QueueDepth | None = getattr(request.app.state, "queue_depth", None)
    if depth is None:
        depth = metrics.QueueDepth(svc.storage.tasks.depth)
        request.app.state.queue_depth = depth
    return depth


async def scrape(request: Request) -> Response:
    svc: Services = request.app.state.services
    check_token(request, svc.settings.admin_token)
    extra = await _queue_depth(svc, request).families()
    body, content_type = metrics.exposition(request.headers.get("accept"), extra)
    return Response(body, headers={"content-type": content_type})


def metrics_route() -> Route:
    return Route("/metrics", scrape, methods=["GET"])


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the process that runs this server handles its signals itself


class MetricsServer:
    """``/metrics`` alone on its own port (for ``textgen worker``), in the running event loop."""

    def __init__(self, svc: Services, host: str, port: int) -> None:
        app = Starlette(
            routes=[metrics_route()], exception_handlers={TextgenError: handle, Exception: handle}
        )
        app.state.services = svc
        config = uvicorn.Config(app, host=host, port=port, lifespan="off", log_level="warning")
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self.url = f"http://{host}:{port}/metrics"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="textgen-metrics")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start (the port is taken, ...)
                raise ConfigurationError(f"cannot serve metrics at {self.url}")
            await asyncio.sleep(0.01)
        log.info("metrics at %s", self.url)

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
