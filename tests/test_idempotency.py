"""Idempotency-Key on create and stream, over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from httpx_sse import aconnect_sse

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from tests.pgdb import pg_template, pg_url  # noqa: F401  (fixtures)
from textgen.settings import Settings

FAKE = {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi there"}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, tmp_path: Path, models_file: Path) -> Settings:
    if request.param == "sqlite":
        return make_settings(tmp_path, models_file=models_file)
    return make_settings(tmp_path, models_file=models_file, database_url=request.getfixturevalue("pg_url"))


async def books(server: Server, account: Account) -> tuple[int, int]:
    """(tasks of the account, balance), after checking that the ledger reconciles."""
    summary = await server.services.storage.accounts.ledger_summary(account.id)
    assert summary.ledger_sum == summary.balance
    rows, _ = await server.services.storage.tasks.list(account.id, limit=100)
    return len(rows), summary.balance


async def test_a_repeat_answers_with_the_same_task_and_reserves_nothing(db_settings: Settings) -> None:
    async with run_server(db_settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            first = await client.post("/sse/text_generator/", json=FAKE, headers={"Idempotency-Key": "k1"})
            after_first = await books(server, account)
            again = await client.post("/sse/text_generator/", json=FAKE, headers={"Idempotency-Key": "k1"})
            assert first.status_code == again.status_code == 201
            assert "idempotency-replayed" not in first.headers
            assert again.headers["idempotency-replayed"] == "true"
            assert again.json() == first.json()
            assert await books(server, account) == after_first == (1, after_first[1])
            other = await client.post("/sse/text_generator/", json=FAKE, headers={"Idempotency-Key": "k2"})
            assert other.json()["id"] != first.json()["id"]


async def test_a_sync_repeat_gets_the_finished_answer(db_settings: Settings) -> None:
    fake = FakeProvider()
    async with run_server(db_settings, {"fake": fake}) as server:
        account = await server.account()
        body = {**FAKE, "sync": True}
        async with server.client(account) as client:
            first = await client.post("/sse/text_generator/", json=body, headers={"Idempotency-Key": "s"})
            again = await client.post("/sse/text_generator/", json=body, headers={"Idempotency-Key": "s"})
        assert first.json()["status"] == "done" and again.json() == first.json()
        assert len(fake.calls) == 1


async def test_another_body_is_a_422_and_a_long_key_a_400(db_settings: Settings) -> None:
    async with run_server(db_settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            await client.post("/sse/text_generator/", json=FAKE, headers={"Idempotency-Key": "k"})
            changed = {**FAKE, "messages": [{"role": "user", "content": "something else"}]}
            mismatch = await client.post(
                "/sse/text_generator/", json=changed, headers={"Idempotency-Key": "k"}
            )
            assert mismatch.status_code == 422 and "Idempotency-Key" in mismatch.json()["error"]
            too_long = await client.post(
                "/sse/text_generator/", json=FAKE, headers={"Idempotency-Key": "x" * 256}
            )
            assert too_long.status_code == 400 and "Idempotency-Key" in too_long.json()["error"]
            assert (await books(server, account))[0] == 1


async def test_a_refused_create_frees_its_key(db_settings: Settings) -> None:
    async with run_server(db_settings, {"fake": FakeProvider()}, run_worker=False) as server:
        poor = await server.account(credits=0)
        async with server.client(poor) as client:
            refused = await client.post("/sse/text_generator/", json=FAKE, headers={"Idempotency-Key": "p"})
            assert refused.status_code == 402
            await server.services.storage.accounts.grant(poor.api_id, 100_000_000)
            accepted = await client.post("/sse/text_generator/", json=FAKE, headers={"Idempotency-Key": "p"})
            assert accepted.status_code == 201 and "idempotency-replayed" not in accepted.headers


async def test_concurrent_duplicates_make_one_task(db_settings: Settings) -> None:
    # Two processes' worth of servers on one database, the same key sent to both at once, many times.
    async with (
        run_server(db_settings, {"fake": FakeProvider()}, run_worker=False) as one,
        run_server(db_settings, {"fake": FakeProvider()}, run_worker=False) as two,
    ):
        account = await one.account()

        async def send(server: Server, key: str) -> Any:
            async with server.client(account) as client:
                response = await client.post(
                    "/sse/text_generator/", json=FAKE, headers={"Idempotency-Key": key}
                )
                return response.status_code, response.json().get("id")

        for n in range(5):
            answers = await asyncio.gather(*(send(server, f"c{n}") for server in (one, two, one, two)))
            assert {status for status, _ in answers} <= {201, 409}
            assert len({task_id for status, task_id in answers if status == 201}) == 1, answers
        assert (await books(one, account))[0] == 5


async def test_a_stream_repeat_replays_its_answer(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        headers = {"Idempotency-Key": "stream-1"}
        runs: list[tuple[dict[str, str], list[dict[str, Any]]]] = []
        for _ in range(2):
            async with (
                server.client(account) as client,
                aconnect_sse(
                    client, "POST", "/sse/text_generator/stream/", json=FAKE, headers=headers
                ) as source,
            ):
                events = [json.loads(sse.data) async for sse in source.aiter_sse()]
                runs.append((dict(source.response.headers), events))
        (first_headers, first), (again_headers, again) = runs
        assert again_headers["idempotency-replayed"] == "true"
        assert again_headers["x-textgen-task-id"] == first_headers["x-textgen-task-id"]
        text = "".join(p.get("text", "") for e in first for p in e["candidates"][0]["content"]["parts"])
        assert again[-1]["candidates"][0]["content"]["parts"][0]["text"] == text
        assert again[-1]["creatify"] == first[-1]["creatify"]
        assert (await books(server, account))[0] == 1
