"""Rate limits shared through a real Redis, and the per-process fallback while Redis is away."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from tests.processes import free_port

SHARED_REDIS = "redis://127.0.0.1:6379/0"


@contextmanager
def redis_server(port: int, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A private Redis on ``port`` that this test may stop and start (the shared one stays up)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; run scripts/ensure-services.sh")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def wait_redis(url: str) -> None:
    client = aioredis.from_url(url)
    try:
        for _ in range(200):
            try:
                if await client.ping():
                    return
            except (OSError, aioredis.ConnectionError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"redis at {url} never came up")
    finally:
        await client.aclose()


@asynccontextmanager
async def two_instances(
    tmp_path: Path, models_file: Path, redis_url: str
) -> AsyncIterator[tuple[Server, Server]]:
    # Two app instances on one database: what two `textgen serve` processes behind a balancer are.
    settings = make_settings(tmp_path, models_file=models_file, redis_url=redis_url)
    async with (
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as one,
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as two,
    ):
        yield one, two


async def statuses(servers: tuple[Server, ...], account: Account, count: int) -> list[int]:
    out = []
    for i in range(count):
        async with servers[i % len(servers)].client(account) as client:
            out.append((await client.get("/api/remaining_credits/")).status_code)
    return out


async def test_two_instances_enforce_one_shared_limit(tmp_path: Path, models_file: Path) -> None:
    async with two_instances(tmp_path, models_file, SHARED_REDIS) as (one, two):
        account = await one.account(rate_limit=5)
        got = await statuses((one, two), account, 12)
        assert got.count(200) == 5 and got.count(429) == 7, got
        async with two.client(account) as client:
            limited = await client.get("/api/remaining_credits/")
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.headers["RateLimit-Limit"] == "5" and limited.headers["RateLimit-Remaining"] == "0"
        for server in (one, two):
            async with server.client() as client:
                assert (await client.get("/readyz")).json()["checks"]["rate_limits"] == "redis"


async def test_redis_going_away_degrades_to_per_process_limits_then_recovers(
    tmp_path: Path, models_file: Path
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with redis_server(port, tmp_path) as first:
        await wait_redis(url)
        async with two_instances(tmp_path, models_file, url) as (one, two):
            account = await one.account(rate_limit=4)
            assert (await statuses((one, two), account, 2)) == [200, 200]

            first.terminate()
            first.wait(timeout=10)
            # Still served; each process now counts on its own (4 each), and says so.
            got = await statuses((one, two), account, 10)
            assert got.count(200) == 8 and got.count(429) == 2, got
            for server in (one, two):
                async with server.client() as client:
                    ready = await client.get("/readyz")
                assert ready.status_code == 200
                assert ready.json()["checks"]["rate_limits"] == "memory (redis unreachable)"
                assert ready.json()["checks"]["rate_limits_error"]

            with redis_server(port, tmp_path):
                await wait_redis(url)
                fresh = await one.account(rate_limit=3, name="fresh")
                for _ in range(200):
                    await statuses((one, two), fresh, 2)
                    if one.services.limiter.backend == two.services.limiter.backend == "redis":
                        break
                    await asyncio.sleep(0.1)
                assert one.services.limiter.degraded_reason is None
                assert two.services.limiter.degraded_reason is None
                # One shared window again: a new account gets 3 requests across both instances.
                other = await one.account(rate_limit=3, name="other")
                got = await statuses((one, two), other, 6)
                assert got.count(200) == 3, got
