"""``GET /readyz`` checks each dependency itself, within the readiness timeout, and names the one that failed."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import make_settings, run_server
from tests.fakes.providers import FakeProvider
from tests.processes import free_port


@dataclass
class UnloadableProvider(FakeProvider):
    loaded: bool = False

    async def open(self) -> None:
        raise RuntimeError("weights file is truncated")

    def available(self) -> bool:
        return self.loaded


async def test_a_locked_sqlite_file_makes_readyz_503_naming_the_database(
    tmp_path: Path, models_file: Path
) -> None:
    settings = make_settings(tmp_path, models_file=models_file, readiness_timeout_seconds=0.2)
    async with (
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server,
        server.client() as client,
    ):
        before = await client.get("/readyz")
        assert before.status_code == 200, before.text
        assert before.json()["checks"]["database"] == "ok"

        holder = sqlite3.connect(tmp_path / "textgen.db", isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            locked = await client.get("/readyz")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert locked.status_code == 503, locked.text
        assert locked.headers["Retry-After"] == "5"
        body = locked.json()
        assert body["status"] == "not ready"
        assert "locked by another connection" in body["checks"]["database"], body
        assert body["checks"]["providers"] == {"fake": "ok"}

        after = await client.get("/readyz")
        assert after.status_code == 200 and after.json()["checks"]["database"] == "ok"


async def test_an_unreachable_redis_is_reported_before_any_request_needs_it(
    tmp_path: Path, models_file: Path
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = make_settings(
        tmp_path, models_file=models_file, redis_url=closed, readiness_timeout_seconds=0.5
    )
    async with (
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server,
        server.client() as client,
    ):
        ready = await client.get("/readyz")
    # Still ready (requests are served on per-process limits), and says which dependency is down.
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["rate_limits"] == "memory (redis unreachable)"
    assert checks["rate_limits_error"].startswith("redis: "), checks
    assert "onnect" in checks["rate_limits_error"], checks  # a connection error, named


async def test_a_provider_that_failed_to_load_is_named(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(tmp_path, models_file=models_file)
    async with (
        run_server(settings, {"fake": UnloadableProvider()}, run_worker=False) as server,
        server.client() as client,
    ):
        ready = await client.get("/readyz")
    assert ready.status_code == 503, ready.text
    checks = ready.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["providers"] == {"fake": "failed to load: weights file is truncated"}
