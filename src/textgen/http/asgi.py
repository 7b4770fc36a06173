"""Entry point for ``uvicorn --factory textgen.http.asgi:app_factory`` (used by ``textgen serve``)."""

from __future__ import annotations

from starlette.applications import Starlette

from textgen.http.app import create_app
from textgen.settings import load_settings


def app_factory() -> Starlette:
    return create_app(load_settings())
