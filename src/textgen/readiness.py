"""What ``GET /readyz`` reports: each dependency checked by itself, side by side, each within a timeout.

The database must take a write transaction (on SQLite a connection of its own, so a probe never queues behind
the store's work, and a file locked by another process is named as such), Redis (when configured) must answer a
PING, and at least one model provider must be usable. Redis being down does not make the process unready: the
rate limits then fall back to a per-process window and the service keeps working, so it is reported, not failed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textgen.errors import TextgenError
from textgen.storage.engine import sqlite_path

if TYPE_CHECKING:
    from textgen.services import Services


async def readiness(svc: Services) -> tuple[bool, dict[str, Any]]:
    """Whether this process can serve, and the state of each dependency."""
    seconds = svc.settings.readiness_timeout_seconds
    database, redis = await asyncio.gather(
        _outcome(_database(svc, seconds), seconds), _outcome(svc.limiter.ping(), seconds)
    )
    checks: dict[str, Any] = {"database": database}
    providers = {
        name: "ok" if provider.available() else svc.provider_errors.get(name, "not configured")
        for name, provider in svc.registry.providers.items()
    }
    checks["providers"] = providers
    if redis == "ok":
        checks["rate_limits"] = "redis" if svc.limiter.shared else "memory"
    else:
        checks["rate_limits"] = "memory (redis unreachable)"
        checks["rate_limits_error"] = f"redis: {redis}"
    ready = database == "ok" and "ok" in providers.values()
    return ready, checks


async def _outcome(check: Awaitable[None], seconds: float) -> str:
    """ "ok", or why the check failed (no answer within ``seconds`` included)."""
    try:
        # A little longer than the check was given, so that its own message wins when it has one.
        async with asyncio.timeout(seconds + 0.5):
            await check
    except TimeoutError:
        return f"no answer within {seconds:g} s"
    except (TextgenError, SqliteLocked) as exc:
        return exc.message
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return "ok"


async def _database(svc: Services, seconds: float) -> None:
    path = sqlite_path(svc.settings.database_url) if svc.settings.is_sqlite else None
    if path is None:
        async with asyncio.timeout(seconds):
            await svc.storage.db.ping()
        return
    await asyncio.to_thread(_sqlite_write_lock, path, seconds)


def _sqlite_write_lock(path: Path, timeout: float) -> None:
    """Take SQLite's write lock and give it back, waiting at most ``timeout`` seconds for another holder."""
    uri = f"{path.resolve().as_uri()}?mode=rw"  # never creates the file
    connection = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise SqliteLocked(f"locked by another connection for over {timeout:g} s ({exc})") from None
        raise
    finally:
        connection.close()


class SqliteLocked(Exception):
    """Another connection holds SQLite's write lock for longer than the readiness timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
