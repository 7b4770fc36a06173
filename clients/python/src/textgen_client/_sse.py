"""Server-Sent Events, decoded line by line (WHATWG event-stream rules), and a stream's chunks turned into
text deltas, function calls and the closing ``StreamEnd``. No I/O here: the sync and async streams share it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from textgen_client.errors import StreamError, StreamInterrupted
from textgen_client.models import FunctionCall, StreamEnd, StreamEvent, TextDelta

TASK_ID_HEADER = "x-textgen-task-id"
TASK_ID_COMMENT = "task "  # the stream's first line is ": task <id>"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str


@dataclass(frozen=True, slots=True)
class Comment:
    text: str


@dataclass
class SSEDecoder:
    """Feed it the lines of an event stream; it returns each event as its blank line arrives."""

    _event: str = ""
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> ServerSentEvent | Comment | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return Comment(line[1:].removeprefix(" "))
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None  # "id" and "retry" matter only to reconnecting EventSource clients


@dataclass
class StreamState:
    """Turns decoded events of ``POST /sse/text_generator/stream/`` into stream events."""

    task_id: str | None = None
    end: StreamEnd | None = None
    _text: list[str] = field(default_factory=list)
    _calls: list[FunctionCall] = field(default_factory=list)
    _finish_reason: str | None = None
    _input_tokens: int = 0
    _output_tokens: int = 0

    def feed(self, item: ServerSentEvent | Comment) -> list[StreamEvent]:
        if isinstance(item, Comment):
            if item.text.startswith(TASK_ID_COMMENT) and self.task_id is None:
                self.task_id = item.text[len(TASK_ID_COMMENT) :].strip() or None
            return []
        try:
            data = json.loads(item.data)
        except ValueError:
            return []  # not a JSON chunk: nothing a client can use
        if not isinstance(data, dict):
            return []
        creatify = data.get("creatify")
        if isinstance(creatify, dict) and creatify.get("id"):
            self.task_id = str(creatify["id"])
        error = data.get("error")
        if item.event == "error" or error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            code = error.get("code") if isinstance(error, dict) else None
            raise StreamError(
                str(message or "stream failed"),
                status_code=code if isinstance(code, int) else None,
                task_id=self.task_id,
            )
        events = self._parts(data)
        if isinstance(creatify, dict) and creatify.get("id"):
            self.end = StreamEnd(
                task_id=str(creatify["id"]),
                credits_used=float(creatify.get("credits_used") or 0.0),
                text="".join(self._text),
                function_calls=tuple(self._calls),
                finish_reason=self._finish_reason,
                input_tokens=self._input_tokens,
                output_tokens=self._output_tokens,
            )
            events.append(self.end)
        return events

    def _parts(self, data: dict[str, Any]) -> list[StreamEvent]:
        usage = data.get("usageMetadata")
        if isinstance(usage, dict):
            self._input_tokens = max(self._input_tokens, int(usage.get("promptTokenCount") or 0))
            self._output_tokens = max(self._output_tokens, int(usage.get("candidatesTokenCount") or 0))
        candidates = data.get("candidates")
        if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
            return []
        candidate = candidates[0]
        if candidate.get("finishReason"):
            self._finish_reason = str(candidate["finishReason"])
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        events: list[StreamEvent] = []
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, dict) or part.get("thought"):
                continue
            text = part.get("text")
            if isinstance(text, str) and text:
                self._text.append(text)
                events.append(TextDelta(text))
            call = part.get("functionCall")
            if isinstance(call, dict):
                args = call.get("args")
                fc = FunctionCall(
                    name=str(call.get("name", "")),
                    args=dict(args) if isinstance(args, dict) else {},
                    id=call.get("id"),
                    thought_signature=part.get("thoughtSignature"),
                )
                self._calls.append(fc)
                events.append(fc)
        return events

    def interrupted(self, cause: str) -> StreamInterrupted:
        where = f"; look the task up by id {self.task_id}" if self.task_id else ""
        return StreamInterrupted(f"stream ended before its last chunk ({cause}){where}", task_id=self.task_id)
