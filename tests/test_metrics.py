"""GET /metrics scraped over HTTP after real traffic: the counters match what was sent, exactly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from tests.test_webhooks import Receiver, serve_receiver
from textgen import metrics
from textgen.errors import StorageUnavailable

CREATE = "/sse/text_generator/"
STREAM = "/sse/text_generator/stream/"
POLL = "/sse/text_generator/{task_id}/"


class Scrape:
    """One scrape, parsed: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(server: Server, token: str | None = None) -> Scrape:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with server.client() as client:
        response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape(response.text)


def body(**extra: Any) -> dict[str, Any]:
    return {"model_name": "fake-model", "messages": [{"role": "user", "content": "one two three"}], **extra}


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


async def test_counters_after_sync_async_stream_402_429_and_a_webhook(
    tmp_path: Path, models_file: Path
) -> None:
    receiver = Receiver()
    settings = make_settings(
        tmp_path, models_file=models_file, webhook_schedule="0", webhook_jitter=0.0, webhook_poll_seconds=0.05
    )
    async with serve_receiver(receiver) as hook, run_server(settings, {"fake": FakeProvider()}) as server:
        rich = await server.account(credits=100)
        poor = await server.account(credits=0.5)
        limited = await server.account(rate_limit=1)
        before = await scrape(server)
        overheads: dict[str, list[float]] = {CREATE: [], STREAM: []}

        async with server.client(rich) as client:
            sync = await client.post(CREATE, json=body(sync=True))
            assert sync.status_code == 201 and sync.json()["status"] == "done"
            queued = await client.post(CREATE, json=body(webhook_url=f"{hook}/hook"))
            assert queued.status_code == 201
            overheads[CREATE] += [float(r.headers["x-textgen-overhead-ms"]) for r in (sync, queued)]
            async with aconnect_sse(client, "POST", STREAM, json=body()) as source:
                assert source.response.status_code == 200
                overheads[STREAM].append(float(source.response.headers["x-textgen-overhead-ms"]))
                events = [json.loads(sse.data) async for sse in source.aiter_sse()]
            assert events[-1]["creatify"]["credits_used"] > 0
            await receiver.wait(1)
            polled = await client.get(f"/sse/text_generator/{queued.json()['id']}/")
            assert polled.json()["status"] == "done"
            charged = [sync.json()["credits_used"], polled.json()["credits_used"]]
            charged.append(events[-1]["creatify"]["credits_used"])
            tokens = [(sync.json()["input_tokens"], sync.json()["output_tokens"])]
            tokens.append((polled.json()["input_tokens"], polled.json()["output_tokens"]))
            streamed = await client.get(f"/sse/text_generator/{events[-1]['creatify']['id']}/")
            tokens.append((streamed.json()["input_tokens"], streamed.json()["output_tokens"]))
            assert (await client.get("/no/such/path")).status_code == 404
        async with server.client(poor) as client:
            refused = await client.post(CREATE, json=body(config={"max_output_tokens": 100}))
            assert refused.status_code == 402
            overheads[CREATE].append(float(refused.headers["x-textgen-overhead-ms"]))
        async with server.client(limited) as client:
            assert (await client.get("/api/remaining_credits/")).status_code == 200
            assert (await client.get("/api/remaining_credits/")).status_code == 429
        await wait_for_attempts(server, before, 1)
        after = await scrape(server)

    requests = "textgen_http_requests_total"
    assert delta(after, before, requests, method="POST", route=CREATE, status="201") == 2
    assert delta(after, before, requests, method="POST", route=CREATE, status="402") == 1
    assert delta(after, before, requests, method="POST", route=STREAM, status="200") == 1
    assert delta(after, before, requests, method="GET", route=POLL, status="200") == 2
    assert delta(after, before, requests, method="GET", route="/api/remaining_credits/", status="200") == 1
    assert delta(after, before, requests, method="GET", route="/api/remaining_credits/", status="429") == 1
    assert delta(after, before, requests, method="GET", route="unmatched", status="404") == 1
    # The scrape taken before the traffic is counted by the one after it (its head had not gone out yet).
    assert delta(after, before, requests, method="GET", route="/metrics", status="200") == 1
    # Raw paths never become labels.
    assert not any("/sse/text_generator/tg" in str(labels) for _, labels in after.samples)

    overhead = "textgen_http_overhead_seconds"
    for route, shown in overheads.items():
        assert delta(after, before, f"{overhead}_count", method="POST", route=route) == len(shown)
        # The histogram observes the very figure of the header (which is rounded to the microsecond).
        observed = delta(after, before, f"{overhead}_sum", method="POST", route=route)
        assert abs(observed * 1000 - sum(shown)) <= 0.0005 * len(shown) + 1e-9

    assert delta(after, before, "textgen_refusals_total", reason="rate_limit") == 1
    assert delta(after, before, "textgen_refusals_total", reason="credits") == 1
    assert delta(after, before, "textgen_webhook_attempts_total", outcome="delivered", answer="2xx") == 1
    assert delta(after, before, "textgen_webhook_attempts_total", outcome="will_retry", answer="5xx") == 0
    model = {"model": "fake-model"}
    assert delta(after, before, "textgen_task_outcomes_total", status="done", failure="none", **model) == 3
    assert (
        delta(after, before, "textgen_tokens_total", kind="input", **model) == sum(i for i, _ in tokens) == 21
    )
    assert (
        delta(after, before, "textgen_tokens_total", kind="output", **model)
        == sum(o for _, o in tokens)
        == 14
    )
    assert abs(delta(after, before, "textgen_credits_charged_total", **model) - sum(charged)) < 1e-9
    assert delta(after, before, "textgen_upstream_seconds_count", **model) == 3
    assert delta(after, before, "textgen_upstream_first_chunk_seconds_count", **model) == 1
    assert after.get("textgen_tasks_in_flight", provider="fake") == 0
    assert after.get("textgen_queue_tasks", status="pending") == 0
    assert after.get("textgen_queue_tasks", status="running") == 0
    assert after.get("textgen_webhook_backlog") == 0


async def wait_for_attempts(server: Server, before: Scrape, count: int) -> None:
    """The receiver has answered; the attempt is counted once the sender has read that answer."""
    name = "textgen_webhook_attempts_total"
    for _ in range(1000):
        now = Scrape(metrics.exposition(None)[0].decode())
        if delta(now, before, name, outcome="delivered", answer="2xx") >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the webhook attempt was never counted")


async def test_failed_webhook_attempts_by_outcome_and_answer(tmp_path: Path, models_file: Path) -> None:
    from tests.test_webhooks import Answer

    receiver = Receiver(Answer(503), Answer(503), default=Answer(410))
    settings = make_settings(
        tmp_path,
        models_file=models_file,
        webhook_schedule="0,0,0",
        webhook_jitter=0.0,
        webhook_poll_seconds=0.05,
    )
    async with serve_receiver(receiver) as hook, run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        before = await scrape(server)
        async with server.client(account) as client:
            created = await client.post(CREATE, json=body(sync=True, webhook_url=f"{hook}/hook"))
            assert created.status_code == 201
        await receiver.wait(3)
        name = "textgen_webhook_attempts_total"
        for _ in range(1000):
            after = await scrape(server)
            if delta(after, before, name, outcome="gave_up", answer="4xx"):
                break
            await asyncio.sleep(0.01)
    assert delta(after, before, name, outcome="will_retry", answer="5xx") == 2
    assert delta(after, before, name, outcome="gave_up", answer="4xx") == 1
    assert delta(after, before, name, outcome="delivered", answer="2xx") == 0


async def test_queue_depth_is_read_from_the_database(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(tmp_path, models_file=models_file)
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            for _ in range(3):
                assert (await client.post(CREATE, json=body())).status_code == 201
            # Finished in the request; with no sender in this process its delivery waits.
            sync = await client.post(CREATE, json=body(sync=True, webhook_url="http://127.0.0.1:9/hook"))
            assert sync.json()["status"] == "done"
        seen = await scrape(server)
    assert seen.get("textgen_queue_tasks", status="pending") == 3
    assert seen.get("textgen_queue_tasks", status="running") == 0
    assert seen.get("textgen_webhook_backlog") == 1


async def test_queue_depth_is_cached_and_absent_while_the_database_is_away() -> None:
    reads: list[int] = []
    failing = False

    async def read() -> tuple[dict[str, int], int]:
        reads.append(1)
        if failing:
            raise StorageUnavailable("database unavailable: OperationalError")
        return {"pending": len(reads)}, 0

    cached = metrics.QueueDepth(read, ttl=3600)
    first, second = await cached.families(), await cached.families()
    assert len(reads) == 1 and first == second
    assert first[0].samples[0].value == 1
    fresh = metrics.QueueDepth(read, ttl=0)
    assert (await fresh.families())[0].samples[0].value == 2
    failing = True
    assert await fresh.families() == []


async def test_metrics_require_the_admin_token_when_one_is_set(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(tmp_path, models_file=models_file, admin_token="s3cret-admin-token")
    async with (
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server,
        server.client() as client,
    ):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret-admin-token"},
            {"Authorization": "Basic s3cret-admin-token"},
            {"Authorization": "Bearer s3cret-admin-token-and-more"},
        ):
            response = await client.get("/metrics", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert "TEXTGEN_ADMIN_TOKEN" in response.json()["error"]
        ok = await client.get("/metrics", headers={"Authorization": "bearer s3cret-admin-token"})
        assert ok.status_code == 200 and "textgen_http_requests_total" in ok.text
        asked = await client.get(
            "/metrics",
            headers={
                "Authorization": "Bearer s3cret-admin-token",
                "Accept": "application/openmetrics-text",
            },
        )
        assert asked.headers["content-type"].startswith("application/openmetrics-text")
        assert asked.text.endswith("# EOF\n")


async def test_without_a_token_metrics_are_open(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(tmp_path, models_file=models_file)
    async with (
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server,
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert "# TYPE textgen_http_requests_total counter" in response.text


async def test_local_pool_wait_is_observed_once_per_generation(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        before = await scrape(server)
        local = {
            "model_name": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "Say hi."}],
            "config": {"max_output_tokens": 4},
            "sync": True,
        }
        async with server.client(account) as client:
            answers = await asyncio.gather(*(client.post(CREATE, json=local) for _ in range(3)))
        assert [a.json()["status"] for a in answers] == ["done"] * 3
        after = await scrape(server)
    assert delta(after, before, "textgen_local_pool_wait_seconds_count") == 3


async def test_in_flight_and_failures_by_class(tmp_path: Path, models_file: Path) -> None:
    gate = asyncio.Event()
    provider = FakeProvider(gate=gate, chunk_delay=0.05)
    settings = make_settings(tmp_path, models_file=models_file, sync_timeout_seconds=0.5)
    async with run_server(settings, {"fake": provider}) as server:
        account = await server.account()
        before = Scrape(metrics.exposition(None)[0].decode())  # not over HTTP: that would cache the queue
        async with server.client(account) as client:
            # Held at the gate: in flight, running.
            queued = (await client.post(CREATE, json=body())).json()
            await provider.started.wait()
            held = await scrape(server)
            assert held.get("textgen_tasks_in_flight", provider="fake") == 1
            assert held.get("textgen_queue_tasks", status="running") == 1
            # The gate never opens for a sync request within its time.
            timed_out = (await client.post(CREATE, json=body(sync=True))).json()
            assert timed_out["failed_reason"] == "timed out after 0.5 s"
            gate.set()
            assert (await server.wait_for(account, queued["id"]))["status"] == "done"
            # A stream whose client leaves after the first event.
            async with aconnect_sse(client, "POST", STREAM, json=body()) as source:
                async for _ in source.aiter_sse():
                    break
        provider.fail_with = "upstream said no: model overloaded"
        async with server.client(account) as client:
            failed = (await client.post(CREATE, json=body(sync=True))).json()
            assert failed["failed_reason"] == "upstream said no: model overloaded"
        outcomes = "textgen_task_outcomes_total"
        failure = {"model": "fake-model", "status": "failed"}
        for _ in range(500):  # the abandoned stream settles once its disconnect is noticed
            after = await scrape(server)
            if delta(after, before, outcomes, failure="client_disconnected", **failure):
                break
            await asyncio.sleep(0.02)
    assert delta(after, before, outcomes, model="fake-model", status="done", failure="none") == 1
    assert delta(after, before, outcomes, failure="timeout", **failure) == 1
    assert delta(after, before, outcomes, failure="client_disconnected", **failure) == 1
    assert delta(after, before, outcomes, failure="upstream", **failure) == 1
    assert after.get("textgen_tasks_in_flight", provider="fake") == 0
    # Every generation was timed once: the queued one, the timed-out one, the stream, the failure.
    assert delta(after, before, "textgen_upstream_seconds_count", model="fake-model") == 4


def test_every_failure_reason_has_a_bounded_class() -> None:
    from textgen.lifecycle import INTERRUPTED_STREAM
    from textgen.streaming import CLIENT_DISCONNECTED

    reasons = {
        CLIENT_DISCONNECTED: "client_disconnected",
        INTERRUPTED_STREAM: "interrupted",
        "lease lost": "lease_lost",
        "timed out after 600 s": "timeout",
        "internal error while generating (task abc, see server log)": "internal",
        "generation failed: KeyError": "internal",
        "model_name: model 'x' is not configured on this server (provider 'gemini' is not available)": "rejected",
        "stored request is invalid: 1 validation error": "rejected",
        "Gemini blocked the prompt (SAFETY)": "upstream",
        "the local model produced a malformed function call: {": "upstream",
        "": "upstream",
    }
    for reason, expected in reasons.items():
        assert metrics.failure_class(reason) == expected, reason
        assert metrics.failure_class(reason) in metrics.FAILURE_CLASSES
