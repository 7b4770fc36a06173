"""The OpenAPI document, generated from the pydantic models in ``textgen.protocol``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from textgen import __version__
from textgen.http.admin_openapi import ADMIN_SECURITY_SCHEME, admin_paths
from textgen.protocol import (
    ErrorBody,
    ModelList,
    RemainingCredits,
    StreamRequest,
    TaskPage,
    TextGenRequest,
    TextGenResponse,
)
from textgen.webhooks.protocol import WebhookDelivery, WebhookDeliveryList

_MODELS: list[type[BaseModel]] = [
    TextGenRequest,
    StreamRequest,
    TextGenResponse,
    TaskPage,
    RemainingCredits,
    ErrorBody,
    ModelList,
    WebhookDeliveryList,
    WebhookDelivery,
]
_ERR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
# Before OpenAPI 3.2 (``itemSchema``) the schema of an event stream describes one event.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {
            "type": "string",
            "enum": ["message", "error"],
            "description": "`message` (the default) carries a chunk; `error` ends the stream.",
        },
        "data": {
            "type": "string",
            "description": 'JSON: a GenerateContentResponse chunk, or `{"error": {"code", "message"}}` for an error event.',
        },
    },
}


def _ref(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Invalid request body or parameters; the message names the field.",
        401: "Missing or invalid API credentials.",
        402: "Not enough credits.",
        404: "No such task for this account.",
        409: "Conflict: the task has already finished, or a request with this Idempotency-Key is still "
        "being processed.",
        413: "Request body too large.",
        422: "This Idempotency-Key was already used with a different request body.",
        429: "Rate limit exceeded; see Retry-After.",
        502: "The model provider failed before the first chunk.",
        503: "Temporarily unavailable; see Retry-After.",
        504: "The model provider did not answer in time before the first chunk.",
    }
    return {str(c): {"description": text[c], "content": _ERR} for c in codes}


def build_openapi() -> dict[str, Any]:
    _, schema = models_json_schema(
        [(m, "validation" if m in (TextGenRequest, StreamRequest) else "serialization") for m in _MODELS],
        ref_template="#/components/schemas/{model}",
    )
    components = schema.get("$defs", {})
    auth: list[dict[str, list[str]]] = [{"X-API-ID": [], "X-API-KEY": []}]
    task_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    get_task = {
        "summary": "Get a task's status and result",
        "operationId": "text_generator_get",
        "parameters": [task_id],
        "security": auth,
        "responses": {
            "200": {"description": "The task.", "content": _ref("TextGenResponse")},
            **_errors(401, 404, 429, 503),
        },
    }
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "1 to 255 characters. The same key and body from the same account within 24 h "
        "(TEXTGEN_IDEMPOTENCY_TTL_SECONDS) answer with the first request's status and body, plus "
        "`Idempotency-Replayed: true`, and reserve nothing more; another body is a 422; a repeat that "
        "arrives while the first is still being admitted gets a 409 after waiting a few seconds.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    }
    replayed = {
        "Idempotency-Replayed": {
            "description": "`true` when this answer is a replay of an earlier request with the same key",
            "schema": {"type": "string", "enum": ["true"]},
        }
    }
    cancel = {
        "summary": "Cancel a pending or running task",
        "description": "A pending task never starts and is charged nothing; a running one (async, sync or "
        "stream, in any process) is stopped and charged for the tokens it produced. Either ends `failed` "
        'with `failed_reason` "cancelled", and its webhook is sent as for any failure. The answer is the '
        "task once it has stopped (a running task in another process normally within a second). A "
        "finished task is a 409 that changes nothing.",
        "operationId": "sse_text_generator_cancel",
        "parameters": [task_id],
        "security": auth,
        "responses": {
            "200": {"description": "The cancelled task.", "content": _ref("TextGenResponse")},
            **_errors(401, 404, 409, 429, 503),
        },
    }
    paths: dict[str, Any] = {
        "/sse/text_generator/": {
            "post": {
                "summary": "Create Text Generator task",
                "description": "Sync (`sync: true`) returns the finished task; async (default) returns it "
                "`pending` at once.",
                "operationId": "sse_text_generator_create",
                "parameters": [idempotency_key],
                "requestBody": {"required": True, "content": _ref("TextGenRequest")},
                "security": auth,
                "responses": {
                    "201": {
                        "description": "Text generation result or pending task.",
                        "content": _ref("TextGenResponse"),
                        "headers": replayed,
                    },
                    **_errors(400, 401, 402, 409, 413, 422, 429, 503),
                },
            },
            "get": {
                "summary": "List text generation tasks, newest first",
                "operationId": "text_generator_list",
                "description": "A page holds `limit` tasks, or fewer when their JSON would pass 8 MiB (a "
                "page always holds at least one task); follow `next` for the rest.",
                "security": auth,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "Tasks per page: 20 unless given; at most TEXTGEN_LIST_MAX_LIMIT (100).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["pending", "running", "done", "failed"]},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "A page of tasks.", "content": _ref("TaskPage")},
                    **_errors(400, 401, 429, 503),
                },
            },
        },
        "/sse/text_generator/stream/": {
            "post": {
                "summary": "Create a text generation task and stream it (Server-Sent Events)",
                "operationId": "sse_text_generator_stream",
                "description": "The task id comes with the first byte: in the `X-Textgen-Task-Id` header and "
                "in a first SSE comment `: task <id>` (which Gemini-native clients ignore); the last chunk "
                "also carries `creatify: {id, credits_used}`. With an `Idempotency-Key`, a repeat of a "
                "finished stream replays its answer as one chunk (409 while the first still runs).",
                "parameters": [idempotency_key],
                "requestBody": {"required": True, "content": _ref("StreamRequest")},
                "security": auth,
                "responses": {
                    "200": {
                        "description": "A stream of Gemini-native GenerateContentResponse chunks.",
                        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                        "headers": {
                            "X-Textgen-Task-Id": {
                                "description": "the id of the task this stream runs",
                                "schema": {"type": "string"},
                            },
                            **replayed,
                        },
                    },
                    **_errors(400, 401, 402, 409, 413, 422, 429, 502, 503, 504),
                },
            }
        },
        "/sse/text_generator/{id}/": {"get": get_task},
        "/api/text_generator/{id}/": {"get": {**get_task, "operationId": "api_text_generator_get"}},
        "/sse/text_generator/{id}/cancel/": {"post": cancel},
        "/api/text_generator/{id}/cancel/": {"post": {**cancel, "operationId": "api_text_generator_cancel"}},
        "/sse/text_generator/{id}/webhooks/": {
            "get": {
                "summary": "A task's webhook deliveries and their attempts",
                "operationId": "text_generator_webhooks",
                "parameters": [task_id],
                "security": auth,
                "responses": {
                    "200": {
                        "description": "Deliveries, oldest first.",
                        "content": _ref("WebhookDeliveryList"),
                    },
                    **_errors(401, 404, 429, 503),
                },
            }
        },
        "/sse/text_generator/{id}/webhooks/redeliver/": {
            "post": {
                "summary": "Queue a new webhook delivery of a finished task",
                "operationId": "text_generator_webhooks_redeliver",
                "parameters": [task_id],
                "security": auth,
                "responses": {
                    "201": {"description": "The queued delivery.", "content": _ref("WebhookDelivery")},
                    "409": {
                        "description": "The task has been redelivered TEXTGEN_WEBHOOK_MAX_REDELIVERIES times "
                        "(5 by default) already.",
                        "content": _ERR,
                    },
                    **_errors(400, 401, 404, 429, 503),
                },
            }
        },
        "/api/remaining_credits/": {
            "get": {
                "summary": "Remaining credits of the calling account",
                "operationId": "remaining_credits",
                "security": auth,
                "responses": {
                    "200": {"description": "Balance.", "content": _ref("RemainingCredits")},
                    **_errors(401, 429, 503),
                },
            }
        },
        "/sse/models/": {
            "get": {
                "summary": "Models this server can serve",
                "operationId": "models_list",
                "security": auth,
                "responses": {
                    "200": {"description": "Models.", "content": _ref("ModelList")},
                    **_errors(401, 429),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Process is up",
                "operationId": "healthz",
                "responses": {"200": {"description": "ok"}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Database, Redis and providers each checked within the readiness timeout",
                "operationId": "readyz",
                "responses": {
                    "200": {"description": 'ready: `{"status": "ready", "checks": {...}}`'},
                    "503": {
                        "description": "not ready (the database failed or no provider is usable); "
                        "`checks` names what failed"
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (with TEXTGEN_ADMIN_TOKEN set: Authorization: Bearer <token>)",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition (OpenMetrics when the Accept header asks).",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": {"description": "Missing or wrong admin token.", "content": _ERR},
                },
            }
        },
    }
    paths.update(admin_paths(auth))
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "textgen",
            "version": __version__,
            "description": "Self-hosted implementation of the Creatify Text Generator API.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "X-API-ID": {"type": "apiKey", "in": "header", "name": "X-API-ID"},
                "X-API-KEY": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
                **ADMIN_SECURITY_SCHEME,
            },
        },
    }


def docs_html(spec: dict[str, Any]) -> str:
    """A dependency-free HTML page describing each endpoint (no CDN, works offline)."""
    from html import escape

    rows = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            codes = ", ".join(op.get("responses", {}))
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{escape(path)}</code></td>"
                f"<td>{escape(op.get('summary', ''))}</td><td>{codes}</td></tr>"
            )
    schemas = "".join(
        f"<h3 id='{escape(name)}'>{escape(name)}</h3><pre>{escape(_pretty(body))}</pre>"
        for name, body in spec["components"]["schemas"].items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>textgen API</title>"
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;padding:0 1em}"
        "td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}"
        "pre{background:#f6f6f6;padding:8px;overflow:auto}</style></head><body>"
        f"<h1>textgen API {escape(spec['info']['version'])}</h1>"
        "<p>Authenticate every call with the <code>X-API-ID</code> and <code>X-API-KEY</code> headers. "
        'Errors are JSON: <code>{"error": "..."}</code>. Machine-readable: '
        "<a href='/openapi.json'>/openapi.json</a>.</p>"
        "<table><tr><th>Method</th><th>Path</th><th>What</th><th>Statuses</th></tr>"
        + "".join(rows)
        + "</table><h2>Schemas</h2>"
        + schemas
        + "</body></html>"
    )


def _pretty(body: Any) -> str:
    import json

    return json.dumps(body, indent=2)
