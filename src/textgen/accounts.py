"""Accounts: API credentials (random, shown once, stored as a hash) and authentication."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from textgen.catalog import to_micro
from textgen.errors import AccountDisabled, Unauthorized
from textgen.storage.accounts import AccountStore
from textgen.storage.admin import AdminStore
from textgen.storage.rows import AccountRow


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


def new_key_id() -> str:
    return "key_" + secrets.token_hex(12)


def new_api_key() -> str:
    return "tgk_" + secrets.token_urlsafe(32)


async def create_account(store: AccountStore, name: str, credits: float, rate_limit: int) -> NewAccount:
    """Create an account with fresh credentials; the key is returned here and never stored."""
    api_id = "tg_" + secrets.token_hex(12)
    api_key = new_api_key()
    account = await store.create_account(
        api_id=api_id,
        key_id=new_key_id(),
        key_hash=hash_key(api_key),
        key_prefix=api_key[:10],
        name=name,
        credits=to_micro(credits),
        rate_limit=rate_limit,
        webhook_secret=new_webhook_secret(),
    )
    return NewAccount(account=account, api_key=api_key)


class Authenticator:
    """Checks X-API-ID/X-API-KEY against the account's live keys.

    A successful check is cached for ``cache_seconds`` (TEXTGEN_AUTH_CACHE_SECONDS) to keep the database off
    the hot path: that is the bound on how long a key revoked, or an account disabled, in another process
    keeps working here. In the process that made the change it takes effect at once (``forget``).
    """

    def __init__(self, keys: AdminStore, cache_seconds: float = 2.0) -> None:
        self._keys = keys
        self.cache_seconds = cache_seconds
        self._cache: dict[str, dict[str, tuple[float, AccountRow]]] = {}

    async def authenticate(self, api_id: str | None, api_key: str | None) -> AccountRow:
        if not api_id or not api_key:
            raise Unauthorized("missing X-API-ID or X-API-KEY header")
        account = await self._lookup(api_id[:64], hash_key(api_key))
        if account is None:
            raise Unauthorized("invalid X-API-ID or X-API-KEY")
        if account.disabled:
            raise AccountDisabled("this account is disabled; ask the operator to enable it")
        return account

    def forget(self, api_id: str) -> None:
        """Drop what is cached for an account (its keys or state just changed)."""
        self._cache.pop(api_id, None)

    async def _lookup(self, api_id: str, key_hash: str) -> AccountRow | None:
        now = time.monotonic()
        hit = self._cache.get(api_id, {}).get(key_hash)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await self._keys.key_account(api_id, key_hash)
        if found is None:
            self._cache.get(api_id, {}).pop(key_hash, None)
            return None
        if self.cache_seconds > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache.setdefault(api_id, {})[key_hash] = (now + self.cache_seconds, found[0])
        return found[0]


class AccountService:
    """What an account may ask about itself."""

    def __init__(self, accounts: AccountStore) -> None:
        self.accounts = accounts

    async def balance(self, account: AccountRow) -> int:
        """The account's current balance in micro-credits (read fresh: the cached row may be stale)."""
        return (await self.accounts.account_by_id(account.id)).balance
