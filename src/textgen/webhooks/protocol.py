"""Response schemas of the webhook inspection endpoints."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field


class WebhookAttempt(BaseModel):
    attempted_at: dt.datetime
    status_code: int | None = Field(description="the receiver's HTTP status; null when no answer came")
    error: str | None = Field(description="why the attempt failed; null on success")
    duration_ms: float
    next_attempt_at: dt.datetime | None = Field(description="when the next attempt follows; null if none")


class WebhookDelivery(BaseModel):
    id: str = Field(description="the webhook-id header, the same on every attempt of this delivery")
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempt_count: int
    next_attempt_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    attempts: list[WebhookAttempt]


class WebhookDeliveryList(BaseModel):
    task_id: str
    results: list[WebhookDelivery]
