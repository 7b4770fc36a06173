"""Accounts and their ledger.

Credits move only as a conditional update of the balance plus a ledger row in the same transaction, so
concurrent requests cannot overdraw an account and the ledger always sums to the balance.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from textgen.errors import InsufficientCredits, NotFound
from textgen.storage.database import Database
from textgen.storage.rows import AccountRow, LedgerSummary, account_row, utcnow
from textgen.storage.tables import accounts, api_keys, ledger

_b = sa.bindparam
ACCOUNT_BY_ID = sa.select(accounts).where(accounts.c.id == _b("account_id"))
_ACCOUNT_BY_API_ID = sa.select(accounts).where(accounts.c.api_id == _b("api_id"))
INSERT_LEDGER = ledger.insert()


class AccountStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_account(
        self,
        *,
        api_id: str,
        key_id: str,
        key_hash: str,
        key_prefix: str,
        name: str,
        credits: int,
        rate_limit: int,
        webhook_secret: str,
    ) -> AccountRow:
        """Create an account with its first API key and record its opening grant in the ledger."""
        now = utcnow()

        def work(conn: Connection) -> AccountRow:
            row = conn.execute(
                accounts.insert()
                .values(
                    api_id=api_id,
                    name=name,
                    balance=credits,
                    rate_limit=rate_limit,
                    webhook_secret=webhook_secret,
                    created_at=now,
                )
                .returning(*accounts.c)
            ).one()
            conn.execute(
                api_keys.insert().values(
                    id=key_id, account_id=row.id, key_hash=key_hash, prefix=key_prefix, created_at=now
                )
            )
            conn.execute(
                INSERT_LEDGER,
                {
                    "account_id": row.id,
                    "kind": "grant",
                    "amount": credits,
                    "balance_after": credits,
                    "created_at": now,
                },
            )
            return account_row(row)

        return await self.db.run(work)

    async def count_accounts(self) -> int:
        return await self.db.run(
            lambda conn: int(conn.execute(sa.select(sa.func.count()).select_from(accounts)).scalar_one())
        )

    async def account_by_api_id(self, api_id: str) -> AccountRow | None:
        row = await self.db.run(lambda conn: conn.execute(_ACCOUNT_BY_API_ID, {"api_id": api_id}).first())
        return account_row(row) if row else None

    async def account_by_id(self, account_id: int) -> AccountRow:
        row = await self.db.run(lambda conn: conn.execute(ACCOUNT_BY_ID, {"account_id": account_id}).one())
        return account_row(row)

    async def accounts_by_id(self, account_ids: set[int]) -> dict[int, AccountRow]:
        """Several accounts in one read (those that exist)."""
        if not account_ids:
            return {}
        query = sa.select(accounts).where(accounts.c.id.in_(sorted(account_ids)))
        rows = await self.db.run(lambda conn: conn.execute(query).all())
        return {row.id: account_row(row) for row in rows}

    async def grant(self, api_id: str, amount: int) -> AccountRow:
        """Add (or, negative, remove) credits; the balance never goes below zero."""

        def work(conn: Connection) -> AccountRow:
            row = conn.execute(
                accounts.update()
                .where(accounts.c.api_id == api_id, accounts.c.balance + amount >= 0)
                .values(balance=accounts.c.balance + amount)
                .returning(*accounts.c)
            ).first()
            if row is None:
                if conn.execute(sa.select(accounts.c.id).where(accounts.c.api_id == api_id)).first():
                    raise InsufficientCredits("the balance cannot go below zero")
                raise NotFound(f"no account with api_id {api_id!r}")
            conn.execute(
                INSERT_LEDGER,
                {
                    "account_id": row.id,
                    "kind": "grant",
                    "amount": amount,
                    "balance_after": row.balance,
                    "created_at": utcnow(),
                },
            )
            return account_row(row)

        return await self.db.run(work)

    async def set_rate_limit(self, api_id: str, rpm: int) -> None:
        await self.db.run(
            lambda conn: conn.execute(
                accounts.update().where(accounts.c.api_id == api_id).values(rate_limit=rpm)
            )
        )

    async def rotate_webhook_secret(self, api_id: str, new_secret: str, grace: dt.timedelta) -> AccountRow:
        """Make ``new_secret`` current; the old one keeps signing until the grace period ends."""
        row = await self.db.run(
            lambda conn: conn.execute(
                accounts.update()
                .where(accounts.c.api_id == api_id)
                .values(
                    webhook_secret_previous=accounts.c.webhook_secret,
                    webhook_secret_previous_until=utcnow() + grace,
                    webhook_secret=new_secret,
                )
                .returning(*accounts.c)
            ).first()
        )
        if row is None:
            raise NotFound(f"no account with api_id {api_id!r}")
        return account_row(row)

    async def ledger_summary(self, account_id: int) -> LedgerSummary:
        def work(conn: Connection) -> LedgerSummary:
            balance = conn.execute(
                sa.select(accounts.c.balance).where(accounts.c.id == account_id)
            ).scalar_one()
            total = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(ledger.c.amount), 0)).where(
                    ledger.c.account_id == account_id
                )
            ).scalar_one()
            return LedgerSummary(balance=int(balance), ledger_sum=int(total))

        return await self.db.run(work)
