"""Idempotency keys: one create per (account, key) until the key expires, safe across processes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from textgen.storage.database import Database
from textgen.storage.rows import utcnow
from textgen.storage.tables import idempotency_keys

_k = idempotency_keys
_THIS = sa.and_(_k.c.account_id == sa.bindparam("b_account"), _k.c.key == sa.bindparam("b_key"))


@dataclass(frozen=True, slots=True)
class KeyRow:
    account_id: int
    key: str
    request_hash: str
    task_id: str | None
    status_code: int | None
    response: str | None
    created_at: dt.datetime
    expires_at: dt.datetime


class IdempotencyStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        dialect: Any = postgresql if db.is_postgres else sqlite
        self._insert = dialect.insert(_k).on_conflict_do_nothing(index_elements=["account_id", "key"])

    async def claim(self, account_id: int, key: str, request_hash: str, ttl: float) -> tuple[bool, KeyRow]:
        """Take ``key`` for a new request (True), or return the request that holds it (False).

        An expired key is taken anew. The primary key makes this safe between processes.
        """
        now = utcnow()
        params = {"b_account": account_id, "b_key": key}

        def work(conn: Connection) -> tuple[bool, KeyRow]:
            conn.execute(_k.delete().where(_THIS, _k.c.expires_at < now), params)
            inserted = conn.execute(
                self._insert,
                {
                    "account_id": account_id,
                    "key": key,
                    "request_hash": request_hash,
                    "created_at": now,
                    "expires_at": now + dt.timedelta(seconds=ttl),
                },
            ).rowcount
            row = conn.execute(sa.select(_k).where(_THIS), params).one()
            return bool(inserted), KeyRow(**row._mapping)

        return await self.db.run(work)

    async def get(self, account_id: int, key: str) -> KeyRow | None:
        params = {"b_account": account_id, "b_key": key}
        row = await self.db.run(lambda conn: conn.execute(sa.select(_k).where(_THIS), params).first())
        return KeyRow(**row._mapping) if row else None

    async def complete(self, account_id: int, key: str, status_code: int, response: str) -> None:
        """Keep the answer the first request got, to replay it."""
        params = {"b_account": account_id, "b_key": key, "b_status": status_code, "b_response": response}
        statement = (
            _k.update()
            .where(_THIS)
            .values(status_code=sa.bindparam("b_status"), response=sa.bindparam("b_response"))
        )
        await self.db.run(lambda conn: conn.execute(statement, params))

    async def release(self, account_id: int, key: str) -> None:
        """Free a key whose request was refused before any task existed (a retry may then succeed)."""
        params = {"b_account": account_id, "b_key": key}
        statement = _k.delete().where(_THIS, _k.c.task_id.is_(None))
        await self.db.run(lambda conn: conn.execute(statement, params))


def attach_task(conn: Connection, account_id: int, key: str, task_id: str) -> None:
    """Record, inside the transaction that creates the task, which task a key made."""
    conn.execute(_k.update().where(_THIS).values(task_id=task_id), {"b_account": account_id, "b_key": key})
