"""Verification of signed webhooks, per the Standard Webhooks specification (https://www.standardwebhooks.com/).

The signature is ``v1,`` + base64(HMAC-SHA256(secret, "{webhook-id}.{webhook-timestamp}.{body}")), where the
secret is the base64 after ``whsec_``; several space-separated signatures may be sent (during a secret rotation)
and any one of them matching is enough. A timestamp more than ``tolerance`` seconds away from now is refused, so
a captured request cannot be replayed later.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Mapping

from textgen_client.errors import WebhookVerificationError
from textgen_client.models import Task, WebhookMessage

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_SECONDS = 300


def _secret_bytes(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        key = secret
    else:
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the webhook secret is not whsec_ followed by base64") from None
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign(secret: str | bytes, message_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``v1,<base64>`` signature of one message (what a sender puts in ``webhook-signature``)."""
    payload = body.encode() if isinstance(body, str) else body
    signed = f"{message_id}.{timestamp}.".encode() + payload
    digest = hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str | bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> WebhookMessage:
    """Check a webhook's signature and timestamp and return its message; raise ``WebhookVerificationError``.

    Pass the body exactly as received: re-serialised JSON has other bytes and no longer matches.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    message_id = lowered.get("webhook-id")
    timestamp_text = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (message_id and timestamp_text and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > current + tolerance:
        raise WebhookVerificationError("webhook-timestamp is in the future")

    expected = sign(secret, message_id, timestamp, body).encode()
    # Compare every candidate, so the time taken does not reveal which one (or whether any) came close.
    matched = False
    for candidate in signatures.split(" "):
        if candidate.startswith("v1,"):
            matched |= hmac.compare_digest(expected, candidate.encode())
    if not matched:
        raise WebhookVerificationError("no signature matches")

    try:
        payload = json.loads(body)
    except ValueError:
        raise WebhookVerificationError("the body is not JSON") from None
    if not isinstance(payload, dict) or "id" not in payload:
        raise WebhookVerificationError("the body is not a task payload")
    return WebhookMessage(
        message_id=message_id,
        timestamp=dt.datetime.fromtimestamp(timestamp, dt.UTC),
        task=Task.from_json(payload),
        payload=payload,
    )
