"""Webhooks between tenants: redelivery is capped per task and rate limited, and the sender's slots are
shared so that one account's dead receiver delays nobody else's webhook."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.conftest import run_server
from tests.fakes.providers import FakeProvider
from tests.test_webhooks import Receiver, create, deliveries, serve_receiver, settings_for, wait_delivery
from textgen.storage.outbox import Offer
from textgen.webhooks.sender import FairShare, destination


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


# ---- sharing the sender's slots -----------------------------------------------------------------


class DeadReceiver:
    """Accepts connections on 127.0.0.1 and never answers until released: each attempt holds its slot."""

    def __init__(self) -> None:
        self.open = 0
        self.most_open = 0
        self.accepted = 0
        self.release = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.release.wait()
        finally:
            self.open -= 1
            writer.close()


async def until(condition: Callable[[], bool], what: str, within: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


async def test_a_dead_receiver_of_one_account_delays_no_other_account(
    tmp_path: Path, models_file: Path
) -> None:
    dead = [DeadReceiver() for _ in range(3)]
    servers = [await asyncio.start_server(d.handle, "127.0.0.1", 0) for d in dead]
    dead_urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}/hook" for s in servers]
    healthy = Receiver()
    # 8 slots: one destination may hold 2, one account 4. The attempts to the dead receivers would each hold
    # their slot for 30 s.
    settings = settings_for(tmp_path, models_file, webhook_concurrency=8, webhook_timeout_seconds=30)
    try:
        async with (
            serve_receiver(healthy) as healthy_url,
            run_server(settings, {"fake": FakeProvider()}) as server,
        ):
            share = server.services.webhooks.share
            assert (share.per_destination, share.per_account) == (2, 4)
            a = await server.account(name="a")
            b = await server.account(name="b")
            a_tasks = [await create(server, a, dead_urls[n % 3]) for n in range(12)]
            for task in a_tasks:
                await server.wait_for(a, task["id"])
            # All 12 of A's deliveries are queued before B's; A has its account's share in flight.
            await until(lambda: sum(d.open for d in dead) >= share.per_account, "A's attempts in flight")

            b_task = await create(server, b, f"{healthy_url}/hook")
            await healthy.wait(1)
            # B's webhook arrived while every attempt of A's was still held: none has ended yet.
            attempts = [
                attempt
                for task in a_tasks
                for history in await server.services.storage.outbox.history(task["id"])
                for attempt in history.attempts
            ]
            assert attempts == []
            assert sum(d.open for d in dead) == share.per_account
            delivered = await wait_delivery(server, b, b_task["id"], status="delivered")
            assert delivered["attempts"][0]["status_code"] == 200

            for receiver in dead:
                receiver.release.set()
            for task in a_tasks:  # every one of A's is attempted in the end
                await wait_delivery(server, a, task["id"], attempts=1)
            assert all(d.most_open <= share.per_destination for d in dead)
            assert sum(d.accepted for d in dead) == 12
    finally:
        for receiver in dead:
            receiver.release.set()
        for each in servers:
            each.close()
            await each.wait_closed()


def test_destinations_are_scheme_host_and_port() -> None:
    assert destination("http://Hooks.Example/a") == destination("http://hooks.example:80/b")
    assert destination("https://hooks.example/a") == "https://hooks.example:443"
    assert destination("http://127.0.0.1:8001/h") != destination("http://127.0.0.1:8002/h")


def test_the_share_caps_each_destination_and_account_at_the_edge_and_one_past() -> None:
    share = FairShare.of(16)
    assert (share.per_destination, share.per_account) == (4, 8)
    assert (FairShare.of(1).per_destination, FairShare.of(1).per_account) == (1, 1)
    offers = [Offer(f"d{n}", 1, "http://dead.example/h") for n in range(6)]
    offers += [Offer("other", 2, "http://dead.example/h"), Offer("b", 2, "http://fine.example/h")]
    busy_dead = Counter({"http://dead.example:80": 3})
    # One more to the dead destination fits (3 + 1 = 4); past that only other destinations get slots.
    assert share.choose(offers, 16, Counter({1: 3}), busy_dead) == ["d0", "b"]
    # Account 1 at its 8: nothing more for it, whatever the destination.
    mixed = [Offer("x", 1, "http://fine.example/x"), Offer("y", 2, "http://fine.example/y")]
    assert share.choose(mixed, 16, Counter({1: 8}), Counter()) == ["y"]
    assert share.choose(mixed, 16, Counter({1: 7}), Counter()) == ["x", "y"]
    assert share.choose(mixed, 1, Counter(), Counter()) == ["x"]  # never more than the room
