"""The Python client (clients/python) against a textgen server over loopback: sync and async, every method."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import Server, run_server
from tests.fakes.providers import FakeProvider
from textgen.settings import Settings
from textgen_client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    InsufficientCreditsError,
    NotFoundError,
    PollSchedule,
    RateLimitError,
    StreamEnd,
    StreamError,
    Task,
    TextDelta,
    WaitTimeout,
)

FAST_POLL = PollSchedule(initial=0.02, factor=2.0, maximum=0.2)


def sync_client(server: Server, api_id: str, api_key: str, **kwargs: object) -> Client:
    return Client(api_id, api_key, base_url=server.url, poll=FAST_POLL, **kwargs)  # type: ignore[arg-type]


def async_client(server: Server, api_id: str, api_key: str, **kwargs: object) -> AsyncClient:
    return AsyncClient(api_id, api_key, base_url=server.url, poll=FAST_POLL, **kwargs)  # type: ignore[arg-type]


async def test_sync_client_generate_submit_wait_stream_and_credits(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account(credits=100)

        def scenario() -> tuple[Task, Task, Task, list[object], float]:
            with sync_client(server, account.api_id, account.api_key) as client:
                generated = client.generate("fake-model", "hello there", config={"max_output_tokens": 50})
                submitted = client.submit("fake-model", [{"role": "user", "content": "later"}])
                waited = client.wait(submitted, timeout=30)
                with client.stream("fake-model", "stream me") as stream:
                    events = list(stream)
                return generated, submitted, waited, events, client.remaining_credits()

        generated, submitted, waited, events, credits = await asyncio.to_thread(scenario)

    assert generated.status == "done" and generated.response_text == "echo: hello there"
    assert generated.credits_used > 0 and generated.output_tokens == 5 and generated.finished
    assert generated.created_at is not None and not generated.replayed
    assert submitted.status == "pending" and not submitted.finished
    assert waited.id == submitted.id and waited.status == "done" and waited.response_text == "echo: later"
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert "".join(d.text for d in deltas) == "echo: stream me" and len(deltas) == 3
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.text == "echo: stream me" and end.finish_reason == "STOP"
    assert end.credits_used > 0 and sum(isinstance(e, StreamEnd) for e in events) == 1
    # The three tasks' charges are exactly what left the balance.
    spent = generated.credits_used + waited.credits_used + end.credits_used
    assert credits == pytest.approx(100 - spent, abs=1e-6)


async def test_async_client_every_method(settings: Settings) -> None:
    provider = FakeProvider()
    async with run_server(settings, {"fake": provider}) as server:
        account = await server.account(credits=100)
        async with async_client(server, account.api_id, account.api_key) as client:
            generated = await client.generate("fake-model", "one", system_instruction="be brief")
            assert generated.status == "done" and generated.response_text == "echo: one"
            assert provider.calls[-1].system_instruction == "be brief"

            submitted = await client.submit("fake-model", "two")
            done = await client.wait(submitted.id)
            assert done.status == "done" and done.response_text == "echo: two"
            assert (await client.get(done.id)).response_text == "echo: two"
            assert (await client.tasks.get(done)).id == done.id

            stream = client.stream("fake-model", "three four")
            deltas: list[str] = []
            async with stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        deltas.append(event.text)
            assert stream.end is not None and stream.task_id == stream.end.task_id
            assert "".join(deltas) == "echo: three four" == stream.end.text
            streamed = await client.get(stream.end.task_id)
            assert streamed.status == "done" and streamed.response_text == "echo: three four"
            assert streamed.credits_used == pytest.approx(stream.end.credits_used)

            # final() sends the request itself when the stream was never entered.
            end = await client.stream("fake-model", "five").final()
            assert end.text == "echo: five"

            listed = [task async for task in client.tasks.list(page_size=2)]
            assert [t.id for t in listed][:2] == [end.task_id, streamed.id]
            assert len(listed) == 4  # generate, submit, two streams
            remaining = await client.remaining_credits()
            assert remaining == pytest.approx(100 - sum(t.credits_used for t in listed), abs=1e-6)


async def test_wait_backs_off_until_the_deadline_then_returns_the_finished_task(settings: Settings) -> None:
    gate = asyncio.Event()
    async with run_server(settings, {"fake": FakeProvider(gate=gate)}) as server:
        account = await server.account()
        polls: list[str] = []

        async def count(request: httpx.Request) -> None:
            if request.method == "GET":
                polls.append(request.url.path)

        http = httpx.AsyncClient(event_hooks={"request": [count]})
        client = AsyncClient(
            account.api_id,
            account.api_key,
            base_url=server.url,
            poll=PollSchedule(initial=0.01, factor=2.0, maximum=0.08),
            http_client=http,
        )
        task = await client.submit("fake-model", "gated")
        with pytest.raises(WaitTimeout) as timed_out:
            await client.wait(task, timeout=0.5)
        assert timed_out.value.task.id == task.id and timed_out.value.task.status in ("pending", "running")
        assert not timed_out.value.task.finished
        # Intervals grow 0.01, 0.02, 0.04, 0.08, 0.08 ...: the 0.5 s deadline allows at most 9 polls.
        assert 1 <= len(polls) <= 9
        gate.set()
        done = await client.wait(task, timeout=30)
        assert done.status == "done" and done.response_text == "echo: gated"
        await http.aclose()  # passed in, so the client leaves it open
        await client.aclose()


async def test_task_list_follows_every_page_and_filters_by_status(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        other = await server.account(name="other")
        pages: list[httpx.URL] = []

        def record(request: httpx.Request) -> None:
            pages.append(request.url)

        def scenario() -> tuple[list[Task], list[Task], list[Task], list[Task]]:
            with (
                httpx.Client(event_hooks={"request": [record]}) as http,
                Client(account.api_id, account.api_key, base_url=server.url, http_client=http) as client,
                sync_client(server, other.api_id, other.api_key) as other_client,
            ):
                created = [client.generate("fake-model", f"task {i}") for i in range(5)]
                other_client.generate("fake-model", "not yours")
                pages.clear()
                every = list(client.tasks.list(page_size=2))
                done = list(client.tasks.list(status="done", page_size=100))
                pending = list(client.tasks.list(status="pending"))
                return created, every, done, pending

        created, every, done, pending = await asyncio.to_thread(scenario)
    assert [t.id for t in every] == [t.id for t in reversed(created)]
    assert [t.response_text for t in every][-1] == "echo: task 0"
    # Five tasks at two a page: three requests, each page after the first asked by cursor.
    list_requests = pages[:3]
    assert [u.params.get("limit") for u in list_requests] == ["2", "2", "2"]
    assert "cursor" not in list_requests[0].params and all("cursor" in u.params for u in list_requests[1:])
    assert [t.id for t in done] == [t.id for t in every] and pending == []


async def test_typed_errors_from_the_server(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account(credits=0.01)
        limited = await server.account(rate_limit=2, name="limited")
        other = await server.account(name="other")
        async with (
            async_client(server, account.api_id, account.api_key) as client,
            async_client(server, other.api_id, other.api_key) as other_client,
        ):
            async with AsyncClient(account.api_id, "tgk_wrong", base_url=server.url) as wrong:
                with pytest.raises(AuthenticationError) as unauthorised:
                    await wrong.remaining_credits()
            assert unauthorised.value.status_code == 401 and unauthorised.value.request_id

            with pytest.raises(BadRequestError) as bad:
                await client.generate("no-such-model", "hi")
            assert bad.value.status_code == 400 and "model_name" in bad.value.message

            with pytest.raises(BadRequestError) as bad_config:
                await client.generate("fake-model", "hi", config={"temperature": 9})
            assert "config.temperature" in bad_config.value.message

            with pytest.raises(InsufficientCreditsError) as poor:
                await client.generate("fake-model", "hi", config={"max_output_tokens": 1000})
            assert poor.value.status_code == 402

            with pytest.raises(InsufficientCreditsError):
                await client.stream("fake-model", "hi", config={"max_output_tokens": 1000}).final()

            theirs = await other_client.generate("fake-model", "mine")
            with pytest.raises(NotFoundError):
                await client.get(theirs.id)
            with pytest.raises(NotFoundError):
                await client.get("00000000-0000-0000-0000-000000000000")
            assert (await client.remaining_credits()) == pytest.approx(0.01)

        # Over the limit with a Retry-After longer than the caller allows: raised at once, not waited out.
        sent: list[str] = []

        async def count(request: httpx.Request) -> None:
            sent.append(request.url.path)

        http = httpx.AsyncClient(event_hooks={"request": [count]})
        async with AsyncClient(
            limited.api_id, limited.api_key, base_url=server.url, max_retry_wait=0.5, http_client=http
        ) as client:
            await client.remaining_credits()
            await client.remaining_credits()
            with pytest.raises(RateLimitError) as limited_error:
                await client.remaining_credits()
        await http.aclose()
        assert limited_error.value.status_code == 429 and len(sent) == 3
        assert limited_error.value.retry_after is not None and limited_error.value.retry_after >= 1
        assert "requests per minute" in limited_error.value.message


async def test_stream_error_event_carries_the_task_id(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider(fail_after_chunks=1)}) as server:
        account = await server.account()
        async with async_client(server, account.api_id, account.api_key) as client:
            stream = client.stream("fake-model", "breaks after one word")
            seen: list[object] = []
            with pytest.raises(StreamError) as failed:
                async for event in stream:
                    seen.append(event)
            assert seen == [TextDelta("echo:")]
            assert failed.value.status_code == 502 and "connection reset" in failed.value.message
            assert failed.value.task_id is not None
            task = await client.get(failed.value.task_id)
            assert task.status == "failed" and "connection reset" in task.failed_reason


async def test_stream_closed_early_stops_the_generation(settings: Settings) -> None:
    provider = FakeProvider(chunk_delay=0.05)
    async with run_server(settings, {"fake": provider}) as server:
        account = await server.account(credits=1000)
        words = " ".join(f"w{i}" for i in range(40))

        def scenario() -> str:
            with sync_client(server, account.api_id, account.api_key) as client:
                stream = client.stream("fake-model", words)
                with stream:
                    for event in stream:
                        assert isinstance(event, TextDelta)
                        break
                assert stream.end is None
                return next(iter(client.tasks.list(page_size=1))).id

        task_id = await asyncio.to_thread(scenario)
        task = await server.wait_for(account, task_id)
    assert task["status"] == "failed" and task["failed_reason"] == "client disconnected"
    assert provider.stream_closed == 1
