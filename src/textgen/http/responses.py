"""The JSON response of every endpoint, encoded with orjson."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse as StarletteJSONResponse

from textgen.presentation import encode_json


class JSONResponse(StarletteJSONResponse):
    """Starlette's JSON response (same media type and headers), its body written by orjson: compact UTF-8."""

    def render(self, content: Any) -> bytes:
        return encode_json(content)
