"""Accounts: API credentials (random, shown once, stored as a hash) and authentication."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from textgen.catalog import to_micro
from textgen.errors import AccountDisabled, RateLimited, Unauthorized
from textgen.ratelimit import RateLimiter
from textgen.storage.accounts import AccountStore
from textgen.storage.admin import AdminStore, KeyMiss
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

    A failed one is remembered as long: an API id no account has (whatever the key), or a wrong key of an
    account, is answered 401 again without the database. Failures are counted per client address; past
    ``failures_per_minute`` (TEXTGEN_AUTH_FAILURES_PER_MINUTE) the address is answered 429 until its window
    frees, except for a key this process has just checked as valid.
    """

    # Entries of each cache; past it a cache starts again empty (they only save database lookups).
    MAX_CACHED = 10_000

    def __init__(
        self,
        keys: AdminStore,
        cache_seconds: float = 2.0,
        limiter: RateLimiter | None = None,
        failures_per_minute: int = 30,
    ) -> None:
        self._keys = keys
        self.cache_seconds = cache_seconds
        self.limiter = limiter
        self.failures_per_minute = failures_per_minute
        self._cache: dict[str, dict[str, tuple[float, AccountRow]]] = {}
        self._unknown: dict[str, float] = {}  # API id -> until when it is known not to exist
        self._refused: dict[tuple[str, str], float] = {}  # (API id, key hash) -> until when it is known wrong
        self.lookups = 0  # database lookups made (what the caches save)

    async def authenticate(
        self, api_id: str | None, api_key: str | None, client: str | None = None
    ) -> AccountRow:
        """The account of these credentials; ``client`` is the caller's address (failures are counted)."""
        if not api_id or not api_key:
            raise Unauthorized("missing X-API-ID or X-API-KEY header")
        api_id, key_hash = api_id[:64], hash_key(api_key)
        now = time.monotonic()
        account = self._cached(api_id, key_hash, now)
        if account is None:
            failures = f"auth-failures:{client}"
            if client is not None and self.limiter is not None:
                wait = await self.limiter.full(failures, self.failures_per_minute)
                if wait is not None:
                    raise RateLimited(
                        f"too many failed authentications from this address ({self.failures_per_minute} "
                        f"per minute); retry in {wait} s",
                        headers={"Retry-After": str(wait)},
                    )
            account = await self._lookup(api_id, key_hash, now)
            if account is None:
                if client is not None and self.limiter is not None:
                    await self.limiter.count(failures, self.failures_per_minute)
                raise Unauthorized("invalid X-API-ID or X-API-KEY")
        if account.disabled:
            raise AccountDisabled("this account is disabled; ask the operator to enable it")
        return account

    def forget(self, api_id: str) -> None:
        """Drop what is cached for an account (its keys or state just changed)."""
        self._cache.pop(api_id, None)
        self._unknown.pop(api_id, None)
        for pair in [pair for pair in self._refused if pair[0] == api_id]:
            del self._refused[pair]

    def _cached(self, api_id: str, key_hash: str, now: float) -> AccountRow | None:
        hit = self._cache.get(api_id, {}).get(key_hash)
        return hit[1] if hit is not None and hit[0] > now else None

    async def _lookup(self, api_id: str, key_hash: str, now: float) -> AccountRow | None:
        if self._unknown.get(api_id, 0.0) > now or self._refused.get((api_id, key_hash), 0.0) > now:
            return None
        self.lookups += 1
        found = await self._keys.key_account(api_id, key_hash)
        if isinstance(found, KeyMiss):
            self._cache.get(api_id, {}).pop(key_hash, None)
            if self.cache_seconds > 0:
                if found is KeyMiss.UNKNOWN_ID:
                    _remember(self._unknown, api_id, now + self.cache_seconds)
                else:
                    _remember(self._refused, (api_id, key_hash), now + self.cache_seconds)
            return None
        if self.cache_seconds > 0:
            if len(self._cache) > self.MAX_CACHED:
                self._cache.clear()
            self._cache.setdefault(api_id, {})[key_hash] = (now + self.cache_seconds, found[0])
        return found[0]


def _remember(cache: dict[Any, float], key: Any, until: float) -> None:
    if len(cache) >= Authenticator.MAX_CACHED:
        cache.clear()
    cache[key] = until


class AccountService:
    """What an account may ask about itself."""

    def __init__(self, accounts: AccountStore) -> None:
        self.accounts = accounts

    async def balance(self, account: AccountRow) -> int:
        """The account's current balance in micro-credits (read fresh: the cached row may be stale)."""
        return (await self.accounts.account_by_id(account.id)).balance
