"""Account administration: the operations behind the admin API, the usage page and ``textgen accounts``.

Amounts come in as credits (floats) and are validated here, so every caller refuses the same bad input with
the same message and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from textgen.accounts import (
    Authenticator,
    NewAccount,
    create_account,
    hash_key,
    new_api_key,
    new_key_id,
    new_webhook_secret,
)
from textgen.catalog import from_micro, to_micro
from textgen.errors import BadRequest
from textgen.limits import MAX_CREDITS, MAX_RATE_LIMIT
from textgen.presentation import iso
from textgen.states import TaskStatus
from textgen.storage import Storage
from textgen.storage.admin import KeyRow, UsageRow
from textgen.storage.rows import AccountRow, utcnow

STATUSES = tuple(status.value for status in TaskStatus)


@dataclass(frozen=True, slots=True)
class NewKey:
    key: KeyRow
    api_key: str


def check_credits(amount: Any, field: str, *, allow_negative: bool) -> int:
    """A finite number of credits, as micro-credits; BadRequest naming ``field`` otherwise."""
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise BadRequest(f"{field}: must be a number")
    if not math.isfinite(amount):
        raise BadRequest(f"{field}: must be a finite number")
    if abs(amount) > MAX_CREDITS:
        raise BadRequest(f"{field}: must be at most {MAX_CREDITS:g} in size")
    if amount < 0 and not allow_negative:
        raise BadRequest(f"{field}: must not be negative")
    micro = to_micro(float(amount))
    if allow_negative and micro == 0:
        raise BadRequest(f"{field}: must not be zero")
    return micro


def check_rate_limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RATE_LIMIT:
        raise BadRequest(
            f"rate_limit: must be an integer between 1 and {MAX_RATE_LIMIT} (requests per minute)"
        )
    return value


def check_text(value: Any, field: str, max_length: int = 255) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{field}: must be a non-empty string")
    if len(value) > max_length:
        raise BadRequest(f"{field}: must be at most {max_length} characters")
    return value.strip()


class AccountAdmin:
    """Every operator action on accounts. ``auth`` (when serving) forgets what it cached on a change."""

    def __init__(
        self,
        storage: Storage,
        *,
        default_rate_limit: int,
        webhook_secret_grace: dt.timedelta,
        auth: Authenticator | None = None,
    ) -> None:
        self.storage = storage
        self.db = storage.admin
        self.default_rate_limit = default_rate_limit
        self.grace = webhook_secret_grace
        self.auth = auth

    def _changed(self, api_id: str) -> None:
        if self.auth is not None:
            self.auth.forget(api_id)

    async def create(self, name: Any, credits: Any = 0.0, rate_limit: Any = None) -> NewAccount:
        name = check_text(name, "name")
        micro = check_credits(credits, "credits", allow_negative=False)
        rpm = self.default_rate_limit if rate_limit is None else check_rate_limit(rate_limit)
        return await create_account(self.storage.accounts, name, from_micro(micro), rpm)

    async def list_accounts(self, limit: int, after_id: int | None) -> tuple[list[AccountRow], bool]:
        return await self.db.list_accounts(limit, after_id)

    async def show(self, api_id: str) -> tuple[AccountRow, list[KeyRow]]:
        account = await self.db.account(api_id)
        return account, await self.db.list_keys(api_id)

    async def update(self, api_id: str, *, rate_limit: Any = None, disabled: Any = None) -> AccountRow:
        rpm = None if rate_limit is None else check_rate_limit(rate_limit)
        if disabled is not None and not isinstance(disabled, bool):
            raise BadRequest("disabled: must be true or false")
        account = await self.db.update_account(api_id, rate_limit=rpm, disabled=disabled)
        self._changed(api_id)
        return account

    async def credit(self, api_id: str, amount: Any, reason: Any) -> AccountRow:
        micro = check_credits(amount, "amount", allow_negative=True)
        return await self.db.adjust_credits(api_id, micro, check_text(reason, "reason"))

    async def create_key(self, api_id: str) -> NewKey:
        api_key = new_api_key()
        key = await self.db.create_key(api_id, new_key_id(), hash_key(api_key), api_key[:10])
        return NewKey(key=key, api_key=api_key)

    async def keys(self, api_id: str) -> list[KeyRow]:
        return await self.db.list_keys(api_id)

    async def revoke_key(self, api_id: str, key_id: str) -> KeyRow:
        key = await self.db.revoke_key(api_id, key_id)
        self._changed(api_id)
        return key

    async def rotate_webhook_secret(self, api_id: str) -> AccountRow:
        return await self.storage.accounts.rotate_webhook_secret(api_id, new_webhook_secret(), self.grace)

    async def usage(
        self,
        account_id: int | None,
        start: dt.datetime | None,
        end: dt.datetime | None,
        group_by: str,
    ) -> dict[str, Any]:
        rows, added, balance = await self.db.usage(account_id, start, end, group_by)
        return usage_report(rows, added, balance, group_by, start, end)

    async def dashboard(self, days: int = 14) -> dict[str, Any]:
        """What the usage page shows: every figure over the last ``days`` days (UTC)."""
        today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
        since = today - dt.timedelta(days=days - 1)
        accounts, more = await self.db.list_accounts(200, None)
        keys = await self.db.keys_of([a.id for a in accounts])
        by_day, _, _ = await self.db.usage(None, since, None, "day")
        return {
            "accounts": [(a, [k for k in keys if k.account_id == a.id]) for a in accounts],
            "more_accounts": more,
            "days": days,
            "status_by_day": _pivot(by_day),
            "model_days": await self.db.model_days(since),
            "failures": await self.db.recent_failures(20),
            "webhooks": await self.db.webhook_health(utcnow() - dt.timedelta(hours=24)),
        }


def _pivot(rows: list[UsageRow]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        out.setdefault(row.group, dict.fromkeys(STATUSES, 0))[row.status] = row.tasks
    return out


@dataclass
class _Sum:
    tasks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    input_tokens: int = 0
    output_tokens: int = 0
    used: int = 0
    held: int = 0

    def add(self, row: UsageRow) -> None:
        self.tasks[row.status] = self.tasks.get(row.status, 0) + row.tasks
        self.input_tokens += row.input_tokens
        self.output_tokens += row.output_tokens
        self.used += row.credits_used
        self.held += row.credits_reserved

    def view(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "credits_used": from_micro(self.used),
            "credits_reserved": from_micro(self.held),
        }


def usage_report(
    rows: list[UsageRow],
    added: int,
    balance: int,
    group_by: str,
    start: dt.datetime | None,
    end: dt.datetime | None,
) -> dict[str, Any]:
    """Per group and in total: tasks by status, tokens, credits charged (finished tasks) and still reserved
    (pending or running). Over an account's whole history, credits_added - credits_used - credits_reserved
    equals remaining_credits exactly."""
    groups: dict[str, _Sum] = {}
    total = _Sum()
    for row in rows:
        groups.setdefault(row.group, _Sum()).add(row)
        total.add(row)
    return {
        "from": iso(start),
        "to": iso(end),
        "group_by": group_by,
        "results": [{group_by: name, **entry.view()} for name, entry in groups.items()],
        "totals": {**total.view(), "credits_added": from_micro(added)},
        "remaining_credits": from_micro(balance),
    }
