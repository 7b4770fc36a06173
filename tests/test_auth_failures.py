"""Failed authentications over HTTP: counted per client address (429 past the limit) and remembered, so a
flood of bad credentials costs the database one lookup per distinct id or key, not one per request."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import Server, make_settings, run_server
from tests.fakes.providers import FakeProvider

CREDITS = "/api/remaining_credits/"


def from_address(server: Server, address: str, headers: dict[str, str]) -> httpx.AsyncClient:
    """A client whose connections come from ``address`` (any 127.x.y.z is loopback)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=server.url, headers=headers, transport=transport, timeout=60)


async def test_failed_authentications_are_limited_per_client_address(
    tmp_path: Path, models_file: Path
) -> None:
    settings = make_settings(
        tmp_path, models_file=models_file, auth_failures_per_minute=5, auth_cache_seconds=60
    )
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        known, other = await server.account(name="known"), await server.account(name="other")
        wrong = {"X-API-ID": known.api_id, "X-API-KEY": "tgk_wrong"}
        async with from_address(server, "127.0.0.1", known.headers) as client:
            assert (await client.get(CREDITS)).status_code == 200  # checked once: cached as valid
            # Requests without credentials are refused, but cost nothing and are not counted.
            for _ in range(10):
                assert (
                    await client.get(CREDITS, headers={"X-API-ID": "", "X-API-KEY": ""})
                ).status_code == 401
            for i in range(5):
                response = await client.get(CREDITS, headers={**wrong, "X-API-KEY": f"tgk_wrong{i}"})
                assert response.status_code == 401, (i, response.text)
            refused = await client.get(CREDITS, headers=wrong)
            assert refused.status_code == 429, refused.text
            assert set(refused.json()) == {"error"}
            assert "too many failed authentications from this address" in refused.json()["error"]
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            assert refused.headers["x-request-id"]
            # Valid credentials not checked yet are refused from this address too; those just checked are not.
            assert (await client.get(CREDITS, headers=other.headers)).status_code == 429
            assert (await client.get(CREDITS)).status_code == 200
        lookups = server.services.auth.lookups
        # Another address is not affected.
        async with from_address(server, "127.0.0.2", other.headers) as client:
            assert (await client.get(CREDITS)).status_code == 200
            assert (await client.get(CREDITS, headers=wrong)).status_code == 401
        # The refused requests never reached the database.
        assert server.services.auth.lookups == lookups + 2


async def test_unknown_ids_and_wrong_keys_are_remembered_briefly(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(
        tmp_path, models_file=models_file, auth_failures_per_minute=1000, auth_cache_seconds=60
    )
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        auth = server.services.auth
        async with server.client() as client:
            for _ in range(20):
                response = await client.get(CREDITS, headers={"X-API-ID": "tg_nobody", "X-API-KEY": "tgk_x"})
                assert response.status_code == 401
                assert response.json() == {"error": "invalid X-API-ID or X-API-KEY"}
            assert auth.lookups == 1  # an id no account has: one lookup, whatever the key after it
            for key in ("tgk_y", "tgk_z"):
                response = await client.get(CREDITS, headers={"X-API-ID": "tg_nobody", "X-API-KEY": key})
                assert response.status_code == 401
            assert auth.lookups == 1
            wrong = {"X-API-ID": account.api_id, "X-API-KEY": "tgk_wrong"}
            for _ in range(20):
                assert (await client.get(CREDITS, headers=wrong)).status_code == 401
            assert auth.lookups == 2  # a wrong key of a real account: once per distinct key
            assert (await client.get(CREDITS, headers=account.headers)).status_code == 200
            assert auth.lookups == 3  # the right key is looked up, not answered from the failures
            # Revoking or adding keys through this process forgets what was remembered of the account.
            auth.forget(account.api_id)
            assert (await client.get(CREDITS, headers=wrong)).status_code == 401
            assert auth.lookups == 4
