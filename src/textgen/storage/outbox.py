"""The webhook outbox: deliveries queued with the task's outcome, claimed by senders, and their attempts."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from textgen import ids
from textgen.notify import DELIVERIES_CHANNEL
from textgen.states import DeliveryStatus
from textgen.storage.database import Database
from textgen.storage.rows import (
    AttemptRecord,
    AttemptRow,
    DeliveryHistory,
    DeliveryRow,
    attempt_row,
    delivery_row,
    utcnow,
)
from textgen.storage.tables import tasks, webhook_attempts, webhook_deliveries

_d = webhook_deliveries
_INSERT_DELIVERY = _d.insert()


# How many due deliveries a claim looks at per slot it fills, when some may be passed over (a busy destination).
OFFERS_PER_SLOT = 8

# The offers of a claim, in turns (every account's oldest due delivery first, then every account's next; within
# an account each URL's oldest before any URL's second), at a cost that does not grow with the backlog: the
# (account, URL) pairs with pending deliveries are stepped through on the index, a few seeks each (a
# recursive query), and only the first ``offers`` due deliveries of each pair are ranked. That is exact: an offer among
# the first ``offers`` by turn is among the first ``offers`` of its own URL.
_FIRST_ACCOUNT = """(SELECT x.account_id FROM webhook_deliveries x WHERE x.status = :pending{after}
        ORDER BY x.account_id LIMIT 1)"""
_NEXT_ACCOUNT = _FIRST_ACCOUNT.format(after=" AND x.account_id > p.account_id")
_NEXT_URL = """(SELECT x.url FROM webhook_deliveries x WHERE x.status = :pending
        AND x.account_id = p.account_id AND x.url > p.url ORDER BY x.url LIMIT 1)"""


def _first_url(account: str) -> str:
    return f"""(SELECT x.url FROM webhook_deliveries x WHERE x.status = :pending AND x.account_id = {account}
        ORDER BY x.url LIMIT 1)"""


_PAIR_DUE = """SELECT {columns} FROM webhook_deliveries x
        WHERE x.status = :pending AND x.account_id = p.account_id AND x.url = p.url
            AND x.next_attempt_at <= :now AND (x.locked_until IS NULL OR x.locked_until < :now)
        ORDER BY x.next_attempt_at, x.id LIMIT :offers"""
# Each pair's first due deliveries: a LATERAL join on PostgreSQL (its planner would otherwise test the IN
# below against every row of the table); SQLite, which has no LATERAL, runs the IN subquery once per pair.
_CANDIDATES = {
    "postgresql": f"""
    SELECT d.id, d.account_id, d.url, d.next_attempt_at
    FROM pairs p CROSS JOIN LATERAL ({_PAIR_DUE.format(columns="x.id, x.account_id, x.url, x.next_attempt_at")}) d
    WHERE p.account_id IS NOT NULL""",
    "sqlite": f"""
    SELECT d.id, d.account_id, d.url, d.next_attempt_at
    FROM pairs p JOIN webhook_deliveries d ON d.id IN ({_PAIR_DUE.format(columns="x.id")})""",
}
_OFFERS_SQL = f"""
WITH RECURSIVE pairs(account_id, url) AS (
    SELECT {_FIRST_ACCOUNT.format(after="")}, CAST({_first_url(_FIRST_ACCOUNT.format(after=""))} AS TEXT)
    UNION ALL
    SELECT CASE WHEN {_NEXT_URL} IS NOT NULL THEN p.account_id ELSE {_NEXT_ACCOUNT} END,
        CAST(COALESCE({_NEXT_URL}, {_first_url(_NEXT_ACCOUNT)}) AS TEXT)
    FROM pairs p WHERE p.account_id IS NOT NULL
),
candidates AS ({{candidates}}),
by_url AS (
    SELECT id, account_id, url, next_attempt_at,
        row_number() OVER (PARTITION BY account_id, url ORDER BY next_attempt_at, id) AS url_turn
    FROM candidates
),
ranked AS (
    SELECT id, account_id, url, next_attempt_at,
        row_number() OVER (PARTITION BY account_id ORDER BY url_turn, next_attempt_at, id) AS turn
    FROM by_url
)
SELECT id, account_id, url FROM ranked ORDER BY turn, next_attempt_at, id LIMIT :offers
"""
_OFFERS = {
    dialect: sa.text(_OFFERS_SQL.replace("{candidates}", candidates)).bindparams(
        sa.bindparam("now", type_=_d.c.next_attempt_at.type), sa.bindparam("pending"), sa.bindparam("offers")
    )
    for dialect, candidates in _CANDIDATES.items()
}


@dataclass(frozen=True, slots=True)
class Offer:
    """A due delivery a claim may take."""

    id: str
    account_id: int
    url: str


def new_delivery_id() -> str:
    return f"msg_{ids.random_hex(16)}"


def insert_delivery(
    conn: Connection, *, delivery_id: str, task_id: str, account_id: int, url: str, payload: str
) -> None:
    """Queue one delivery, due now (inside the caller's transaction)."""
    now = utcnow()
    conn.execute(
        _INSERT_DELIVERY,
        {
            "id": delivery_id,
            "task_id": task_id,
            "account_id": account_id,
            "url": url,
            "payload": payload,
            "status": DeliveryStatus.PENDING,
            "attempt_count": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        },
    )


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def queue(self, *, task_id: str, account_id: int, url: str, payload: str, notify: bool) -> str:
        """Queue a new delivery of a finished task's payload; ``notify`` wakes other processes' senders."""
        delivery = new_delivery_id()

        def work(conn: Connection) -> None:
            insert_delivery(
                conn, delivery_id=delivery, task_id=task_id, account_id=account_id, url=url, payload=payload
            )
            if notify:
                self.db.notify(conn, DELIVERIES_CHANNEL)

        await self.db.run(work)
        return delivery

    async def redeliver(
        self, *, task_id: str, account_id: int, url: str, payload: str, notify: bool, limit: int
    ) -> str | None:
        """Queue a redelivery of a finished task's payload, unless the task has had ``limit`` redeliveries
        already (None then). Its first delivery, queued when it finished, is not one of them."""
        delivery = new_delivery_id()
        lock = sa.select(tasks.c.id).where(tasks.c.id == task_id)
        if self.db.is_postgres:
            lock = lock.with_for_update()  # concurrent redeliveries of one task count one after the other
        count = sa.select(sa.func.count()).select_from(_d).where(_d.c.task_id == task_id)

        def work(conn: Connection) -> str | None:
            conn.execute(lock)
            if int(conn.execute(count).scalar_one()) - 1 >= limit:
                return None
            insert_delivery(
                conn, delivery_id=delivery, task_id=task_id, account_id=account_id, url=url, payload=payload
            )
            if notify:
                self.db.notify(conn, DELIVERIES_CHANNEL)
            return delivery

        return await self.db.run(work)

    async def history(self, task_id: str) -> list[DeliveryHistory]:
        """A task's deliveries, oldest first, each with its attempts."""

        def work(conn: Connection) -> list[DeliveryHistory]:
            deliveries = [
                delivery_row(r)
                for r in conn.execute(
                    sa.select(_d).where(_d.c.task_id == task_id).order_by(_d.c.created_at)
                ).all()
            ]
            attempts = [
                attempt_row(r)
                for r in conn.execute(
                    sa.select(webhook_attempts)
                    .where(webhook_attempts.c.delivery_id.in_([d.id for d in deliveries]))
                    .order_by(webhook_attempts.c.id)
                ).all()
            ]
            by_delivery: dict[str, list[AttemptRow]] = {d.id: [] for d in deliveries}
            for each in attempts:
                by_delivery[each.delivery_id].append(each)
            return [DeliveryHistory(delivery=d, attempts=by_delivery[d.id]) for d in deliveries]

        return await self.db.run(work)

    async def claim(
        self,
        worker_id: str,
        lease_seconds: float,
        limit: int,
        choose: Callable[[list[Offer]], list[str]] | None = None,
    ) -> list[DeliveryRow]:
        """Lock up to ``limit`` due pending deliveries for ``worker_id``; a lock expires after the lease.

        Due deliveries are offered in turns: every account's oldest first, then every account's next, and within
        an account each URL's oldest before any URL's second, so no account's backlog comes before another
        account's first. ``choose`` picks the ids to lock from the offers, in that order (by default the first
        ``limit``). Only unlocked (or expired) rows are taken, so at most one attempt per delivery is in flight.
        """
        now = utcnow()
        # Checked on the rows the ids pick: with status behind a function, no index on it competes with the
        # primary key (SQLite would otherwise range-scan every due delivery to find the few chosen).
        due = sa.and_(
            sa.func.coalesce(_d.c.status, "") == DeliveryStatus.PENDING,
            _d.c.next_attempt_at <= now,
            sa.or_(_d.c.locked_until.is_(None), _d.c.locked_until < now),
        )
        # More offers than room when choosing, as some may be passed over.
        wanted = limit * OFFERS_PER_SLOT if choose is not None else limit
        offers_query = _OFFERS["postgresql" if self.db.is_postgres else "sqlite"]
        offers_params = {"now": now, "pending": DeliveryStatus.PENDING.value, "offers": wanted}
        lock = _d.update().values(locked_by=worker_id, locked_until=now + dt.timedelta(seconds=lease_seconds))

        def work(conn: Connection) -> list[DeliveryRow]:
            offers = [
                Offer(r.id, r.account_id, r.url) for r in conn.execute(offers_query, offers_params).all()
            ]
            ids = choose(offers)[:limit] if choose is not None else [offer.id for offer in offers]
            if not ids:
                return []
            # Rechecked as it locks: another sender may have taken one since it was offered (on PostgreSQL, one
            # another sender is locking now is skipped rather than waited for).
            chosen = sa.select(_d.c.id).where(_d.c.id.in_(ids), due)
            if self.db.is_postgres:
                chosen = chosen.with_for_update(skip_locked=True)
            rows = conn.execute(lock.where(_d.c.id.in_(chosen), due).returning(*_d.c)).all()
            return [delivery_row(r) for r in rows]

        claimed = await self.db.run(work)
        return sorted(claimed, key=lambda r: (r.next_attempt_at or now, r.id))

    async def record_attempt(self, delivery_id: str, worker_id: str, attempt: AttemptRecord) -> bool:
        """Log an attempt and move the delivery on (next try, delivered or failed), releasing its lock.

        The attempt is always logged; the delivery itself changes only while ``worker_id`` holds its lock
        (False otherwise: the lock expired and another sender took the delivery over).
        """

        def work(conn: Connection) -> bool:
            conn.execute(
                webhook_attempts.insert().values(
                    delivery_id=delivery_id,
                    attempted_at=attempt.attempted_at,
                    status_code=attempt.status_code,
                    error=attempt.error,
                    duration_ms=attempt.duration_ms,
                    next_attempt_at=attempt.next_attempt_at,
                )
            )
            result = conn.execute(
                _d.update()
                .where(
                    _d.c.id == delivery_id,
                    _d.c.status == DeliveryStatus.PENDING,
                    _d.c.locked_by == worker_id,
                )
                .values(
                    status=attempt.outcome,
                    attempt_count=_d.c.attempt_count + 1,
                    next_attempt_at=attempt.next_attempt_at,
                    locked_by=None,
                    locked_until=None,
                    updated_at=utcnow(),
                )
            )
            return bool(result.rowcount)

        return await self.db.run(work, group=True)

    async def release(self, worker_id: str, ids: list[str] | None = None) -> int:
        """Unlock the deliveries ``worker_id`` holds (all, or those in ``ids``) so another sender can retry them
        at once (shutdown)."""
        statement = (
            _d.update()
            .where(_d.c.locked_by == worker_id, _d.c.status == DeliveryStatus.PENDING)
            .values(locked_by=None, locked_until=None)
        )
        if ids is not None:
            statement = statement.where(_d.c.id.in_(ids))
        return await self.db.run(lambda conn: int(conn.execute(statement).rowcount))
