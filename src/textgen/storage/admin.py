"""Storage of account administration: API keys, account state, operator credit adjustments, usage reads.

Each method is one transaction on the ``Database``. Credits move as in the account store: a conditional update of
the balance plus a ledger row, in the same transaction.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from textgen.errors import BadRequest, NotFound
from textgen.states import TaskStatus
from textgen.storage.database import Database
from textgen.storage.rows import AccountRow, account_row, utcnow
from textgen.storage.tables import accounts, api_keys, ledger, tasks, webhook_attempts, webhook_deliveries

# last_used_at is written at most this often per key (it is a hint for operators, not an audit log).
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)
MAX_BALANCE = 10**18  # micro-credits (a million million credits): far from the 64-bit limit
DISABLED_REASON = "account disabled by the operator before the task started"


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: str
    account_id: int
    prefix: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class UsageRow:
    group: str  # the day (YYYY-MM-DD) or the model name
    status: str
    tasks: int
    input_tokens: int
    output_tokens: int
    credits_used: int
    credits_reserved: int


def _key(row: sa.Row[Any]) -> KeyRow:
    m = row._mapping
    return KeyRow(
        id=m["id"],
        account_id=m["account_id"],
        prefix=m["prefix"],
        created_at=m["created_at"],
        last_used_at=m["last_used_at"],
        revoked_at=m["revoked_at"],
    )


_KEY_AUTH = (
    sa.select(accounts, api_keys.c.id.label("key_id"), api_keys.c.last_used_at)
    .join(api_keys, api_keys.c.account_id == accounts.c.id)
    .where(
        accounts.c.api_id == sa.bindparam("api_id"),
        api_keys.c.key_hash == sa.bindparam("key_hash"),
        api_keys.c.revoked_at.is_(None),
    )
)


class KeyMiss(Enum):
    """Why a key did not authenticate."""

    UNKNOWN_ID = "unknown id"  # no account has this API id
    WRONG_KEY = "wrong key"  # the account exists; the key is not one of its live keys


class AdminStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def _day(self, column: Any) -> Any:
        """The UTC calendar day of a timestamp column, as YYYY-MM-DD text."""
        if self.db.is_postgres:
            return sa.func.to_char(sa.func.timezone("UTC", column), "YYYY-MM-DD")
        return sa.func.strftime("%Y-%m-%d", column)

    @staticmethod
    def _account_or_404(conn: Connection, api_id: str, *, lock: bool = False) -> AccountRow:
        query = sa.select(accounts).where(accounts.c.api_id == api_id)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"no account with api_id {api_id!r}")
        return account_row(row)

    # ---- authentication -------------------------------------------------------------------------

    async def key_account(self, api_id: str, key_hash: str) -> tuple[AccountRow, str] | KeyMiss:
        """The account and key id a live key belongs to; records (coarsely) that the key was used. Otherwise
        whether the account exists (the key is wrong) or not."""

        def work(conn: Connection) -> tuple[AccountRow, str] | KeyMiss:
            row = conn.execute(_KEY_AUTH, {"api_id": api_id, "key_hash": key_hash}).first()
            if row is None:
                known = conn.execute(sa.select(accounts.c.id).where(accounts.c.api_id == api_id)).first()
                return KeyMiss.WRONG_KEY if known is not None else KeyMiss.UNKNOWN_ID
            now = utcnow()
            if row.last_used_at is None or row.last_used_at < now - LAST_USED_RESOLUTION:
                conn.execute(api_keys.update().where(api_keys.c.id == row.key_id).values(last_used_at=now))
            return account_row(row), str(row.key_id)

        return await self.db.run(work)

    # ---- accounts -------------------------------------------------------------------------------

    async def account(self, api_id: str) -> AccountRow:
        return await self.db.run(lambda conn: self._account_or_404(conn, api_id))

    async def list_accounts(self, limit: int, after_id: int | None) -> tuple[list[AccountRow], bool]:
        query = sa.select(accounts).order_by(accounts.c.id).limit(limit + 1)
        if after_id is not None:
            query = query.where(accounts.c.id > after_id)
        rows = await self.db.run(lambda conn: [account_row(r) for r in conn.execute(query).all()])
        return rows[:limit], len(rows) > limit

    async def update_account(
        self, api_id: str, *, rate_limit: int | None, disabled: bool | None
    ) -> AccountRow:
        """Change the rate limit and/or the state. Disabling fails the account's pending tasks (never
        started) and releases their reserved credits, in the same transaction."""

        def work(conn: Connection) -> AccountRow:
            account = self._account_or_404(conn, api_id, lock=True)
            values: dict[str, Any] = {}
            if rate_limit is not None:
                values["rate_limit"] = rate_limit
            if disabled is not None:
                values["disabled"] = disabled
            if values:
                conn.execute(accounts.update().where(accounts.c.id == account.id).values(**values))
            if disabled:
                self._fail_pending(conn, account.id)
            return account_row(conn.execute(sa.select(accounts).where(accounts.c.id == account.id)).one())

        return await self.db.run(work)

    def _fail_pending(self, conn: Connection, account_id: int) -> None:
        now = utcnow()
        pending = sa.select(tasks.c.id, tasks.c.credits_reserved).where(
            tasks.c.account_id == account_id, tasks.c.status == TaskStatus.PENDING
        )
        if self.db.is_postgres:
            pending = pending.with_for_update(skip_locked=True)
        for task_id, reserved in conn.execute(pending).all():
            changed = conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status == TaskStatus.PENDING)
                .values(
                    status=TaskStatus.FAILED, failed_reason=DISABLED_REASON, credits_used=0, updated_at=now
                )
            ).rowcount
            if not changed:
                continue
            balance = conn.execute(
                accounts.update()
                .where(accounts.c.id == account_id)
                .values(balance=accounts.c.balance + reserved)
                .returning(accounts.c.balance)
            ).scalar_one()
            conn.execute(
                ledger.insert().values(
                    account_id=account_id,
                    task_id=task_id,
                    kind="release",
                    amount=reserved,
                    balance_after=balance,
                    created_at=now,
                )
            )

    async def adjust_credits(self, api_id: str, amount: int, reason: str) -> AccountRow:
        """Add (or, negative, remove) credits with a reason; refused, changing nothing, below zero."""

        def work(conn: Connection) -> AccountRow:
            account = self._account_or_404(conn, api_id)
            row = conn.execute(
                accounts.update()
                .where(
                    accounts.c.id == account.id,
                    accounts.c.balance + amount >= 0,
                    accounts.c.balance + amount <= MAX_BALANCE,
                )
                .values(balance=accounts.c.balance + amount)
                .returning(*accounts.c)
            ).first()
            if row is None and amount > 0:
                raise BadRequest(f"amount: the balance may hold at most {MAX_BALANCE // 1_000_000} credits")
            if row is None:
                raise BadRequest(
                    f"amount: a debit of {-amount / 1_000_000:g} credits would take the balance of "
                    f"{account.balance / 1_000_000:g} below zero"
                )
            conn.execute(
                ledger.insert().values(
                    account_id=account.id,
                    kind="adjust",
                    amount=amount,
                    balance_after=row.balance,
                    reason=reason,
                    created_at=utcnow(),
                )
            )
            return account_row(row)

        return await self.db.run(work)

    # ---- keys -----------------------------------------------------------------------------------

    async def create_key(self, api_id: str, key_id: str, key_hash: str, prefix: str) -> KeyRow:
        def work(conn: Connection) -> KeyRow:
            account = self._account_or_404(conn, api_id)
            row = conn.execute(
                api_keys.insert()
                .values(
                    id=key_id, account_id=account.id, key_hash=key_hash, prefix=prefix, created_at=utcnow()
                )
                .returning(*api_keys.c)
            ).one()
            return _key(row)

        return await self.db.run(work)

    async def list_keys(self, api_id: str) -> list[KeyRow]:
        def work(conn: Connection) -> list[KeyRow]:
            account = self._account_or_404(conn, api_id)
            rows = conn.execute(
                sa.select(api_keys)
                .where(api_keys.c.account_id == account.id)
                .order_by(api_keys.c.created_at, api_keys.c.id)
            ).all()
            return [_key(r) for r in rows]

        return await self.db.run(work)

    async def keys_of(self, account_ids: list[int]) -> list[KeyRow]:
        query = (
            sa.select(api_keys)
            .where(api_keys.c.account_id.in_(account_ids))
            .order_by(api_keys.c.created_at, api_keys.c.id)
        )
        return await self.db.run(lambda conn: [_key(r) for r in conn.execute(query).all()])

    async def revoke_key(self, api_id: str, key_id: str) -> KeyRow:
        def work(conn: Connection) -> KeyRow:
            account = self._account_or_404(conn, api_id)
            row = conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.account_id == account.id)
                .values(revoked_at=sa.func.coalesce(api_keys.c.revoked_at, utcnow()))
                .returning(*api_keys.c)
            ).first()
            if row is None:
                raise NotFound(f"account {api_id!r} has no key {key_id!r}")
            return _key(row)

        return await self.db.run(work)

    # ---- usage ----------------------------------------------------------------------------------

    async def usage(
        self, account_id: int | None, start: dt.datetime | None, end: dt.datetime | None, group_by: str
    ) -> tuple[list[UsageRow], int, int]:
        """Task figures grouped by (day or model, status), the credits added to the account by grants and
        operator adjustments in the window, and its balance now. ``account_id`` None: every account."""
        group = self._day(tasks.c.created_at) if group_by == "day" else tasks.c.model_name
        unfinished = tasks.c.status.in_((TaskStatus.PENDING, TaskStatus.RUNNING))
        query = sa.select(
            group.label("grp"),
            tasks.c.status,
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(tasks.c.input_tokens), 0),
            sa.func.coalesce(sa.func.sum(tasks.c.output_tokens), 0),
            sa.func.coalesce(sa.func.sum(tasks.c.credits_used), 0),
            sa.func.coalesce(sa.func.sum(sa.case((unfinished, tasks.c.credits_reserved), else_=0)), 0),
        ).group_by("grp", tasks.c.status)
        added = sa.select(sa.func.coalesce(sa.func.sum(ledger.c.amount), 0)).where(
            ledger.c.kind.in_(("grant", "adjust"))
        )
        balance = sa.select(sa.func.coalesce(sa.func.sum(accounts.c.balance), 0))
        if account_id is not None:
            query = query.where(tasks.c.account_id == account_id)
            added = added.where(ledger.c.account_id == account_id)
            balance = balance.where(accounts.c.id == account_id)
        if start is not None:
            query = query.where(tasks.c.created_at >= start)
            added = added.where(ledger.c.created_at >= start)
        if end is not None:
            query = query.where(tasks.c.created_at < end)
            added = added.where(ledger.c.created_at < end)
        query = query.order_by("grp", tasks.c.status)

        def work(conn: Connection) -> tuple[list[UsageRow], int, int]:
            rows = [
                UsageRow(str(g), str(s), int(n), int(i), int(o), int(u), int(r))
                for g, s, n, i, o, u, r in conn.execute(query).all()
            ]
            return rows, int(conn.execute(added).scalar_one()), int(conn.execute(balance).scalar_one())

        return await self.db.run(work)

    async def model_days(self, since: dt.datetime) -> list[dict[str, Any]]:
        """Tokens and credits per model per day (UTC) of tasks created since ``since``."""
        day = self._day(tasks.c.created_at).label("day")
        query = (
            sa.select(
                day,
                tasks.c.model_name,
                sa.func.count().label("tasks"),
                sa.func.coalesce(sa.func.sum(tasks.c.input_tokens), 0).label("input_tokens"),
                sa.func.coalesce(sa.func.sum(tasks.c.output_tokens), 0).label("output_tokens"),
                sa.func.coalesce(sa.func.sum(tasks.c.credits_used), 0).label("credits_used"),
            )
            .where(tasks.c.created_at >= since)
            .group_by("day", tasks.c.model_name)
            .order_by(sa.desc("day"), tasks.c.model_name)
        )
        return await self.db.run(lambda conn: [dict(r._mapping) for r in conn.execute(query).all()])

    async def recent_failures(self, limit: int) -> list[dict[str, Any]]:
        query = (
            sa.select(
                tasks.c.id,
                accounts.c.api_id,
                tasks.c.model_name,
                tasks.c.failed_reason,
                tasks.c.updated_at,
            )
            .join(accounts, accounts.c.id == tasks.c.account_id)
            .where(tasks.c.status == TaskStatus.FAILED)
            .order_by(tasks.c.updated_at.desc(), tasks.c.id)
            .limit(limit)
        )
        return await self.db.run(lambda conn: [dict(r._mapping) for r in conn.execute(query).all()])

    async def webhook_health(self, since: dt.datetime) -> dict[str, Any]:
        """Deliveries by status, attempts since ``since`` by outcome, and the latest failed attempts."""
        d, a = webhook_deliveries, webhook_attempts
        ok = sa.and_(a.c.status_code.is_not(None), a.c.status_code >= 200, a.c.status_code < 300)
        by_status = sa.select(d.c.status, sa.func.count()).group_by(d.c.status)
        attempts = sa.select(
            sa.func.count(), sa.func.coalesce(sa.func.sum(sa.case((ok, 1), else_=0)), 0)
        ).where(a.c.attempted_at >= since)
        latest = (
            sa.select(a.c.delivery_id, d.c.url, a.c.status_code, a.c.error, a.c.attempted_at)
            .join(d, d.c.id == a.c.delivery_id)
            .where(sa.not_(ok))
            .order_by(a.c.id.desc())
            .limit(10)
        )

        def work(conn: Connection) -> dict[str, Any]:
            total, succeeded = conn.execute(attempts).one()
            return {
                "deliveries": {str(s): int(n) for s, n in conn.execute(by_status).all()},
                "attempts": int(total),
                "attempts_ok": int(succeeded),
                "latest_failures": [dict(r._mapping) for r in conn.execute(latest).all()],
            }

        return await self.db.run(work)
