"""The webhook body of a finished task, as the guide documents it."""

from __future__ import annotations

from typing import Any

from textgen import jsoncodec
from textgen.catalog import from_micro
from textgen.storage.rows import TaskRow


def payload_dict(task: TaskRow) -> dict[str, Any]:
    return {
        "id": task.id,
        "status": task.status.value,
        "response_text": task.response_text,
        "response_function_calls": task.response_function_calls,
        "failed_reason": task.failed_reason,
        "credits_used": from_micro(task.credits_used),
    }


def webhook_payload(task: TaskRow) -> str:
    """The exact bytes (as text) that are signed and sent; the same on every attempt."""
    return jsoncodec.dumps(payload_dict(task)).decode()
