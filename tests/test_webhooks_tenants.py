"""Webhooks between tenants: redelivery is capped per task and rate limited, and the sender's slots are
shared so that one account's dead receiver delays nobody else's webhook."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import run_server
from tests.fakes.providers import FakeProvider
from tests.test_webhooks import Receiver, create, deliveries, serve_receiver, settings_for, wait_delivery


def redeliver_path(task_id: str) -> str:
    return f"/sse/text_generator/{task_id}/webhooks/redeliver/"


# ---- redelivery ---------------------------------------------------------------------------------


async def test_redelivery_is_capped_per_task(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver()
    settings = settings_for(tmp_path, models_file, webhook_max_redeliveries=2)
    async with serve_receiver(receiver) as hook, run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        task = await create(server, account, f"{hook}/h")
        other = await create(server, account, f"{hook}/h")
        await wait_delivery(server, account, task["id"], status="delivered")
        async with server.client(account) as client:
            answers = [await client.post(redeliver_path(task["id"])) for _ in range(2)]
            assert [a.status_code for a in answers] == [201, 201]  # at the cap
            refused = await client.post(redeliver_path(task["id"]))  # one past it
            assert refused.status_code == 409
            assert refused.json() == {
                "error": f"task {task['id']} has been redelivered 2 times, the most a task may be; "
                "its deliveries and their attempts are listed at GET .../webhooks/"
            }
            # The cap is per task: another task of the account may still be redelivered.
            await wait_delivery(server, account, other["id"], status="delivered")
            assert (await client.post(redeliver_path(other["id"]))).status_code == 201
        found = await deliveries(server, account, task["id"])
        assert len(found) == 3  # its own delivery and two redeliveries, nothing for the refused request
        await receiver.wait(5)  # 2 first deliveries, 3 redeliveries
        assert len({seen.headers["webhook-id"] for seen in receiver.seen}) == 5


async def test_concurrent_redeliveries_never_pass_the_cap(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver()
    settings = settings_for(tmp_path, models_file, webhook_max_redeliveries=3)
    async with serve_receiver(receiver) as hook, run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        task = await create(server, account, f"{hook}/h")
        await server.wait_for(account, task["id"])
        async with server.client(account) as client:
            answers = await asyncio.gather(*(client.post(redeliver_path(task["id"])) for _ in range(12)))
        assert sorted(a.status_code for a in answers) == [201] * 3 + [409] * 9
        assert len(await deliveries(server, account, task["id"])) == 4


async def test_redeliveries_count_against_the_rate_limit(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server,
    ):
        account = await server.account(rate_limit=3)
        task = await create(server, account, f"{hook}/h")  # request 1 of 3 this minute
        await receiver.wait(1)  # finished and delivered (watched without requests that count)
        async with server.client(account) as client:
            first = await client.post(redeliver_path(task["id"]))
            assert first.status_code == 201 and first.headers["RateLimit-Remaining"] == "1"
            assert (await client.post(redeliver_path(task["id"]))).status_code == 201
            limited = await client.post(redeliver_path(task["id"]))
        assert limited.status_code == 429 and "rate limit" in limited.json()["error"]
        assert int(limited.headers["Retry-After"]) >= 1
        rows = await server.services.storage.outbox.history(task["id"])
        assert len(rows) == 3  # the refused request queued nothing
