"""A fake Gemini API server that speaks the real wire format, for tests and benchmarks.

It answers ``models/{model}:generateContent`` and ``models/{model}:streamGenerateContent?alt=sse``, the
File API endpoints the google-genai SDK uses (resumable upload, get, delete), records what it received and
can be told to fail. Run it standalone with
``python -m tests.fakes.fake_gemini --port N [--delay-ms 2000 --stream-delay-ms 0 --chunks 20 --chunk-delay-ms 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import re
import secrets
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# Values supplied by the caller that must keep their own keys (never re-cased).
_OPAQUE_KEYS = {
    "args",
    "response",
    "parameters",
    "parametersJsonSchema",
    "responseJsonSchema",
    "responseSchema",
}
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# What Gemini answers without a key, and with a wrong one (errors/e08 and e01 of the recorded answers).
NO_KEY_MESSAGE = (
    "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or "
    "other form of API consumer identity to call this API."
)
BAD_KEY_MESSAGE = "API key not valid. Please pass a valid API key."
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more information on this "
    "error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)
SAFETY_CATEGORIES = (
    "HARM_CATEGORY_SEXUALLY_EXPLICIT",
    "HARM_CATEGORY_HATE_SPEECH",
    "HARM_CATEGORY_HARASSMENT",
    "HARM_CATEGORY_DANGEROUS_CONTENT",
)
UNARY_TYPE = "application/json; charset=UTF-8"
SSE_TYPE = "text/event-stream"
_B64_STANDARD = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_B64_URLSAFE = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
DEFAULT_REPLY = "Create stunning videos in seconds, powered by AI."


def camelize(value: Any) -> Any:
    """Re-key a request body to camelCase, as proto3 JSON parsing does, leaving caller-owned maps alone."""
    if isinstance(value, list):
        return [camelize(item) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        head, *rest = key.split("_")
        camel = head + "".join(word[:1].upper() + word[1:] for word in rest)
        out[camel] = item if camel in _OPAQUE_KEYS else camelize(item)
    return out


def decode_b64(data: str) -> bytes:
    """Decode standard or URL-safe base64, as the real API accepts both."""
    padded = data + "=" * (-len(data) % 4)
    try:
        if _B64_STANDARD.match(data):
            return base64.b64decode(padded, validate=True)
        if _B64_URLSAFE.match(data):
            return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        pass
    raise ValueError("invalid base64")


def error_body(
    code: int, message: str, details: list[dict[str, Any]] | None = None, status: str | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": code,
        "message": message,
        "status": status or _STATUS_NAMES.get(code, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return {"error": error}


def retry_info(delay: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


def quota_details(retry_delay: str | None) -> list[dict[str, Any]]:
    """The details of a 429 in the order Gemini sends them since 2026: Help, QuotaFailure, RetryInfo."""
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                    "quotaValue": "10",
                }
            ],
        },
    ]
    if retry_delay:
        details.append(retry_info(retry_delay))
    return details


def bad_key_details() -> list[dict[str, Any]]:
    return [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"},
        },
        {
            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
            "locale": "en-US",
            "message": BAD_KEY_MESSAGE,
        },
    ]


def pretty(value: Any) -> bytes:
    """JSON as Gemini prints unary answers and errors: a 2-space indent and a trailing newline."""
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def sse_event(payload: Any) -> bytes:
    """One stream event as Gemini frames it: ESF spacing (``": "`` after keys, none after commas), CRLF CRLF."""
    return b"data: " + json.dumps(payload, separators=(",", ": "), ensure_ascii=False).encode() + b"\r\n\r\n"


def error_response(
    code: int,
    message: str,
    details: list[dict[str, Any]] | None = None,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> Response:
    """An error answer; on a streaming request it keeps the event-stream type over its plain JSON body."""
    return Response(
        pretty(error_body(code, message, details)),
        code,
        {**(headers or {}), "content-type": SSE_TYPE if stream else UNARY_TYPE},
    )


class _Invalid(Exception):
    def __init__(self, message: str, code: int = 400, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details


# The fields of a GenerateContentRequest and of its generationConfig; Gemini refuses any other (errors/e03).
_REQUEST_FIELDS = frozenset(
    {
        "contents",
        "tools",
        "toolConfig",
        "safetySettings",
        "systemInstruction",
        "generationConfig",
        "cachedContent",
    }
)
_GENERATION_FIELDS = frozenset(
    {
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseModalities",
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "responseLogprobs",
        "logprobs",
        "enableEnhancedCivicAnswers",
        "speechConfig",
        "thinkingConfig",
        "imageConfig",
        "mediaResolution",
    }
)
MAX_STOP_SEQUENCES = 5
MAX_FUNCTION_DECLARATIONS = 512


def _unknown_field(name: str, where: str) -> _Invalid:
    at = f" at '{where}'" if where else ""
    message = f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.'
    violation = {"field": where, "description": message}
    details = [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [violation]}]
    return _Invalid(message, details=details)


def _check_fields(body: dict[str, Any]) -> None:
    """Refuse what Gemini refuses before it generates: unknown fields, more than its limits."""
    for name in body:
        if name not in _REQUEST_FIELDS:
            raise _unknown_field(name, "")
    config = body.get("generationConfig") or {}
    for name in config:
        if name not in _GENERATION_FIELDS:
            raise _unknown_field(name, "generation_config")
    if len(config.get("stopSequences") or []) > MAX_STOP_SEQUENCES:
        raise _Invalid(
            "The GenerateContentRequest proto is invalid:\n  * generation_config.stop_sequences: [FIELD_INVALID] "
            f"At most {MAX_STOP_SEQUENCES} stop sequences can be specified."
        )
    for i, tool in enumerate(body.get("tools") or []):
        if len(tool.get("functionDeclarations") or []) > MAX_FUNCTION_DECLARATIONS:
            raise _Invalid(
                f"The GenerateContentRequest proto is invalid:\n  * tools[{i}].function_declarations: "
                f"[FIELD_INVALID] At most {MAX_FUNCTION_DECLARATIONS} function declarations can be specified."
            )


@dataclass
class Fault:
    """What to do instead of answering normally, for one request."""

    status: int | None = None  # answer with this HTTP status and error JSON
    message: str = ""
    retry_delay: str | None = None  # RetryInfo.retryDelay, e.g. "0.01s"
    retry_after: str | None = None  # Retry-After header
    delay: float = 0.0  # seconds to wait before answering
    block_reason: str | None = None  # promptFeedback.blockReason, no candidates
    finish_reason: str | None = None  # finish the (only) candidate with this reason
    # Streaming: send this many chunks, then an error as Gemini sends one after HTTP 200, a raw JSON tail.
    error_after_chunks: int | None = None
    error_status: int = 500  # the code of that error
    drop_after_chunks: int | None = None  # streaming: send this many chunks, then cut the connection
    stall_after_chunks: int | None = None  # streaming: send this many chunks, then nothing (for a minute)
    garbage: bytes | None = None  # answer 200 with this body (not JSON) instead of a response
    replay: Replay | None = None  # answer with these recorded bytes instead


@dataclass
class Replay:
    """A recorded answer, sent byte for byte (status, content type, body) instead of one of the fake's own."""

    status: int
    body: bytes
    content_type: str = UNARY_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    piece_size: int | None = None  # send the body in pieces of this many bytes; else line by line

    def pieces(self) -> list[bytes]:
        if self.piece_size:
            size = self.piece_size
            return [self.body[i : i + size] for i in range(0, len(self.body), size)]
        return self.body.splitlines(keepends=True)


@dataclass
class Received:
    """One generate request as the fake saw it."""

    model: str
    stream: bool
    headers: dict[str, str]
    raw: dict[str, Any]  # the JSON body exactly as sent
    body: dict[str, Any]  # the same, keys normalised to camelCase
    inline_data: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class StoredFile:
    name: str
    mime_type: str
    data: bytearray
    polls_until_active: int
    state: str = "PROCESSING"
    uploaded: bool = False


class FakeGemini:
    """The fake upstream: configure replies and faults, then inspect ``received``."""

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        chunks: int | None = None,
        chunk_delay: float = 0.0,
        delay: float = 0.0,
        stream_delay: float | None = None,
        record: bool = True,
        max_records: int | None = None,
    ) -> None:
        self.api_key = api_key
        self.chunks = chunks  # fixed number of stream chunks (else one per word)
        self.chunk_delay = chunk_delay
        self.delay = delay  # seconds before every answer (a slow upstream)
        # seconds before a stream's first chunk; None: the same as ``delay``
        self.stream_delay = delay if stream_delay is None else stream_delay
        self.record = record
        self.received: deque[Received] = deque(maxlen=max_records)
        self.faults: deque[Fault] = deque()
        self.replies: deque[dict[str, Any]] = deque()  # whole GenerateContentResponse bodies to send next
        self.reply_text = DEFAULT_REPLY
        self.thoughts_tokens = 0
        self.file_polls_until_active = 1
        self.files: dict[str, StoredFile] = {}
        self.deleted_files: list[str] = []
        self.file_requests: list[tuple[str, str]] = []
        self.issued_signatures: set[bytes] = set()
        self.streams_opened = 0
        self.streams_completed = 0
        self.streams_abandoned = 0
        self.abandoned = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/upload/{version}/files", self._upload, methods=["POST"]),
                Route("/{version}/files/{file_id}", self._file, methods=["GET", "DELETE"]),
                Route("/{version}/models/{rest:path}", self._models, methods=["POST"]),
            ]
        )

    # -- configuration helpers ------------------------------------------------------------

    def fail(
        self,
        status: int,
        *,
        times: int = 1,
        message: str = "",
        retry_delay: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        for _ in range(times):
            self.faults.append(
                Fault(
                    status=status,
                    message=message or f"fake failure {status}",
                    retry_delay=retry_delay,
                    retry_after=retry_after,
                )
            )

    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)

    def replay(self, *replays: Replay) -> None:
        """Answer the next requests, one each, with these recorded bytes."""
        for replay in replays:
            self.faults.append(Fault(replay=replay))

    @property
    def generate_requests(self) -> list[Received]:
        return list(self.received)

    @property
    def last(self) -> Received:
        return self.received[-1]

    # -- generateContent ------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        rest = request.path_params["rest"]
        model, _, method = rest.partition(":")
        if method not in ("generateContent", "streamGenerateContent"):
            return error_response(404, f"method {method!r} not found")
        stream = method == "streamGenerateContent"
        if stream and request.query_params.get("alt") != "sse":
            return error_response(400, "this fake only streams with alt=sse")
        if self.api_key is not None:
            key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
            if not key:
                return error_response(403, NO_KEY_MESSAGE, stream=stream)
            if key != self.api_key:
                return error_response(400, BAD_KEY_MESSAGE, bad_key_details(), stream=stream)
        try:
            raw = json.loads(await request.body())
        except ValueError:
            return error_response(400, "Invalid JSON payload received.", stream=stream)
        body = camelize(raw)
        received = Received(model=model, stream=stream, headers=dict(request.headers), raw=raw, body=body)
        if self.record:
            self.received.append(received)
        fault = self.faults.popleft() if self.faults else Fault()
        wait = fault.delay or (self.stream_delay if stream else self.delay)
        if wait:
            await asyncio.sleep(wait)
        if fault.replay is not None:
            return self._replayed(fault.replay)
        if fault.status is not None:
            details = quota_details(fault.retry_delay) if fault.status == 429 else None
            if fault.retry_delay and details is None:
                details = [retry_info(fault.retry_delay)]
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            message = fault.message or f"fake failure {fault.status}"
            return error_response(fault.status, message, details, stream=stream, headers=headers)
        if fault.garbage is not None:
            return Response(fault.garbage, headers={"content-type": SSE_TYPE if stream else UNARY_TYPE})
        try:
            response = self._answer(model, body, received, fault)
        except _Invalid as exc:
            return error_response(exc.code, exc.message, exc.details, stream=stream)
        if not stream:
            return Response(pretty(response), headers={"content-type": UNARY_TYPE})
        return StreamingResponse(
            self._sse(model, response, fault),
            headers={"content-type": SSE_TYPE, "content-disposition": "attachment"},
        )

    @staticmethod
    def _replayed(replay: Replay) -> Response:
        headers = {**replay.headers, "content-type": replay.content_type}

        async def pieces() -> AsyncIterator[bytes]:
            for piece in replay.pieces():
                yield piece

        return StreamingResponse(pieces(), replay.status, headers)

    def _answer(self, model: str, body: dict[str, Any], received: Received, fault: Fault) -> dict[str, Any]:
        _check_fields(body)
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise _Invalid("* GenerateContentRequest.contents: contents is not specified")
        prompt_tokens = self._check_contents(model, contents, received)
        system = body.get("systemInstruction")
        if system:
            prompt_tokens += sum(_words(p.get("text", "")) for p in system.get("parts", []))
        gen_config = body.get("generationConfig") or {}
        if gen_config.get("responseJsonSchema") is not None and gen_config.get("responseSchema") is not None:
            raise _Invalid("responseJsonSchema and responseSchema cannot both be set")
        if gen_config.get("responseJsonSchema") is not None and gen_config.get("responseMimeType") != (
            "application/json"
        ):
            raise _Invalid("responseJsonSchema requires responseMimeType application/json")
        if self.replies:
            return self.replies.popleft()
        if fault.block_reason:
            # A blocked prompt: HTTP 200 with promptFeedback only, no candidates and no usage (generate/g14).
            ratings = [
                {"category": category, "probability": "HIGH" if i == 1 else "NEGLIGIBLE"}
                for i, category in enumerate(SAFETY_CATEGORIES)
            ]
            return {"promptFeedback": {"blockReason": fault.block_reason, "safetyRatings": ratings}}
        parts = self._reply_parts(model, body)
        output_tokens = sum(_words(p.get("text", "")) for p in parts) + sum(
            3 for p in parts if "functionCall" in p
        )
        usage: dict[str, Any] = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens + self.thoughts_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        }
        if self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        candidate: dict[str, Any] = {
            "content": {"parts": parts, "role": "model"},
            "finishReason": fault.finish_reason or "STOP",
            "index": 0,
        }
        if any("functionCall" in part for part in parts) and candidate["finishReason"] == "STOP":
            candidate["finishMessage"] = "Model generated function call(s)."
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": secrets.token_urlsafe(16)[:22],
        }

    def _check_contents(self, model: str, contents: list[Any], received: Received) -> int:
        tokens = 0
        for i, content in enumerate(contents):
            if content.get("role") not in ("user", "model"):
                raise _Invalid(f"contents[{i}].role: must be user or model")
            for j, part in enumerate(content.get("parts") or []):
                where = f"contents[{i}].parts[{j}]"
                if "text" in part:
                    tokens += _words(part["text"])
                if "inlineData" in part:
                    try:
                        blob = decode_b64(part["inlineData"]["data"])
                    except (KeyError, ValueError) as exc:
                        raise _Invalid(f"{where}.inline_data.data: Base64 decoding failed") from exc
                    received.inline_data.append((part["inlineData"].get("mimeType", ""), blob))
                    tokens += 258
                if "fileData" in part:
                    uri = part["fileData"].get("fileUri", "")
                    stored = self.files.get(uri.rsplit("/files/", 1)[-1])
                    if stored is None or stored.state != "ACTIVE":
                        raise _Invalid(f"{where}: file {uri} is not in an ACTIVE state", 400)
                    tokens += 1000
                if "functionCall" in part and model.startswith("gemini-3"):
                    signature = part.get("thoughtSignature")
                    if not signature:
                        raise _Invalid(
                            f"Function call is missing a thought_signature in functionCall parts. "
                            f"Additional data, function call `{part['functionCall'].get('name')}` , "
                            f"position {i + 1}."
                        )
                    if decode_b64(signature) not in self.issued_signatures:
                        raise _Invalid(f"{where}: Corrupted thought signature.")
                if "functionResponse" in part:
                    tokens += _words(json.dumps(part["functionResponse"].get("response", {})))
        return max(tokens, 1)

    def _signature(self) -> str:
        signature = secrets.token_bytes(24)
        self.issued_signatures.add(signature)
        # Real signatures use the standard alphabet, padded; these may contain '+' and '/'.
        return base64.b64encode(signature).decode()

    def _reply_parts(self, model: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        parts = self._reply_content(model, body)
        if model.startswith("gemini-3") and "text" in parts[-1]:
            # Gemini 3 signs its text answers too, on the (last) text part (generate/g02).
            parts[-1]["thoughtSignature"] = self._signature()
        return parts

    def _reply_content(self, model: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        last = body["contents"][-1]
        responses = [p["functionResponse"] for p in last.get("parts", []) if "functionResponse" in p]
        if responses:
            result = responses[0]
            return [
                {
                    "text": f"{result.get('name')} returned "
                    f"{json.dumps(result.get('response'), sort_keys=True)}"
                }
            ]
        declarations = [d for tool in body.get("tools") or [] for d in tool.get("functionDeclarations") or []]
        fcc = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
        mode = fcc.get("mode", "AUTO")
        if declarations and mode != "NONE":
            allowed = fcc.get("allowedFunctionNames") or [d["name"] for d in declarations]
            declaration = next(d for d in declarations if d["name"] == allowed[0])
            schema = declaration.get("parametersJsonSchema") or declaration.get("parameters") or {}
            call: dict[str, Any] = {"name": declaration["name"], "args": example_of(schema)}
            part: dict[str, Any] = {"functionCall": call}
            if model.startswith(("gemini-3", "gemini-2.5")):
                # Thinking models sign a function call on its part, beside (not inside) functionCall
                # (generate/g06, g07; stream/s04).
                part["thoughtSignature"] = self._signature()
            return [part]
        gen_config = body.get("generationConfig") or {}
        if gen_config.get("responseMimeType") == "application/json":
            schema = gen_config.get("responseJsonSchema") or {"type": "object"}
            return [{"text": json.dumps(example_of(schema))}]
        return [{"text": self.reply_text}]

    async def _sse(self, model: str, response: dict[str, Any], fault: Fault) -> AsyncIterator[bytes]:
        self.streams_opened += 1
        completed = False
        try:
            for index, chunk in enumerate(self._split(model, response)):
                if fault.error_after_chunks is not None and index == fault.error_after_chunks:
                    # Not an event: after HTTP 200 Gemini appends the error as raw pretty JSON, then ends
                    # the body (stream/s15).
                    yield pretty(error_body(fault.error_status, "fake mid-stream failure"))
                    completed = True
                    return
                if fault.drop_after_chunks is not None and index == fault.drop_after_chunks:
                    raise ConnectionResetError("fake dropped the stream")
                if fault.stall_after_chunks is not None and index == fault.stall_after_chunks:
                    await asyncio.sleep(60)
                if index and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                yield sse_event(chunk)
            completed = True
        finally:
            if completed:
                self.streams_completed += 1
            else:
                self.streams_abandoned += 1
                self.abandoned.set()

    def _split(self, model: str, response: dict[str, Any]) -> list[dict[str, Any]]:
        """Cut a whole response into stream chunks as Gemini streams it.

        Every chunk carries the running ``usageMetadata`` and the last one the ``finishReason``. Gemini 3 moves
        the signature of a text answer to a last chunk of empty text, and follows a function call with a
        separate ``{"text": ""}`` chunk that finishes (stream/s09, s11).
        """
        candidates = response.get("candidates")
        if not candidates:
            return [response]
        candidate = candidates[0]
        parts = (candidate.get("content") or {}).get("parts")
        if not parts:
            return [response]
        usage = response.get("usageMetadata", {})
        texts = [p for p in parts if "text" in p]
        others = [p for p in parts if "text" not in p]
        pieces: list[dict[str, Any]] = []
        for part in texts:
            pieces.extend({"text": t} for t in _pieces(part["text"], self.chunks))
        pieces.extend(others)
        signed = [p["thoughtSignature"] for p in texts if "thoughtSignature" in p]
        if model.startswith("gemini-3") and signed:
            pieces.append({"text": "", "thoughtSignature": signed[-1]})
        elif model.startswith("gemini-3") and others:
            pieces.append({"text": ""})
        total_out = usage.get("candidatesTokenCount", 0)
        chunks: list[dict[str, Any]] = []
        produced = 0
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            produced += (
                max(1, _words(piece["text"])) if piece.get("text") else 3 if "functionCall" in piece else 0
            )
            chunk_usage = {**usage, "candidatesTokenCount": total_out if last else min(produced, total_out)}
            chunk_usage["totalTokenCount"] = (
                usage.get("promptTokenCount", 0)
                + chunk_usage["candidatesTokenCount"]
                + usage.get("thoughtsTokenCount", 0)
            )
            out_candidate: dict[str, Any] = {"content": {"parts": [piece], "role": "model"}, "index": 0}
            if last:
                out_candidate["finishReason"] = candidate.get("finishReason", "STOP")
            chunks.append(
                {
                    "candidates": [out_candidate],
                    "usageMetadata": chunk_usage,
                    "modelVersion": response.get("modelVersion", ""),
                    "responseId": response.get("responseId", ""),
                }
            )
        return chunks

    # -- File API ------------------------------------------------------------

    async def _upload(self, request: Request) -> Response:
        version = request.path_params["version"]
        command = request.headers.get("x-goog-upload-command", "")
        upload_id = request.query_params.get("upload_id")
        if upload_id is None:
            if command != "start" or request.headers.get("x-goog-upload-protocol") != "resumable":
                return JSONResponse(error_body(400, "expected a resumable upload start"), status_code=400)
            meta = camelize(json.loads(await request.body() or b"{}")).get("file", {})
            file_id = secrets.token_hex(6)
            mime = request.headers.get("x-goog-upload-header-content-type") or meta.get("mimeType", "")
            self.files[file_id] = StoredFile(
                f"files/{file_id}", mime, bytearray(), self.file_polls_until_active
            )
            self.file_requests.append(("start", file_id))
            url = f"{request.base_url}upload/{version}/files?upload_id={file_id}&upload_protocol=resumable"
            return JSONResponse({}, headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})
        stored = self.files.get(upload_id)
        if stored is None:
            return JSONResponse(error_body(404, "upload not found"), status_code=404)
        offset = int(request.headers.get("x-goog-upload-offset", "0"))
        if offset != len(stored.data):
            return JSONResponse(error_body(400, "wrong upload offset"), status_code=400)
        stored.data.extend(await request.body())
        self.file_requests.append(("upload", upload_id))
        if "finalize" not in command:
            return Response(headers={"X-Goog-Upload-Status": "active"})
        stored.uploaded = True
        return JSONResponse(
            {"file": self._file_json(stored, request, version)}, headers={"X-Goog-Upload-Status": "final"}
        )

    async def _file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        stored = self.files.get(file_id)
        if stored is None:
            return JSONResponse(error_body(404, f"File {file_id} not found."), status_code=404)
        if request.method == "DELETE":
            self.file_requests.append(("delete", file_id))
            self.deleted_files.append(stored.name)
            del self.files[file_id]
            return JSONResponse({})
        self.file_requests.append(("get", file_id))
        if stored.state == "PROCESSING":
            if stored.polls_until_active <= 0:
                stored.state = "ACTIVE"
            stored.polls_until_active -= 1
        return JSONResponse(self._file_json(stored, request, request.path_params["version"]))

    @staticmethod
    def _file_json(stored: StoredFile, request: Request, version: str) -> dict[str, Any]:
        return {
            "name": stored.name,
            "mimeType": stored.mime_type,
            "sizeBytes": str(len(stored.data)),
            "uri": f"{request.base_url}{version}/{stored.name}",
            "state": stored.state,
        }


def _words(text: str) -> int:
    return len(text.split())


def _pieces(text: str, count: int | None) -> list[str]:
    if count is None:
        words = text.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]
    size = max(1, -(-len(text) // count))
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    return pieces + [""] * (count - len(pieces))


def example_of(schema: Any, name: str = "") -> Any:
    """A value that satisfies a (simple) JSON schema, as a constrained model would produce."""
    if not isinstance(schema, dict):
        return {}
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    kind = str(kind).lower()
    if kind == "object":
        props = schema.get("properties", {})
        return {key: example_of(sub, key) for key, sub in props.items()}
    if kind == "array":
        return [example_of(schema.get("items", {}))] * max(1, int(schema.get("minItems", 1)))
    if kind == "string":
        return "San Francisco" if name in ("location", "city") else "example"
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1.5))
    if kind == "boolean":
        return True
    return None


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="A fake Gemini API server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--api-key", default=None, help="require this x-goog-api-key (default: accept any)")
    parser.add_argument("--chunks", type=int, default=None, help="stream replies in exactly this many chunks")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="pause between stream chunks")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause before every answer")
    parser.add_argument(
        "--stream-delay-ms",
        type=float,
        default=None,
        help="pause before a stream's first chunk (default: --delay-ms)",
    )
    parser.add_argument(
        "--keep-alive-seconds",
        type=int,
        default=5,
        help="close a keep-alive connection idle this long (uvicorn's default 5; Gemini keeps them far longer)",
    )
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="the text every generation answers")
    args = parser.parse_args(argv)
    fake = FakeGemini(
        api_key=args.api_key,
        chunks=args.chunks,
        chunk_delay=args.chunk_delay_ms / 1000,
        delay=args.delay_ms / 1000,
        stream_delay=None if args.stream_delay_ms is None else args.stream_delay_ms / 1000,
        record=False,
    )
    fake.reply_text = args.reply
    uvicorn.run(
        fake.app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=args.keep_alive_seconds,
    )


if __name__ == "__main__":
    main()
