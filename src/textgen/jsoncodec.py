"""JSON encoding for bodies, chunks and payloads: orjson, and the standard library for what orjson refuses."""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON. orjson writes nearly everything; an integer past 64 bits (a JSON schema's bound may
    be up to 20 digits) is written by the standard library instead, with the same layout."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
