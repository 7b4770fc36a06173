"""Webhook delivery over real HTTP: signed, retried on a schedule, durable, inspectable and SSRF-safe."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from textgen.retry_after import parse_retry_after
from textgen.webhooks.addresses import IPAddress, address_class
from textgen.webhooks.payload import webhook_payload
from textgen.webhooks.retry import GiveUp, Retry, RetrySchedule

PAYLOAD_KEYS = {"id", "status", "response_text", "response_function_calls", "failed_reason", "credits_used"}


# ---- a real receiver on loopback ------------------------------------------------------------------


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: asyncio.Event | None = None


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """Records every POST; answers with ``answers`` in order, then with ``default``."""

    def __init__(self, *answers: Answer, default: Answer | None = None) -> None:
        self.answers = list(answers)
        self.default = default or Answer()
        self.seen: list[Seen] = []
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> Response:
        loop = asyncio.get_running_loop()
        self.seen.append(Seen(request.url.path, dict(request.headers), await request.body(), loop.time()))
        answer = self.answers.pop(0) if self.answers else self.default
        if answer.hang is not None:
            await answer.hang.wait()
        return Response(b"receiver says hi", status_code=answer.status, headers=answer.headers)

    async def wait(self, count: int, within: float = 30.0) -> list[Seen]:
        deadline = asyncio.get_running_loop().time() + within
        while len(self.seen) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"receiver got {len(self.seen)} of {count} requests")
            await asyncio.sleep(0.02)
        return self.seen


def listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@asynccontextmanager
async def serve_receiver(receiver: Receiver, port: int = 0) -> AsyncIterator[str]:
    """Serve ``receiver`` on loopback (on ``port`` when given, to bring a dead receiver back up)."""
    sock = listening_socket(port)
    server = uvicorn.Server(uvicorn.Config(receiver.app, log_level="warning", timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


CREATE = "/sse/text_generator/"


# ---- helpers --------------------------------------------------------------------------------------


def body(webhook_url: str | None, text: str = "hello") -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": "fake-model", "messages": [{"role": "user", "content": text}]}
    if webhook_url is not None:
        out["webhook_url"] = webhook_url
    return out


def settings_for(tmp_path: Path, models_file: Path, schedule: str = "0", **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "models_file": models_file,
        "webhook_schedule": schedule,
        "webhook_jitter": 0.0,
        "webhook_poll_seconds": 0.05,
        **overrides,
    }
    return make_settings(tmp_path, **values)


async def create(server: Server, account: Account, webhook_url: str | None) -> dict[str, Any]:
    async with server.client(account) as client:
        response = await client.post("/sse/text_generator/", json=body(webhook_url))
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def deliveries(server: Server, account: Account, task_id: str) -> list[dict[str, Any]]:
    async with server.client(account) as client:
        response = await client.get(f"/sse/text_generator/{task_id}/webhooks/")
    assert response.status_code == 200, response.text
    assert response.json()["task_id"] == task_id
    return response.json()["results"]  # type: ignore[no-any-return]


async def wait_delivery(
    server: Server,
    account: Account,
    task_id: str,
    *,
    status: str | None = None,
    attempts: int | None = None,
    within: float = 30.0,
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        found = await deliveries(server, account, task_id)
        if (
            found
            and (status is None or found[-1]["status"] == status)
            and (attempts is None or len(found[-1]["attempts"]) >= attempts)
        ):
            return found[-1]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"delivery of {task_id} not reached: {found}")
        await asyncio.sleep(0.03)


async def secret_of(server: Server, account: Account) -> str:
    row = await server.services.storage.accounts.account_by_api_id(account.api_id)
    assert row is not None
    return row.webhook_secret


def stamp(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


# ---- delivery and signature -----------------------------------------------------------------------


async def test_delivery_carries_the_guide_payload_signed_per_standard_webhooks(
    tmp_path: Path, models_file: Path
) -> None:
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server,
    ):
        account = await server.account()
        task = await create(server, account, f"{hook}/hooks/textgen")
        [seen] = await receiver.wait(1)
        finished = await server.wait_for(account, task["id"])
        secret = await secret_of(server, account)

        payload = Webhook(secret).verify(seen.body, seen.headers)
        assert set(payload) == PAYLOAD_KEYS
        assert payload["id"] == task["id"]
        assert payload["status"] == "done"
        assert payload["response_text"] == finished["response_text"] == "echo: hello"
        assert payload["credits_used"] == finished["credits_used"]
        assert seen.path == "/hooks/textgen"
        assert seen.headers["content-type"] == "application/json"
        assert seen.headers["webhook-id"].startswith("msg_")
        assert seen.headers["webhook-signature"].startswith("v1,")
        with pytest.raises(WebhookVerificationError):
            Webhook("whsec_" + "A" * 43 + "=").verify(seen.body, seen.headers)
        tampered = seen.body.replace(b"echo", b"ecHo")
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(tampered, seen.headers)

        delivery = await wait_delivery(server, account, task["id"], status="delivered")
        assert delivery["id"] == seen.headers["webhook-id"]
        assert delivery["attempt_count"] == 1
        assert delivery["next_attempt_at"] is None
        [attempt] = delivery["attempts"]
        assert attempt["status_code"] == 200
        assert attempt["error"] is None
        assert attempt["next_attempt_at"] is None


async def test_failed_task_is_delivered_too(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(
            settings_for(tmp_path, models_file), {"fake": FakeProvider(fail_with="upstream exploded")}
        ) as server,
    ):
        account = await server.account()
        task = await create(server, account, f"{hook}/h")
        [seen] = await receiver.wait(1)
        payload = Webhook(await secret_of(server, account)).verify(seen.body, seen.headers)
        assert payload["status"] == "failed"
        assert payload["failed_reason"] == "upstream exploded"
        assert payload["id"] == task["id"]


async def test_a_sync_task_with_a_webhook_url_is_answered_and_delivered(
    tmp_path: Path, models_file: Path
) -> None:
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server,
    ):
        account = await server.account()
        async with server.client(account) as client:
            response = await client.post(CREATE, json={**body(f"{hook}/sync"), "sync": True})
        assert response.status_code == 201, response.text
        task = response.json()
        assert task["status"] == "done"
        [seen] = await receiver.wait(1)
        payload = Webhook(await secret_of(server, account)).verify(seen.body, seen.headers)
        assert payload["id"] == task["id"] and payload["response_text"] == task["response_text"]


async def test_no_webhook_url_means_no_delivery(tmp_path: Path, models_file: Path) -> None:
    async with run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server:
        account = await server.account()
        task = await create(server, account, None)
        await server.wait_for(account, task["id"])
        assert await deliveries(server, account, task["id"]) == []


# ---- retries --------------------------------------------------------------------------------------


async def test_retries_follow_the_schedule_with_a_stable_webhook_id(
    tmp_path: Path, models_file: Path
) -> None:
    receiver = Receiver(Answer(500), Answer(502))
    schedule = (0.0, 0.3, 0.6)
    async with (
        serve_receiver(receiver) as hook,
        run_server(
            settings_for(tmp_path, models_file, schedule="0,0.3,0.6"), {"fake": FakeProvider()}
        ) as server,
    ):
        account = await server.account()
        task = await create(server, account, f"{hook}/h")
        seen = await receiver.wait(3)
        secret = await secret_of(server, account)
        assert len({s.headers["webhook-id"] for s in seen}) == 1
        bodies = {s.body for s in seen}
        assert len(bodies) == 1
        for s in seen:
            Webhook(secret).verify(s.body, s.headers)
        # Never earlier than the schedule says.
        assert seen[1].at - seen[0].at >= schedule[1]
        assert seen[2].at - seen[1].at >= schedule[2]

        delivery = await wait_delivery(server, account, task["id"], status="delivered")
        assert delivery["attempt_count"] == 3
        assert [a["status_code"] for a in delivery["attempts"]] == [500, 502, 200]
        first, second, third = delivery["attempts"]
        assert first["error"].startswith("HTTP 500")
        assert "receiver says hi" in first["error"]
        for attempt, delay in ((first, schedule[1]), (second, schedule[2])):
            gap = (stamp(attempt["next_attempt_at"]) - stamp(attempt["attempted_at"])).total_seconds()
            assert gap >= delay
            assert gap < delay + 1.0  # the next attempt time comes from the schedule, not from elsewhere
        assert third["next_attempt_at"] is None


async def test_after_the_last_attempt_the_delivery_is_failed_not_deleted(
    tmp_path: Path, models_file: Path
) -> None:
    receiver = Receiver(default=Answer(503))
    async with (
        serve_receiver(receiver) as hook,
        run_server(
            settings_for(tmp_path, models_file, schedule="0,0.05,0.05"), {"fake": FakeProvider()}
        ) as server,
    ):
        account = await server.account()
        task = await create(server, account, f"{hook}/h")
        delivery = await wait_delivery(server, account, task["id"], status="failed")
        assert delivery["attempt_count"] == 3
        assert len(delivery["attempts"]) == 3
        assert "gave up after 3 attempts" in delivery["attempts"][-1]["error"]
        assert delivery["next_attempt_at"] is None
        assert len(receiver.seen) == 3


async def test_410_gone_stops_retrying(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver(default=Answer(410))
    async with (
        serve_receiver(receiver) as hook,
        run_server(
            settings_for(tmp_path, models_file, schedule="0,0.05,0.05,0.05"), {"fake": FakeProvider()}
        ) as server,
    ):
        account = await server.account()
        task = await create(server, account, f"{hook}/h")
        delivery = await wait_delivery(server, account, task["id"], status="failed")
        assert delivery["attempt_count"] == 1
        [attempt] = delivery["attempts"]
        assert attempt["status_code"] == 410
        assert "410 Gone" in attempt["error"]
        assert len(receiver.seen) == 1


async def test_redirects_are_failures_and_never_followed(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver(Answer(307, {"location": "/elsewhere"}), Answer(301, {"location": "/elsewhere"}))
    async with (
        serve_receiver(receiver) as hook,
        run_server(
            settings_for(tmp_path, models_file, schedule="0,0.05,0.05"), {"fake": FakeProvider()}
        ) as server,
    ):
        account = await server.account()
        task = await create(server, account, f"{hook}/h")
        delivery = await wait_delivery(server, account, task["id"], status="delivered")
        assert [a["status_code"] for a in delivery["attempts"]] == [307, 301, 200]
        assert "redirects are not followed" in delivery["attempts"][0]["error"]
        assert [s.path for s in receiver.seen] == ["/h", "/h", "/h"]


async def test_retry_after_lengthens_the_wait(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver(Answer(429, {"retry-after": "1"}))
    async with (
        serve_receiver(receiver) as hook,
        run_server(
            settings_for(tmp_path, models_file, schedule="0,0.05,5"), {"fake": FakeProvider()}
        ) as server,
    ):
        account = await server.account()
        task = await create(server, account, f"{hook}/h")
        seen = await receiver.wait(2)
        assert seen[1].at - seen[0].at >= 1.0
        delivery = await wait_delivery(server, account, task["id"], status="delivered")
        first = delivery["attempts"][0]
        gap = (stamp(first["next_attempt_at"]) - stamp(first["attempted_at"])).total_seconds()
        assert gap >= 1.0


async def test_receiver_down_then_up(tmp_path: Path, models_file: Path) -> None:
    with listening_socket() as probe:
        port = probe.getsockname()[1]  # nothing listens once the probe is closed
    async with run_server(
        settings_for(tmp_path, models_file, schedule="0,0.2,0.2,0.2,0.2,0.2,0.2,0.2"),
        {"fake": FakeProvider()},
    ) as server:
        account = await server.account()
        task = await create(server, account, f"http://127.0.0.1:{port}/h")
        down = await wait_delivery(server, account, task["id"], attempts=1)
        assert down["status"] == "pending"
        assert down["attempts"][0]["status_code"] is None
        assert "ConnectError" in down["attempts"][0]["error"]
        assert down["attempts"][0]["next_attempt_at"] is not None
        receiver = Receiver()
        async with serve_receiver(receiver, port):
            [seen] = await receiver.wait(1)
            delivery = await wait_delivery(server, account, task["id"], status="delivered")
        assert seen.headers["webhook-id"] == delivery["id"]
        assert delivery["attempts"][-1]["status_code"] == 200
        assert all(a["status_code"] is None for a in delivery["attempts"][:-1])


async def test_a_hanging_receiver_times_out_and_blocks_nothing(tmp_path: Path, models_file: Path) -> None:
    release = asyncio.Event()
    slow = Receiver(default=Answer(200, hang=release))
    fast = Receiver()
    settings = settings_for(tmp_path, models_file, schedule="0,0.05", webhook_timeout_seconds=2)
    try:
        async with (
            serve_receiver(slow) as slow_url,
            serve_receiver(fast) as fast_url,
            run_server(settings, {"fake": FakeProvider()}) as server,
        ):
            account = await server.account()
            stuck = await create(server, account, f"{slow_url}/h")
            await slow.wait(1)
            # While that attempt hangs, the API answers and other deliveries go out.
            other = await create(server, account, f"{fast_url}/h")
            await fast.wait(1)
            assert (await wait_delivery(server, account, other["id"], status="delivered"))[
                "attempt_count"
            ] == 1
            assert len(slow.seen) == 1
            assert (await deliveries(server, account, stuck["id"]))[0]["attempts"] == []  # still in flight
            delivery = await wait_delivery(server, account, stuck["id"], status="failed")
            assert [a["error"] for a in delivery["attempts"]] == [
                "timed out after 2 s",
                "timed out after 2 s; gave up after 2 attempts",
            ]
    finally:
        release.set()


# ---- redelivery and inspection --------------------------------------------------------------------


async def test_redeliver_queues_a_new_delivery(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server,
    ):
        account = await server.account()
        task = await create(server, account, f"{hook}/h")
        await receiver.wait(1)
        await wait_delivery(server, account, task["id"], status="delivered")
        async with server.client(account) as client:
            response = await client.post(f"/sse/text_generator/{task['id']}/webhooks/redeliver/")
        assert response.status_code == 201, response.text
        queued = response.json()
        assert queued["status"] in ("pending", "delivered")
        assert queued["id"] != receiver.seen[0].headers["webhook-id"]
        seen = await receiver.wait(2)
        assert seen[1].headers["webhook-id"] == queued["id"]
        assert seen[1].body == seen[0].body
        Webhook(await secret_of(server, account)).verify(seen[1].body, seen[1].headers)
        found = await deliveries(server, account, task["id"])
        assert [d["id"] for d in found] == [seen[0].headers["webhook-id"], queued["id"]]

        # Another account sees neither the deliveries nor the task.
        stranger = await server.account(name="stranger")
        async with server.client(stranger) as client:
            for response in (
                await client.get(f"/sse/text_generator/{task['id']}/webhooks/"),
                await client.post(f"/sse/text_generator/{task['id']}/webhooks/redeliver/"),
            ):
                assert response.status_code == 404
                assert set(response.json()) == {"error"}
        async with server.client() as client:
            assert (await client.get(f"/sse/text_generator/{task['id']}/webhooks/")).status_code == 401

        # Without a webhook_url there is nothing to redeliver.
        plain = await create(server, account, None)
        await server.wait_for(account, plain["id"])
        async with server.client(account) as client:
            response = await client.post(f"/sse/text_generator/{plain['id']}/webhooks/redeliver/")
        assert response.status_code == 400
        assert "no webhook_url" in response.json()["error"]


async def test_redeliver_refuses_unfinished_tasks(tmp_path: Path, models_file: Path) -> None:
    gate = asyncio.Event()
    async with run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider(gate=gate)}) as server:
        account = await server.account()
        task = await create(server, account, "http://127.0.0.1:9/h")
        async with server.client(account) as client:
            response = await client.post(f"/sse/text_generator/{task['id']}/webhooks/redeliver/")
            assert response.status_code == 400
            assert "only finished tasks" in response.json()["error"]
            assert (await client.get(f"/sse/text_generator/{task['id']}/webhooks/")).json()["results"] == []
        gate.set()


async def test_rotated_secret_old_and_new_both_verify_during_grace(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server,
    ):
        account = await server.account()
        store = server.services.storage
        old = await secret_of(server, account)
        task = await create(server, account, f"{hook}/h")
        await receiver.wait(1)

        rotated = await store.accounts.rotate_webhook_secret(
            account.api_id, "whsec_" + "B" * 43 + "=", dt.timedelta(hours=1)
        )
        new = rotated.webhook_secret
        async with server.client(account) as client:
            assert (
                await client.post(f"/sse/text_generator/{task['id']}/webhooks/redeliver/")
            ).status_code == 201
        seen = (await receiver.wait(2))[1]
        assert len(seen.headers["webhook-signature"].split(" ")) == 2
        assert Webhook(old).verify(seen.body, seen.headers)["id"] == task["id"]
        assert Webhook(new).verify(seen.body, seen.headers)["id"] == task["id"]

        # Once the grace period is over only the current secret signs.
        await store.accounts.rotate_webhook_secret(account.api_id, "whsec_" + "C" * 43 + "=", dt.timedelta(0))
        async with server.client(account) as client:
            assert (
                await client.post(f"/sse/text_generator/{task['id']}/webhooks/redeliver/")
            ).status_code == 201
        seen = (await receiver.wait(3))[2]
        assert len(seen.headers["webhook-signature"].split(" ")) == 1
        Webhook("whsec_" + "C" * 43 + "=").verify(seen.body, seen.headers)
        for stale in (old, new):
            with pytest.raises(WebhookVerificationError):
                Webhook(stale).verify(seen.body, seen.headers)


# ---- SSRF -----------------------------------------------------------------------------------------

REFUSED = [
    ("http://127.0.0.1/h", "loopback"),
    ("http://127.8.9.10:8080/h", "loopback"),
    ("http://[::1]/h", "loopback"),
    ("http://[::ffff:127.0.0.1]/h", "loopback"),
    ("http://10.1.2.3/h", "private"),
    ("http://172.16.5.4/h", "private"),
    ("https://192.168.1.20/h", "private"),
    ("http://[fd12:3456::1]/h", "private"),
    ("http://169.254.10.20/h", "link-local"),
    ("http://[fe80::1]/h", "link-local"),
    ("http://224.0.0.251/h", "multicast"),
    ("http://[ff02::1]/h", "multicast"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]/h", "metadata"),
    ("http://0.0.0.0/h", "unspecified"),
    ("http://100.64.0.1/h", "reserved"),
    ("http://240.0.0.1/h", "reserved"),
    ("http://localhost:8080/h", "loopback"),
    # IPv6 forms that wrap an internal IPv4 address take its class, named with the form.
    ("http://[2002:7f00:1::]/h", "6to4 loopback"),
    ("http://[2002:a9fe:a9fe::]/h", "6to4 metadata"),
    ("http://[2002:a00:1::1]/h", "6to4 private"),
    ("http://[2002:5db8:d70e::1]/h", "6to4"),  # a public IPv4 behind a 6to4 relay: still a tunnel
    ("http://[64:ff9b::7f00:1]/h", "NAT64 loopback"),
    ("http://[64:ff9b::a9fe:a9fe]/h", "NAT64 metadata"),
    ("http://[::127.0.0.1]/h", "IPv4-compatible loopback"),
    ("http://[::10.0.0.1]/h", "IPv4-compatible private"),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/h", "Teredo private"),  # client 192.0.2.45
    ("http://[fec0::1]/h", "site-local"),
    ("http://[fefe::abcd]/h", "site-local"),
]

# Ports of internal services, refused by default (TEXTGEN_WEBHOOK_REFUSED_PORTS) whatever the host.
REFUSED_PORTS = [0, 22, 25, 3306, 5432, 6379, 11211]


async def test_create_refuses_webhook_urls_reaching_private_addresses(
    tmp_path: Path, models_file: Path
) -> None:
    settings = settings_for(tmp_path, models_file, webhook_allow_private=False)
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            for url, kind in REFUSED:
                response = await client.post("/sse/text_generator/", json=body(url))
                assert response.status_code == 400, (url, response.text)
                error = response.json()["error"]
                assert error.startswith("webhook_url: "), error
                assert f"is a {kind} address" in error, (url, error)
            localhost = (await client.post("/sse/text_generator/", json=body("http://localhost/h"))).json()
            # The refusal names the class, never how this server's DNS resolved the name.
            assert "'localhost' resolves to an address that is a loopback address" in localhost["error"]
            assert "127.0.0.1" not in localhost["error"]
            for port in REFUSED_PORTS:
                response = await client.post(
                    "/sse/text_generator/", json=body(f"http://93.184.215.14:{port}/h")
                )
                assert response.status_code == 400, (port, response.text)
                assert response.json()["error"] == (
                    f"webhook_url: port {port} is refused for webhooks (an internal service port)"
                )
            for url in (
                "ftp://example.com/h",
                "http://user:pw@example.com/h",
                "http://" + "a" * 2100 + ".com/",
            ):
                response = await client.post("/sse/text_generator/", json=body(url))
                assert response.status_code == 400
                assert "webhook_url" in response.json()["error"]
            # A public address passes the create-time check; nothing was charged for the refused ones.
            accepted = await client.post("/sse/text_generator/", json=body("http://93.184.215.14/h"))
            assert accepted.status_code == 201, accepted.text
            listed = (await client.get("/sse/text_generator/")).json()["results"]
            assert [t["id"] for t in listed] == [accepted.json()["id"]]


class ScriptedDNS:
    """A resolver answering from a table; each name's answers are used in turn (the last one repeats)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append(host)
        answers = self.table.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "name not known")
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        return [ipaddress.ip_address(answer)]


async def test_send_time_check_defeats_dns_rebinding(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver()
    settings = settings_for(tmp_path, models_file, webhook_allow_private=False)
    async with serve_receiver(receiver) as hook, run_server(settings, {"fake": FakeProvider()}) as server:
        port = hook.rsplit(":", 1)[1]
        dns = ScriptedDNS({"rebind.example": ["93.184.215.14", "127.0.0.1"]})
        assert server.services.webhooks is not None
        server.services.webhooks.policy.resolver = dns  # the same policy checks at create time
        account = await server.account()
        task = await create(server, account, f"http://rebind.example:{port}/h")
        delivery = await wait_delivery(server, account, task["id"], status="failed")
        [attempt] = delivery["attempts"]
        assert attempt["status_code"] is None
        assert (
            "refused: host 'rebind.example' resolves to an address that is a loopback address"
            in attempt["error"]
        )
        assert "127.0.0.1" not in attempt["error"]
        assert dns.calls == ["rebind.example", "rebind.example"]
        assert receiver.seen == []


async def test_send_time_check_refuses_a_queued_private_url(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver()
    settings = settings_for(tmp_path, models_file, webhook_allow_private=False)
    async with serve_receiver(receiver) as hook, run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        task = await create(server, account, None)
        await server.wait_for(account, task["id"])
        row = await server.services.storage.tasks.get(task["id"])
        await server.services.storage.outbox.queue(  # as if queued before a policy change
            task_id=row.id,
            account_id=row.account_id,
            url=f"{hook}/h",
            payload=webhook_payload(row),
            notify=False,
        )
        server.services.wakeups.delivery_queued()
        delivery = await wait_delivery(server, account, task["id"], status="failed")
        assert "refused: host '127.0.0.1' is a loopback address" in delivery["attempts"][0]["error"]
        assert receiver.seen == []


async def test_connects_to_the_checked_address_and_keeps_the_host_name(
    tmp_path: Path, models_file: Path
) -> None:
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server,
    ):
        port = hook.rsplit(":", 1)[1]
        # The name exists only in this resolver, so reaching the receiver proves which address was used.
        dns = ScriptedDNS({"receiver.example": ["127.0.0.1"]})
        assert server.services.webhooks is not None
        server.services.webhooks.policy.resolver = dns
        account = await server.account()
        task = await create(server, account, f"http://receiver.example:{port}/h")
        [seen] = await receiver.wait(1)
        assert seen.headers["host"] == f"receiver.example:{port}"
        await wait_delivery(server, account, task["id"], status="delivered")
        assert "receiver.example" in dns.calls


async def test_a_failed_connection_does_not_tell_the_address_a_name_resolved_to(
    tmp_path: Path, models_file: Path
) -> None:
    with listening_socket() as probe:
        port = probe.getsockname()[1]  # nothing listens once the probe is closed
    async with run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server:
        dns = ScriptedDNS({"down.example": ["127.0.0.1"]})
        assert server.services.webhooks is not None
        server.services.webhooks.policy.resolver = dns
        account = await server.account()
        task = await create(server, account, f"http://down.example:{port}/h")
        delivery = await wait_delivery(server, account, task["id"], attempts=1)
        [attempt] = delivery["attempts"]
        assert attempt["status_code"] is None
        assert attempt["error"].startswith("ConnectError: Connection refused")
        assert "127.0.0.1" not in attempt["error"]
        assert dns.calls == ["down.example", "down.example"]  # at create time, then when connecting


# ---- the schedule and the address classes as data -------------------------------------------------


def test_schedule_decisions() -> None:
    schedule = RetrySchedule.parse("0,5,300,1800", jitter=0.0)
    assert schedule.decide(1, 200) is None
    assert schedule.decide(1, 204) is None
    assert schedule.decide(1, 500) == Retry(5.0)
    assert schedule.decide(2, None) == Retry(300.0)
    assert schedule.decide(1, 302) == Retry(5.0)
    assert isinstance(schedule.decide(1, 410), GiveUp)
    assert isinstance(schedule.decide(4, 500), GiveUp)
    assert schedule.decide(1, 503, retry_after=60) == Retry(60.0)
    assert schedule.decide(1, 503, retry_after=10**6) == Retry(1800.0)  # capped at the longest delay
    assert schedule.decide(3, 503, retry_after=1) == Retry(1800.0)  # never shortened
    jittered = RetrySchedule.parse("0,100", jitter=0.1)
    delays = {
        d.delay
        for d in (jittered.decide(1, 500, rng=random.Random(seed)) for seed in range(20))
        if isinstance(d, Retry)
    }
    assert len(delays) > 1
    assert all(90 <= d <= 110 for d in delays)
    default = RetrySchedule.parse(make_settings_default_schedule())
    assert 2.5 * 86400 < sum(default.delays) < 3.5 * 86400
    with pytest.raises(ValueError):
        RetrySchedule.parse("5,-1")


def make_settings_default_schedule() -> str:
    from textgen.settings import Settings

    return str(Settings.model_fields["webhook_schedule"].default)


def test_retry_after_parsing() -> None:
    now = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:01:00 GMT", now) == 60.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_address_classes() -> None:
    cases = {
        "8.8.8.8": None,
        "2606:4700:4700::1111": None,
        "127.0.0.1": "loopback",
        "::1": "loopback",
        "10.0.0.1": "private",
        "fc00::1": "private",
        "169.254.1.1": "link-local",
        "fe80::2": "link-local",
        "239.1.1.1": "multicast",
        "169.254.169.254": "metadata",
        "0.0.0.0": "unspecified",
        "::": "unspecified",
        "::ffff:10.0.0.1": "private",
        "198.18.0.1": "private",
        "100.64.1.1": "reserved",
    }
    for text, kind in cases.items():
        assert address_class(ipaddress.ip_address(text)) == kind, text


def test_refused_ports_setting() -> None:
    from textgen.errors import ConfigurationError
    from textgen.settings import load_settings

    assert load_settings(webhook_refused_ports="").webhook_refused_port_set == frozenset()
    assert load_settings(webhook_refused_ports=" 22, 8081").webhook_refused_port_set == {22, 8081}
    with pytest.raises(ConfigurationError, match=r"TEXTGEN_WEBHOOK_REFUSED_PORTS: .*'ssh'"):
        load_settings(webhook_refused_ports="22,ssh")
    with pytest.raises(ConfigurationError, match="TEXTGEN_WEBHOOK_REFUSED_PORTS"):
        load_settings(webhook_refused_ports="70000")


async def test_refused_ports_can_be_lifted(tmp_path: Path, models_file: Path) -> None:
    settings = settings_for(tmp_path, models_file, webhook_allow_private=False, webhook_refused_ports="")
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        # An account that cannot pay: the URL check runs before the reservation, so a 402 (not a 400) shows
        # the port passed the guard, and no task exists whose webhook could ever be sent.
        broke = await server.account(credits=0)
        async with server.client(broke) as client:
            response = await client.post("/sse/text_generator/", json=body("http://93.184.215.14:22/h"))
            assert response.status_code == 402, response.text
            assert (await client.get("/sse/text_generator/")).json()["results"] == []


async def test_a_claimed_batch_reads_its_signing_secrets_once(tmp_path: Path, models_file: Path) -> None:
    """The sender reads the accounts of a claimed batch in one query, not one per delivery, and every
    delivery is signed with its own account's secret."""
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server,
    ):
        store = server.services.storage.accounts
        reads: list[str] = []
        one, several = store.account_by_id, store.accounts_by_id

        async def account_by_id(account_id: int) -> Any:
            reads.append("one")
            return await one(account_id)

        async def accounts_by_id(account_ids: set[int]) -> Any:
            if account_ids:  # a claim that found nothing reads nothing
                reads.append("batch")
            return await several(account_ids)

        store.account_by_id = account_by_id  # type: ignore[method-assign]
        store.accounts_by_id = accounts_by_id  # type: ignore[method-assign]
        first, second = await server.account(), await server.account()
        tasks = [await create(server, account, f"{hook}/h") for account in (first, second) for _ in range(6)]
        seen = await receiver.wait(len(tasks))
        secrets = {await secret_of(server, first), await secret_of(server, second)}
        for each in seen:
            payload = None
            for secret in secrets:
                with contextlib.suppress(WebhookVerificationError):
                    payload = Webhook(secret).verify(each.body, each.headers)
            assert payload is not None and payload["id"] in {task["id"] for task in tasks}
        assert "one" not in reads
        assert 1 <= reads.count("batch") <= len(tasks)
