"""Accounts: API credentials (random, shown once, stored as a hash) and authentication."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from textgen.catalog import to_micro
from textgen.errors import Unauthorized
from textgen.storage.store import AccountRow, Store

# A well-formed hash to compare against when the api_id is unknown, so both paths cost the same.
_DUMMY_HASH = hashlib.sha256(b"textgen-no-such-account").hexdigest()
_CACHE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class NewAccount:
    account: AccountRow
    api_key: str


def hash_key(api_key: str) -> str:
    # Keys are 256-bit random tokens, so a fast hash is as strong as a slow one here.
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_webhook_secret() -> str:
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def create_account(store: Store, name: str, credits: float, rate_limit: int) -> NewAccount:
    """Create an account with fresh credentials; the key is returned here and never stored."""
    api_id = "tg_" + secrets.token_hex(12)
    api_key = "tgk_" + secrets.token_urlsafe(32)
    account = await store.create_account(
        api_id=api_id,
        key_hash=hash_key(api_key),
        key_prefix=api_key[:10],
        name=name,
        credits=to_micro(credits),
        rate_limit=rate_limit,
        webhook_secret=new_webhook_secret(),
    )
    return NewAccount(account=account, api_key=api_key)


class Authenticator:
    """Checks X-API-ID/X-API-KEY; caches account rows briefly to keep the database off the hot path."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cache: dict[str, tuple[float, AccountRow]] = {}

    async def authenticate(self, api_id: str | None, api_key: str | None) -> AccountRow:
        if not api_id or not api_key:
            raise Unauthorized("missing X-API-ID or X-API-KEY header")
        account = await self._lookup(api_id)
        expected = account.key_hash if account else _DUMMY_HASH
        if not hmac.compare_digest(expected, hash_key(api_key)) or account is None:
            raise Unauthorized("invalid X-API-ID or X-API-KEY")
        return account

    async def _lookup(self, api_id: str) -> AccountRow | None:
        now = time.monotonic()
        hit = self._cache.get(api_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        account = await self._store.account_by_api_id(api_id[:64])
        if account is not None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[api_id] = (now + _CACHE_SECONDS, account)
        return account
