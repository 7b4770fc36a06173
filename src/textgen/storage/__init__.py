"""Persistence: a database executor and the operations grouped by what they keep.

``Storage`` holds them for one process: ``accounts`` (accounts and their ledger), ``tasks`` (the task
queue), ``outbox`` (webhook deliveries) and ``admin`` (keys, account state and usage reads for operators).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from textgen.settings import Settings
from textgen.storage.accounts import AccountStore
from textgen.storage.admin import AdminStore
from textgen.storage.database import Database
from textgen.storage.engine import create_engine
from textgen.storage.idempotency import IdempotencyStore
from textgen.storage.outbox import Outbox
from textgen.storage.queue import TaskQueue
from textgen.storage.rows import TaskRow


@dataclass(frozen=True, slots=True)
class Storage:
    db: Database
    accounts: AccountStore
    tasks: TaskQueue
    outbox: Outbox
    admin: AdminStore
    idempotency: IdempotencyStore

    @classmethod
    def open(cls, settings: Settings, payload: Callable[[TaskRow], str] | None = None) -> Storage:
        """Storage on the configured database; ``payload`` renders webhook bodies (the webhooks package's)."""
        if payload is None:
            from textgen.webhooks.payload import webhook_payload

            payload = webhook_payload
        db = Database(create_engine(settings))
        return cls(
            db=db,
            accounts=AccountStore(db),
            tasks=TaskQueue(db, payload),
            outbox=Outbox(db),
            admin=AdminStore(db),
            idempotency=IdempotencyStore(db),
        )

    async def aclose(self) -> None:
        await self.db.aclose()
