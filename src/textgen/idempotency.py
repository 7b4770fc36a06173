"""Idempotent creates: the same ``Idempotency-Key`` and body from the same account answer with the same task.

The first request with a key holds it (a row under a primary key, so two processes cannot both hold it);
its answer is kept and replayed, with ``Idempotency-Replayed: true``, to every repeat until the key expires
(``TEXTGEN_IDEMPOTENCY_TTL_SECONDS``, 24 h). A repeat with another body is a 422. A repeat that arrives while
the first is still being admitted waits for it, up to a few seconds, then gets a 409: never a second task.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from textgen.errors import BadRequest, Conflict, UnprocessableEntity
from textgen.storage.idempotency import IdempotencyStore
from textgen.storage.rows import AccountRow

HEADER = "idempotency-key"
REPLAYED_HEADER = "Idempotency-Replayed"
MAX_KEY_LENGTH = 255
WAIT_SECONDS = 5.0  # how long a repeat waits for the first request's answer before a 409


@dataclass(frozen=True, slots=True)
class Held:
    """This request holds the key: it creates the task, then records its answer."""

    account_id: int
    key: str


@dataclass(frozen=True, slots=True)
class Replay:
    """A repeat: the first request's answer (``body`` None: render the task as it is now)."""

    status_code: int
    body: str | None
    task_id: str | None


def check_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not value or len(value) > MAX_KEY_LENGTH:
        raise BadRequest(f"Idempotency-Key: must be 1 to {MAX_KEY_LENGTH} characters")
    return value


class Idempotency:
    def __init__(self, store: IdempotencyStore, ttl_seconds: float) -> None:
        self.store = store
        self.ttl_seconds = ttl_seconds

    async def begin(self, account: AccountRow, key: str, endpoint: str, body: bytes) -> Held | Replay:
        digest = hashlib.sha256(endpoint.encode() + b"\0" + body).hexdigest()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_SECONDS
        while True:
            held, row = await self.store.claim(account.id, key, digest, self.ttl_seconds)
            if held:
                return Held(account.id, key)
            if row.request_hash != digest:
                raise UnprocessableEntity(
                    "Idempotency-Key: this key was already used with a different request body or endpoint"
                )
            if row.status_code is not None:
                return Replay(row.status_code, row.response, row.task_id)
            if loop.time() >= deadline:
                if row.task_id is not None:
                    return Replay(201, None, row.task_id)
                raise Conflict(
                    "Idempotency-Key: a request with this key is still being processed; retry later"
                )
            await asyncio.sleep(0.05)

    async def complete(self, held: Held, status_code: int, body: str) -> None:
        await self.store.complete(held.account_id, held.key, status_code, body)

    async def release(self, held: Held) -> None:
        await self.store.release(held.account_id, held.key)
