"""Capacity belongs to providers: the worker claims, per provider, no more tasks than it has free slots, and
fairly between accounts; sync requests hold the same slots. Driven over real HTTP on a real SQLite file."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.providers import FAKE_MODELS_TOML, FakeProvider
from textgen.catalog import ModelSpec
from textgen.protocol import GenerationInput
from textgen.providers.base import Generation, Progress

TWO_PROVIDERS = (
    FAKE_MODELS_TOML
    + """
[models."other-model"]
provider = "other"
input_price = 1000.0
output_price = 1000.0
max_output_tokens = 1000
default_output_tokens = 100
capabilities = ["text"]
"""
)


def body(text: str, model: str = "fake-model", **extra: Any) -> dict[str, Any]:
    return {"model_name": model, "messages": [{"role": "user", "content": text}], **extra}


class TurnProvider(FakeProvider):
    """Each call waits for its own turn: ``turns.release()`` lets exactly one waiting call finish."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots=slots)
        self.turns = asyncio.Semaphore(0)
        self.waiting = 0

    async def generate(
        self, spec: ModelSpec, request: GenerationInput, *, account: str, progress: Progress | None = None
    ) -> Generation:
        self.calls.append(request)
        self.accounts.append(account)
        self.waiting += 1
        try:
            await self.turns.acquire()
        finally:
            self.waiting -= 1
        return Generation(text=f"echo: {request.messages[-1].text()}", input_tokens=7, output_tokens=5)


async def until(predicate: Any, within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def statuses(server: Server, account: Account, ids: list[str]) -> list[str]:
    async with server.client(account) as client:
        return [(await client.get(f"/sse/text_generator/{task_id}/")).json()["status"] for task_id in ids]


async def test_a_burst_of_slow_tasks_runs_at_once_up_to_the_provider_capacity(settings: Any) -> None:
    fake = FakeProvider(gate=asyncio.Event(), slots=40)
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=10_000)
        async with server.client(account) as client:
            ids = [
                (await client.post("/sse/text_generator/", json=body(f"t{i}"))).json()["id"]
                for i in range(50)
            ]
        # Every slot is busy at once (the old global limit ran 4), and no task beyond capacity is leased.
        await until(lambda: len(fake.calls) == 40)
        found = await statuses(server, account, ids)
        assert found.count("running") == 40 and found.count("pending") == 10
        assert server.services.lifecycle.capacity.in_use["fake"] == 40
        fake.gate.set()  # type: ignore[union-attr]
        for task_id in ids:
            assert (await server.wait_for(account, task_id))["status"] == "done"
        assert len(fake.calls) == 50
        assert server.services.lifecycle.capacity.in_use["fake"] == 0


async def test_a_burst_for_one_provider_does_not_hold_back_another(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(TWO_PROVIDERS)
    settings = make_settings(tmp_path, models_file=models)
    busy = FakeProvider(gate=asyncio.Event(), slots=1)
    other = FakeProvider(slots=8)
    async with run_server(settings, {"fake": busy, "other": other}) as server:
        account = await server.account(credits=10_000)
        async with server.client(account) as client:
            held = [
                (await client.post("/sse/text_generator/", json=body(f"b{i}"))).json()["id"] for i in range(5)
            ]
            await until(lambda: len(busy.calls) == 1)
            quick = (await client.post("/sse/text_generator/", json=body("o", "other-model"))).json()["id"]
            assert (await server.wait_for(account, quick))["status"] == "done"
        # The busy provider runs one task; the other four stay queued, free for another process to take.
        assert (await statuses(server, account, held)).count("pending") == 4
        assert len(busy.calls) == 1
        busy.gate.set()  # type: ignore[union-attr]
        for task_id in held:
            assert (await server.wait_for(account, task_id))["status"] == "done"


async def test_one_accounts_backlog_does_not_starve_another_account(settings: Any) -> None:
    turns = TurnProvider(slots=1)
    async with run_server(settings, {"fake": turns}) as server:
        heavy = await server.account(credits=10_000, name="heavy")
        light = await server.account(credits=10_000, name="light")
        async with server.client(heavy) as client:
            backlog = [
                (await client.post("/sse/text_generator/", json=body(f"h{i}"))).json()["id"] for i in range(8)
            ]
        await until(lambda: turns.waiting == 1)
        async with server.client(light) as client:
            single = (await client.post("/sse/text_generator/", json=body("l"))).json()["id"]
        # The heavy account's first task runs; the light account's task is next, ahead of seven older ones.
        turns.turns.release()
        await until(lambda: len(turns.calls) == 2)
        assert turns.accounts == [str(heavy.id), str(light.id)]
        for _ in range(8):
            turns.turns.release()
        assert (await server.wait_for(light, single))["status"] == "done"
        for task_id in backlog:
            assert (await server.wait_for(heavy, task_id))["status"] == "done"
        assert turns.accounts.count(str(heavy.id)) == 8


async def test_sync_requests_hold_the_slots_the_worker_claims_with(settings: Any) -> None:
    fake = FakeProvider(gate=asyncio.Event(), slots=1)
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=10_000)
        async with server.client(account) as client:
            sync = asyncio.create_task(client.post("/sse/text_generator/", json=body("s", sync=True)))
            await until(lambda: len(fake.calls) == 1)
            queued = (await client.post("/sse/text_generator/", json=body("q"))).json()["id"]
            # The one slot is the sync request's: the queued task is not leased meanwhile.
            await asyncio.sleep(0.3)
            assert await statuses(server, account, [queued]) == ["pending"]
            assert len(fake.calls) == 1
            fake.gate.set()  # type: ignore[union-attr]
            answer = await sync
            assert answer.status_code == 201 and answer.json()["status"] == "done"
        # Freeing the sync request's slot wakes the worker at once (it had no room when it last looked).
        assert (await server.wait_for(account, queued))["status"] == "done"


def record_claims(server: Server) -> list[tuple[float, tuple[str, ...] | None]]:
    """Every claim statement the worker runs from now on: when, and for which models (None: the others)."""
    queue = server.services.storage.tasks
    claims: list[tuple[float, tuple[str, ...] | None]] = []
    original = queue.claim_batch

    async def claim_batch(*args: Any, **kwargs: Any) -> Any:
        models = kwargs.get("models")
        claims.append((asyncio.get_running_loop().time(), tuple(models) if models is not None else None))
        return await original(*args, **kwargs)

    queue.claim_batch = claim_batch  # type: ignore[method-assign]
    return claims


async def test_a_queued_task_wakes_only_its_own_providers_claim(tmp_path: Path) -> None:
    """A task's wake-up names its provider: a provider whose last claim found nothing is not asked again
    until a task of its own is queued (or a poll interval passes), and a finished task that leaves nothing
    queued triggers no claim."""
    models = tmp_path / "models.toml"
    models.write_text(TWO_PROVIDERS)
    settings = make_settings(tmp_path, models_file=models, worker_poll_seconds=120.0)
    async with run_server(
        settings, {"fake": FakeProvider(slots=8), "other": FakeProvider(slots=8)}
    ) as server:
        account = await server.account(credits=10_000)
        await until(lambda: server.services.worker.claims >= 1)  # the first claim asks every provider
        claims = record_claims(server)
        async with server.client(account) as client:
            ids = [
                (await client.post("/sse/text_generator/", json=body(f"t{i}"))).json()["id"]
                for i in range(20)
            ]
            for task_id in ids:
                assert (await server.wait_for(account, task_id))["status"] == "done"
            asked = [models for _, models in claims]
            assert ("other-model",) not in asked
            assert 1 <= asked.count(("fake-model",)) <= 20  # at most one per task queued, none per finish
            other = (await client.post("/sse/text_generator/", json=body("o", "other-model"))).json()["id"]
            assert (await server.wait_for(account, other))["status"] == "done"
        assert ("other-model",) in [models for _, models in claims]


async def test_wake_ups_within_the_claim_interval_share_one_claim(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(tmp_path, models_file=models_file, claim_interval_seconds=0.2)
    async with run_server(settings, {"fake": FakeProvider(slots=8)}) as server:
        account = await server.account(credits=10_000)
        claims = record_claims(server)
        async with server.client(account) as client:
            created = await asyncio.gather(
                *(client.post("/sse/text_generator/", json=body(f"t{i}")) for i in range(12))
            )
            for answer in created:
                assert (await server.wait_for(account, answer.json()["id"]))["status"] == "done"
    starts = [at for at, models in claims if models is not None]
    assert starts
    assert all(later - earlier >= 0.19 for earlier, later in itertools.pairwise(starts))
