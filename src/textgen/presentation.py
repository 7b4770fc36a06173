"""How the service's rows are shown: API responses, pages, webhook deliveries, accounts and keys.

One place for presentation, used by the HTTP handlers, the admin API and the CLI.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from textgen import jsoncodec
from textgen.catalog import from_micro
from textgen.protocol import RemainingCredits, TextGenResponse
from textgen.storage.admin import KeyRow
from textgen.storage.rows import AccountRow, DeliveryHistory, TaskRow
from textgen.webhooks.protocol import WebhookAttempt, WebhookDelivery, WebhookDeliveryList


def task_model(task: TaskRow) -> TextGenResponse:
    request = task.request
    return TextGenResponse.model_validate(
        {
            "id": task.id,
            "model_name": task.model_name,
            "messages": request.get("messages", []),
            "system_instruction": request.get("system_instruction", ""),
            "config": request.get("config", {}),
            "status": task.status,
            "response_text": task.response_text,
            "response_function_calls": task.response_function_calls,
            "failed_reason": task.failed_reason,
            "credits_used": from_micro(task.credits_used),
            "input_tokens": task.input_tokens,
            "output_tokens": task.output_tokens,
            "created_at": task.created_at,
            "updated_at": task.updated_at,
        },
        strict=False,  # stored data was validated (strictly) when it came in
    )


def task_json(task: TaskRow) -> dict[str, Any]:
    """A task as the API returns it."""
    return task_model(task).model_dump(mode="json", exclude_none=True)


def encode_json(value: Any) -> bytes:
    """JSON as the API sends it: compact UTF-8 (orjson)."""
    return jsoncodec.dumps(value)


def task_page(results: list[bytes], next_url: str | None, previous_url: str | None) -> bytes:
    """A page of tasks (a ``TaskPage``) from tasks already encoded with ``encode_json(task_json(...))``."""
    head = b'{"next":' + encode_json(next_url) + b',"previous":' + encode_json(previous_url)
    return head + b',"results":[' + b",".join(results) + b"]}"


def credits_json(balance: int) -> dict[str, Any]:
    return RemainingCredits(remaining_credits=from_micro(balance)).model_dump()


def delivery_model(history: DeliveryHistory) -> WebhookDelivery:
    d = history.delivery
    return WebhookDelivery(
        id=d.id,
        url=d.url,
        status=d.status.value,  # type: ignore[arg-type]
        attempt_count=d.attempt_count,
        next_attempt_at=d.next_attempt_at,
        created_at=d.created_at,
        updated_at=d.updated_at,
        attempts=[
            WebhookAttempt(
                attempted_at=a.attempted_at,
                status_code=a.status_code,
                error=a.error,
                duration_ms=a.duration_ms,
                next_attempt_at=a.next_attempt_at,
            )
            for a in history.attempts
        ],
    )


def delivery_json(history: DeliveryHistory) -> dict[str, Any]:
    return delivery_model(history).model_dump(mode="json")


def deliveries_json(task_id: str, histories: list[DeliveryHistory]) -> dict[str, Any]:
    body = WebhookDeliveryList(task_id=task_id, results=[delivery_model(h) for h in histories])
    return body.model_dump(mode="json")


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def key_view(key: KeyRow) -> dict[str, Any]:
    return {
        "key_id": key.id,
        "prefix": key.prefix,
        "created_at": key.created_at.isoformat(),
        "last_used_at": iso(key.last_used_at),
        "revoked_at": iso(key.revoked_at),
    }


def account_view(account: AccountRow, keys: list[KeyRow] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "api_id": account.api_id,
        "name": account.name,
        "remaining_credits": from_micro(account.balance),
        "rate_limit_per_minute": account.rate_limit,
        "disabled": account.disabled,
        "webhook_secret": account.webhook_secret,
        "created_at": account.created_at.isoformat(),
    }
    if account.webhook_secret_previous and account.webhook_secret_previous_until:
        out["webhook_secret_previous_until"] = account.webhook_secret_previous_until.isoformat()
    if keys is not None:
        out["keys"] = [key_view(k) for k in keys]
    return out
