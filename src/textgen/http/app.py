"""The ASGI application: routes, middleware, error handling and the lifespan that owns resources."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from textgen import metrics
from textgen.errors import MethodNotAllowed, TextgenError
from textgen.http import routes
from textgen.http.admin import admin_routes
from textgen.http.errors import handle
from textgen.http.metrics import metrics_route
from textgen.http.middleware import RequestContextMiddleware
from textgen.http.openapi import build_openapi
from textgen.http.streaming import stream_task
from textgen.http.usage import usage
from textgen.http.webhooks import webhook_routes
from textgen.providers import Provider
from textgen.services import ProviderFactory, Services, default_providers
from textgen.settings import Settings

log = logging.getLogger("textgen")


def create_app(
    settings: Settings,
    providers: dict[str, Provider] | ProviderFactory | None = None,
    *,
    run_worker: bool | None = None,
) -> Starlette:
    """Build the app. ``providers`` replaces the default model backends (tests register fakes this way)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        if providers is None:
            chosen = default_providers(settings)
        elif callable(providers):
            chosen = providers(settings)
        else:
            chosen = providers
        svc = Services.build(settings, chosen)
        app.state.services = svc
        await svc.open_providers()
        if settings.run_worker if run_worker is None else run_worker:
            await svc.start_worker()
        try:
            yield {}
        finally:
            await svc.aclose()
            metrics.process_exiting()

    app = Starlette(
        routes=with_method_not_allowed(
            [
                Route("/sse/text_generator/", routes.create_task, methods=["POST"]),
                Route("/sse/text_generator/", routes.list_tasks, methods=["GET"]),
                Route("/sse/text_generator/stream/", stream_task, methods=["POST"]),
                Route("/sse/text_generator/{task_id:str}/", routes.get_task, methods=["GET"]),
                Route("/api/text_generator/{task_id:str}/", routes.get_task, methods=["GET"]),
                Route("/sse/text_generator/{task_id:str}/cancel/", routes.cancel_task, methods=["POST"]),
                Route("/api/text_generator/{task_id:str}/cancel/", routes.cancel_task, methods=["POST"]),
                *webhook_routes(),
                Route("/api/remaining_credits/", routes.remaining_credits, methods=["GET"]),
                Route("/api/usage/", usage, methods=["GET"]),
                *admin_routes(settings),
                Route("/sse/models/", routes.list_models, methods=["GET"]),
                Route("/healthz", routes.healthz, methods=["GET"]),
                Route("/readyz", routes.readyz, methods=["GET"]),
                metrics_route(),
                Route("/openapi.json", routes.openapi, methods=["GET"]),
                Route("/docs", routes.docs, methods=["GET"]),
            ]
        ),
        middleware=[
            Middleware(
                RequestContextMiddleware,
                max_body_bytes=settings.max_body_bytes,
                bodies_budget_bytes=settings.request_bodies_budget_bytes,
            )
        ],
        exception_handlers={
            TextgenError: handle,
            ValidationError: handle,
            HTTPException: handle,
            Exception: handle,
        },
        lifespan=lifespan,
    )
    app.state.openapi = build_openapi()
    return app


def with_method_not_allowed(table: list[BaseRoute]) -> list[BaseRoute]:
    """The routes, each path followed by a route answering its other methods with 405 and an Allow header.

    Placed right after the path's own routes, it also keeps a literal path from falling through to a
    later pattern with another method (``GET /sse/text_generator/stream/`` is not the task ``stream``).
    """
    allowed: dict[str, set[str]] = {}
    last: dict[str, int] = {}
    for index, route in enumerate(table):
        if isinstance(route, Route) and route.methods:
            allowed.setdefault(route.path, set()).update(route.methods)
            last[route.path] = index
    out: list[BaseRoute] = []
    for index, route in enumerate(table):
        out.append(route)
        if isinstance(route, Route) and last.get(route.path) == index:
            out.append(Route(route.path, _RefuseMethod(", ".join(sorted(allowed[route.path])))))
    return out


class _RefuseMethod:
    """An ASGI app (not a function, so its route matches every method) that answers 405."""

    def __init__(self, allow: str) -> None:
        self.allow = allow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise MethodNotAllowed(
            f"{scope['method']} is not allowed on {scope['path']}; use {self.allow}",
            headers={"Allow": self.allow},
        )
