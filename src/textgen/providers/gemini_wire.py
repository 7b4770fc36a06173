"""What Gemini sends, read as plain JSON: responses, SSE framing, error bodies.

Written from the recordings in ``shared/reference/gemini-fixtures`` (see docs/gemini.md): events are
``data: <json>`` lines separated by a blank line with CRLF, LF or CR line ends; every chunk carries the cumulative
``usageMetadata``; a candidate may lack ``content`` and ``content`` may lack ``parts``; a blocked prompt has no
candidates; an error after HTTP 200 arrives as a raw (pretty-printed) ``{"error": ...}`` tail after the last
event. Unknown fields are ignored; a field of the wrong type makes the response unreadable (502).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from textgen import media
from textgen.errors import UpstreamError
from textgen.providers.base import FunctionCall, Generation, StreamChunk

OK_FINISH_REASONS = frozenset({"STOP", "MAX_TOKENS", "FINISH_REASON_UNSPECIFIED"})
_CONTENT_POLICY = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "LANGUAGE",
        "IMAGE_SAFETY",
    }
)
_FINISH_EXPLAINED = {
    "SAFETY": "the response was flagged by Gemini's safety filters",
    "RECITATION": "the response too closely resembled existing material",
    "BLOCKLIST": "the response contained a blocked term",
    "PROHIBITED_CONTENT": "the response was flagged as prohibited content",
    "SPII": "the response contained sensitive personal information",
    "LANGUAGE": "the response language is not supported",
    "MALFORMED_FUNCTION_CALL": "the model produced a function call that does not parse",
    "UNEXPECTED_TOOL_CALL": "the model called a tool that is not enabled",
    "TOO_MANY_TOOL_CALLS": "the model made too many tool calls",
    "OTHER": "Gemini gave no reason",
}
# The top-level fields of a GenerateContentResponse that a stream relays to its client.
RAW_FIELDS = ("candidates", "promptFeedback", "usageMetadata", "modelVersion", "responseId", "createTime")
_SSE_FIELDS = (b"event:", b"id:", b"retry:")


class GeminiAPIError(Exception):
    """Gemini answered with an error: an HTTP status other than 200, or an ``{"error": ...}`` body."""

    def __init__(
        self,
        code: int,
        status: str = "",
        message: str = "",
        details: list[Any] | None = None,
        retry_after_header: str | None = None,
    ) -> None:
        super().__init__(f"{code} {status}: {message}")
        self.code = code
        self.status = status
        self.message = message
        self.details = details or []
        self.retry_after_header = retry_after_header


def unreadable(what: str, detail: object) -> UpstreamError:
    return UpstreamError(f"Gemini sent {what} that could not be read: {detail}", status_code=502)


def api_error(http_status: int, body: bytes, retry_after_header: str | None = None) -> GeminiAPIError:
    """The error of a response with status ``http_status`` and this body (JSON when Gemini sent it)."""
    try:
        parsed = orjson.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, list) and len(parsed) == 1:  # the JSON-array framing of a stream without alt=sse
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return error_from_json(error, http_status, retry_after_header)
    text = body.decode("utf-8", "replace").strip()
    return GeminiAPIError(
        http_status, message=" ".join(text.split())[:200], retry_after_header=retry_after_header
    )


def error_from_json(
    error: dict[str, Any], http_status: int = 0, retry_after_header: str | None = None
) -> GeminiAPIError:
    code = error.get("code")
    details = error.get("details")
    return GeminiAPIError(
        code if isinstance(code, int) and code else http_status,
        str(error.get("status") or ""),
        str(error.get("message") or ""),
        details if isinstance(details, list) else None,
        retry_after_header,
    )


def decode_response(body: bytes) -> dict[str, Any]:
    """The JSON object of a ``generateContent`` answer with status 200 (an error body raises it)."""
    try:
        parsed = orjson.loads(body)
    except ValueError as exc:
        raise unreadable("a response", exc) from None
    return _response_object(parsed, "a response")


def _response_object(parsed: Any, what: str) -> dict[str, Any]:
    if not isinstance(parsed, dict):
        raise unreadable(what, f"expected a JSON object, got {type(parsed).__name__}")
    error = parsed.get("error")
    if isinstance(error, dict):
        raise error_from_json(error)
    return parsed


class SSEParser:
    """Turns the bytes of a ``streamGenerateContent?alt=sse`` body into response objects, as they arrive.

    ``feed`` returns the complete events so far; ``close`` (at the end of the body) returns the last one if the
    stream ended without a blank line, and raises the error of a raw JSON tail (or 502 for other text).
    """

    def __init__(self) -> None:
        self._pending = b""  # an incomplete line, or one ending in CR (its LF may come next)
        self._data: list[bytes] = []
        self._tail: list[bytes] = []  # lines outside the SSE framing: a raw JSON error after the events
        self._deferred: Exception | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._pending:
            data = self._pending + data
        self.raise_deferred()
        lines = data.splitlines(keepends=True)
        self._pending = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        events: list[dict[str, Any]] = []
        for line in lines:
            try:
                event = self._line(line.rstrip(b"\r\n"))
            except Exception as exc:
                if not events:
                    raise
                self._deferred = exc  # the events before the error go out first
                break
            if event is not None:
                events.append(event)
        return events

    def raise_deferred(self) -> None:
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            raise exc

    def close(self) -> list[dict[str, Any]]:
        """The events still buffered at the end of the body; then ``raise_deferred`` raises what followed them."""
        self.raise_deferred()
        events: list[dict[str, Any]] = []
        try:
            pending, self._pending = self._pending, b""
            for line in pending.splitlines():
                event = self._line(line)
                if event is not None:
                    events.append(event)
            if self._data:
                events.append(self._dispatch())
            if self._tail:
                self._raise_tail()
        except Exception as exc:
            if not events:
                raise
            self._deferred = exc
        return events

    def _raise_tail(self) -> None:
        text, self._tail = b"\n".join(self._tail), []
        try:
            parsed = orjson.loads(text)
        except ValueError:
            raise unreadable("a stream", f"unexpected text {_preview(text)}") from None
        _response_object(parsed, "a stream")  # raises the error of an {"error": ...} tail
        raise unreadable("a stream", f"unexpected text {_preview(text)}")

    def _line(self, line: bytes) -> dict[str, Any] | None:
        if self._tail:
            self._tail.append(line)
            return None
        if not line:
            return self._dispatch() if self._data else None
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b":") or line.startswith(_SSE_FIELDS):
            pass
        else:
            self._tail.append(line)
        return None

    def _dispatch(self) -> dict[str, Any]:
        data, self._data = b"\n".join(self._data), []
        try:
            parsed = orjson.loads(data)
        except ValueError as exc:
            raise unreadable("a stream event", exc) from None
        return _response_object(parsed, "a stream event")


def _preview(text: bytes) -> str:
    return repr(text[:80].decode("utf-8", "replace"))


# -- mapping a response ------------------------------------------------------------------------------


def _field(container: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = container.get(key)
    if value is not None and not isinstance(value, kind):
        raise unreadable("a response", f"{what} is a {type(value).__name__}")
    return value


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():  # int64 values are strings in proto3 JSON
        return int(value)
    return 0


def usage_tokens(response: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens; thinking is billed as output. Every chunk carries the running totals."""
    usage = _field(response, "usageMetadata", dict, "usageMetadata")
    if not usage:
        return 0, 0
    prompt = _count(usage, "promptTokenCount") + _count(usage, "toolUsePromptTokenCount")
    return prompt, _count(usage, "candidatesTokenCount") + _count(usage, "thoughtsTokenCount")


def _first_candidate(response: dict[str, Any]) -> dict[str, Any] | None:
    candidates = _field(response, "candidates", list, "candidates")
    if not candidates:
        return None
    candidate = candidates[0]
    if not isinstance(candidate, dict):
        raise unreadable("a response", "a candidate is not an object")
    return candidate


def check_response(response: dict[str, Any]) -> str | None:
    """Raise UpstreamError for a blocked prompt or a failed finish; return the finish reason if any."""
    feedback = _field(response, "promptFeedback", dict, "promptFeedback")
    candidate = _first_candidate(response)
    # A blocked prompt has a blockReason and no candidates; without candidates, a blockReasonMessage alone is one too.
    if feedback and (
        feedback.get("blockReason") or (candidate is None and feedback.get("blockReasonMessage"))
    ):
        reason = f" ({feedback['blockReason']})" if feedback.get("blockReason") else ""
        message = feedback.get("blockReasonMessage")
        detail = f": {message}" if message else ""
        raise UpstreamError(f"Gemini blocked the prompt{reason}{detail}", status_code=400)
    if candidate is None or not candidate.get("finishReason"):
        return None
    name = str(candidate["finishReason"])
    if name not in OK_FINISH_REASONS:
        # Gemini's own finishMessage, when it sends one, says more than the reason's name.
        message = candidate.get("finishMessage")
        explained = message if isinstance(message, str) and message.strip() else None
        explained = explained or _FINISH_EXPLAINED.get(name, "see Gemini's finish reasons")
        raise UpstreamError(
            f"Gemini stopped the response with finish reason {name}: {explained}",
            status_code=400 if name in _CONTENT_POLICY else 502,
        )
    return name


def standard_base64(value: str) -> str:
    """A base64 string in the standard alphabet, padded (Gemini sends that; a proxy might not)."""
    try:
        return base64.b64encode(media.decode_base64(value)).decode()
    except (ValueError, binascii.Error):
        return value


def response_parts(response: dict[str, Any]) -> tuple[str, list[FunctionCall]]:
    """The text (thought parts excluded) and the function calls of the first candidate."""
    candidate = _first_candidate(response)
    if candidate is None:
        return "", []
    content = _field(candidate, "content", dict, "content")
    parts = _field(content, "parts", list, "content.parts") if content else None
    text: list[str] = []
    calls: list[FunctionCall] = []
    for part in parts or ():
        if not isinstance(part, dict):
            raise unreadable("a response", "a part is not an object")
        value = part.get("text")
        if isinstance(value, str) and not part.get("thought"):
            text.append(value)
        call = part.get("functionCall")
        if isinstance(call, dict):
            signature = part.get("thoughtSignature")
            args = call.get("args")
            call_id = call.get("id")
            calls.append(
                FunctionCall(
                    name=str(call.get("name") or ""),
                    args=args if isinstance(args, dict) else {},
                    id=call_id if isinstance(call_id, str) else None,
                    thought_signature=standard_base64(signature) if isinstance(signature, str) else None,
                )
            )
    return "".join(text), calls


def to_generation(response: dict[str, Any]) -> Generation:
    finish = check_response(response)
    if _first_candidate(response) is None:
        raise UpstreamError(
            "Gemini answered without a candidate (no text, no function call)", status_code=502
        )
    text, calls = response_parts(response)
    input_tokens, output_tokens = usage_tokens(response)
    return Generation(
        text=text,
        function_calls=calls,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish_reason=finish or "STOP",
        model_version=str(response.get("modelVersion") or ""),
    )


def to_chunk(response: dict[str, Any]) -> StreamChunk:
    finish = check_response(response)
    text, calls = response_parts(response)
    input_tokens, output_tokens = usage_tokens(response)
    return StreamChunk(
        text=text,
        function_calls=calls,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish_reason=finish,
        model_version=str(response.get("modelVersion") or ""),
        raw={key: response[key] for key in RAW_FIELDS if key in response},
    )
