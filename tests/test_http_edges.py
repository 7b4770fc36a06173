"""Responses at the edges of the HTTP layer: early refusals carry the documented headers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import make_settings, run_server
from tests.fakes.providers import FakeProvider
from textgen.catalog import ModelSpec
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


@dataclass
class CrashingProvider(FakeProvider):
    def check(self, spec: ModelSpec, request: GenerationInput) -> None:
        raise RuntimeError("a bug")


async def test_an_unexpected_error_is_a_500_with_the_headers_and_its_request_id(
    tmp_path: Path, models_file: Path
) -> None:
    settings = make_settings(tmp_path, models_file=models_file)
    async with run_server(settings, {"fake": CrashingProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            crashed = await client.post(CREATE, json=BODY)
    assert crashed.status_code == 500
    assert_documented_headers(crashed)
    assert crashed.json()["error"] == f"internal error (request id {crashed.headers['x-request-id']})"
