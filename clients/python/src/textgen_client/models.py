"""What the API returns, as typed values: tasks, function calls and the events of a stream."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

PENDING: Final = "pending"
RUNNING: Final = "running"
DONE: Final = "done"
FAILED: Final = "failed"
CANCELLED_REASON: Final = "cancelled"


def _timestamp(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A function call issued by the model."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    thought_signature: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FunctionCall:
        """From a task's ``response_function_calls`` item."""
        args = data.get("args")
        return cls(
            name=str(data.get("name", "")),
            args=dict(args) if isinstance(args, Mapping) else {},
            id=data.get("id"),
            thought_signature=data.get("thought_signature"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "args": self.args}
        if self.id is not None:
            out["id"] = self.id
        if self.thought_signature is not None:
            out["thought_signature"] = self.thought_signature
        return out

    def to_message(self) -> dict[str, Any]:
        """The ``model`` message that replays this call in the next request's history."""
        return {"role": "model", "function_call": self.to_json()}


def function_response(name: str, response: Mapping[str, Any], id: str | None = None) -> dict[str, Any]:
    """The ``user`` message that answers a function call with its result."""
    part: dict[str, Any] = {"name": name, "response": dict(response)}
    if id is not None:
        part["id"] = id
    return {"role": "user", "function_response": part}


@dataclass(frozen=True, slots=True)
class Task:
    """A text generation task. ``status`` is one of pending, running, done, failed."""

    id: str
    status: str
    model_name: str = ""
    response_text: str = ""
    function_calls: tuple[FunctionCall, ...] = ()
    failed_reason: str = ""
    credits_used: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    replayed: bool = False
    """True when the server answered an ``Idempotency-Key`` it had already seen with the original task."""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The JSON object as received, including fields this version of the client does not know."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, replayed: bool = False) -> Task:
        """From a task object (``GET /sse/text_generator/{id}/``) or a webhook payload."""
        calls = data.get("response_function_calls") or []
        return cls(
            id=str(data["id"]),
            status=str(data.get("status", "")),
            model_name=str(data.get("model_name", "")),
            response_text=str(data.get("response_text") or ""),
            function_calls=tuple(FunctionCall.from_json(c) for c in calls if isinstance(c, Mapping)),
            failed_reason=str(data.get("failed_reason") or ""),
            credits_used=float(data.get("credits_used") or 0.0),
            input_tokens=int(data.get("input_tokens") or 0),
            output_tokens=int(data.get("output_tokens") or 0),
            created_at=_timestamp(data.get("created_at")),
            updated_at=_timestamp(data.get("updated_at")),
            replayed=replayed,
            raw=dict(data),
        )

    @property
    def finished(self) -> bool:
        """Done or failed: the task will not change any more."""
        return self.status in (DONE, FAILED)

    @property
    def cancelled(self) -> bool:
        return self.status == FAILED and self.failed_reason == CANCELLED_REASON


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of generated text, in the order the model produced it."""

    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last event of a stream: the task it created, what it cost, and everything it produced."""

    task_id: str
    credits_used: float
    text: str
    function_calls: tuple[FunctionCall, ...]
    finish_reason: str | None
    input_tokens: int
    output_tokens: int


StreamEvent = TextDelta | FunctionCall | StreamEnd
"""What iterating a stream yields: text deltas and function calls, then one ``StreamEnd``."""


@dataclass(frozen=True, slots=True)
class WebhookMessage:
    """A verified webhook: ``message_id`` is the same on every retry of one delivery (deduplicate on it)."""

    message_id: str
    timestamp: dt.datetime
    task: Task
    payload: Mapping[str, Any]
