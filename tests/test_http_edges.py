"""Responses at the edges of the HTTP layer: early refusals carry the documented headers, a wrong method is a
405 with an Allow header, and a client leaving mid-body is logged at info without a traceback."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_settings, run_server
from tests.fakes.providers import FakeProvider
from tests.processes import free_port, run_cli, textgen_env, textgen_process
from textgen.accounts import AccountService
from textgen.catalog import ModelSpec, Pricing
from textgen.protocol import GenerationInput

CREATE = "/sse/text_generator/"
BODY = {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def assert_documented_headers(response: httpx.Response) -> None:
    assert len(response.headers.get("x-request-id", "")) == 16, (response.status_code, response.headers)
    assert float(response.headers["x-textgen-overhead-ms"]) >= 0, response.headers
    assert list(response.json()) == ["error"], response.text


async def test_every_early_refusal_carries_the_request_id_and_overhead(
    tmp_path: Path, models_file: Path
) -> None:
    settings = make_settings(tmp_path, models_file=models_file, max_body_bytes=1000)
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        limited = await server.account(rate_limit=1)
        account = await server.account(name="other")
        async with server.client(account) as client, server.client(limited) as slow:
            # A declared Content-Length over the limit is refused before the body is read.
            too_large = await client.post(
                CREATE, content=b"x" * 2000, headers={"Content-Type": "application/json"}
            )
            assert too_large.status_code == 413
            assert_documented_headers(too_large)

            bad_json = await client.post(CREATE, content=b"{", headers={"Content-Type": "application/json"})
            assert bad_json.status_code == 400
            assert_documented_headers(bad_json)

            anonymous = await client.get(CREATE, headers={"X-API-KEY": ""})
            assert anonymous.status_code == 401
            assert_documented_headers(anonymous)

            missing = await client.get("/no/such/path")
            assert missing.status_code == 404
            assert_documented_headers(missing)

            wrong_method = await client.delete(CREATE)
            assert wrong_method.status_code == 405
            assert_documented_headers(wrong_method)

            assert (await slow.get("/api/remaining_credits/")).status_code == 200
            too_many = await slow.get("/api/remaining_credits/")
            assert too_many.status_code == 429
            assert_documented_headers(too_many)


async def test_a_wrong_method_on_a_known_route_is_405_with_allow(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(tmp_path, models_file=models_file)
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            for method, path, allow in (
                ("GET", "/sse/text_generator/stream/", "POST"),  # not the task "stream"
                ("DELETE", CREATE, "GET, HEAD, POST"),
                ("PUT", CREATE, "GET, HEAD, POST"),
                ("POST", "/sse/text_generator/some-id/", "GET, HEAD"),
                ("GET", "/sse/text_generator/some-id/cancel/", "POST"),
                ("POST", "/api/remaining_credits/", "GET, HEAD"),
                ("POST", "/readyz", "GET, HEAD"),
            ):
                response = await client.request(method, path)
                assert response.status_code == 405, (method, path, response.text)
                assert response.headers["Allow"] == allow, (method, path)
                error = response.json()["error"]
                assert error == f"{method} is not allowed on {path}; use {allow}", error
            # The methods a route does serve still reach it.
            assert (await client.get("/sse/text_generator/some-id/")).status_code == 404
            assert (await client.post(CREATE, json=BODY)).status_code == 201


class CrashingCountProvider(FakeProvider):
    def count_input_tokens(self, spec: ModelSpec, request: GenerationInput) -> int:
        raise RuntimeError("a bug in a token count")


class CrashingCheckProvider(FakeProvider):
    def check(self, spec: ModelSpec, request: GenerationInput) -> None:
        raise RuntimeError("a bug in a check")


def crashing_cost(self: Pricing, spec: ModelSpec, input_tokens: int, output_tokens: int) -> int:
    raise RuntimeError("a bug in pricing")


@pytest.mark.parametrize(
    ("provider", "pricing", "bug"),
    [
        pytest.param(CrashingCheckProvider(), None, "a bug in a check", id="check"),
        pytest.param(CrashingCountProvider(), None, "a bug in a token count", id="token-count"),
        pytest.param(FakeProvider(), crashing_cost, "a bug in pricing", id="pricing"),
    ],
)
async def test_a_failure_anywhere_in_admission_is_a_logged_503_that_reserves_nothing(
    tmp_path: Path,
    models_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    provider: FakeProvider,
    pricing: Any,
    bug: str,
) -> None:
    if pricing is not None:
        monkeypatch.setattr(Pricing, "cost", pricing)
    settings = make_settings(tmp_path, models_file=models_file)
    async with run_server(settings, {"fake": provider}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            refused = [
                await client.post(CREATE, json=BODY),
                await client.post(CREATE, json={**BODY, "sync": True}),
                await client.post(f"{CREATE}stream/", json=BODY),
            ]
            credits = (await client.get("/api/remaining_credits/")).json()["remaining_credits"]
            tasks = (await client.get(CREATE)).json()["results"]
    for response in refused:
        assert response.status_code == 503, response.text
        assert_documented_headers(response)
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"] == (
            "could not admit this request for model 'fake-model'; the failure is logged, try again later"
        )
    assert credits == 100.0 and tasks == [], "a refused request reserves nothing and leaves no task"
    logged = [r for r in caplog.records if r.name == "textgen.tasks" and bug in (r.exc_text or "")]
    assert len(logged) == 3, caplog.text


async def test_an_unexpected_error_outside_admission_is_a_500_with_the_headers_and_its_request_id(
    tmp_path: Path, models_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def crashing_balance(self: AccountService, account: Any) -> int:
        raise RuntimeError("a bug in reading a balance")

    monkeypatch.setattr(AccountService, "balance", crashing_balance)
    settings = make_settings(tmp_path, models_file=models_file)
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            assert (await client.post(CREATE, json=BODY)).status_code == 201  # admission is not involved
            crashed = await client.get("/api/remaining_credits/")
    assert crashed.status_code == 500
    assert_documented_headers(crashed)
    request_id = crashed.headers["x-request-id"]
    assert crashed.json()["error"] == f"internal error (request id {request_id})"
    assert any(
        f"request {request_id}: unhandled RuntimeError" in r.getMessage()
        and "a bug in reading a balance" in (r.exc_text or "")
        for r in caplog.records
    ), caplog.text


def test_a_client_leaving_mid_body_is_logged_at_info_without_a_traceback(tmp_path: Path) -> None:
    port = free_port()
    env = textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/textgen.db")
    assert run_cli("migrate", env=env).returncode == 0
    created = run_cli("accounts", "create", "me", "--json", env=env)
    account = json.loads(created.stdout)
    log = tmp_path / "server.log"
    with textgen_process("serve", "--port", str(port), env=env, log=log, port=port):
        body = json.dumps(
            {"model_name": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}
        )
        head = (
            f"POST {CREATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-API-ID: {account['api_id']}\r\nX-API-KEY: {account['api_key']}\r\n"
            f"Content-Length: {len(body) + 500}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head.encode() + body.encode())  # 500 bytes short of what it declared
        for _ in range(100):
            if "client disconnected" in log.read_text():
                break
            time.sleep(0.1)
        # The server is still serving afterwards.
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    text = log.read_text()
    lines = [line for line in text.splitlines() if "client disconnected" in line]
    assert len(lines) == 1 and "INFO" in lines[0], text
    assert "Traceback" not in text and "ClientDisconnect" not in text and "ERROR" not in text, text
