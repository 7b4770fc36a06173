"""The admin API and the usage endpoint over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from tests.pgdb import pg_template, pg_url  # noqa: F401  (fixtures)
from textgen.settings import Settings
from textgen.storage.tables import ledger

TOKEN = "admin-token-for-tests-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
TASK = {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/admin.db"
    return str(request.getfixturevalue("pg_url"))


def admin_settings(tmp_path: Path, models_file: Path, db_url: str, **extra: Any) -> Settings:
    return make_settings(tmp_path, models_file=models_file, database_url=db_url, admin_token=TOKEN, **extra)


def admin_client(server: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers=BEARER, timeout=60)


async def ledger_rows(server: Server, kind: str) -> list[Any]:
    query = sa.select(ledger).where(ledger.c.kind == kind).order_by(ledger.c.id)
    return await server.services.storage.db.run(lambda conn: list(conn.execute(query).all()))


async def test_the_admin_prefix_is_404_without_a_token(
    tmp_path: Path, models_file: Path, db_url: str
) -> None:
    settings = make_settings(tmp_path, models_file=models_file, database_url=db_url)
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        async with admin_client(server) as client:
            for method, path in [
                ("GET", "/admin/"),
                ("GET", "/admin/accounts/"),
                ("POST", "/admin/accounts/"),
                ("DELETE", "/admin/accounts/tg_x/keys/key_x/"),
                ("POST", "/admin/login"),
            ]:
                response = await client.request(method, path, json={"name": "x"})
                assert response.status_code == 404, (method, path)
                assert response.json() == {"error": "not found"}
        assert await server.services.storage.accounts.count_accounts() == 0


async def test_accounts_keys_credits_and_secrets(tmp_path: Path, models_file: Path, db_url: str) -> None:
    settings = admin_settings(tmp_path, models_file, db_url)
    async with (
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server,
        admin_client(server) as admin,
        server.client() as anon,
    ):
        # Without the token, or with a wrong one: 401, nothing created.
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            refused = await anon.post("/admin/accounts/", json={"name": "x"}, headers=headers)
            assert refused.status_code == 401 and "admin" in refused.json()["error"]
        assert await server.services.storage.accounts.count_accounts() == 0

        created = await admin.post(
            "/admin/accounts/", json={"name": "acme", "credits": 10, "rate_limit": 100}
        )
        assert created.status_code == 201, created.text
        body = created.json()
        api_id, first_key = body["api_id"], body["api_key"]
        assert body["remaining_credits"] == 10 and body["rate_limit_per_minute"] == 100
        assert body["disabled"] is False and body["keys"][0]["key_id"] == body["key_id"]
        first = Account(api_id, first_key, 0)
        credits = await anon.get("/api/remaining_credits/", headers=first.headers)
        assert credits.status_code == 200 and credits.json() == {"remaining_credits": 10}

        # Bad input: a clear 400 naming the field; nothing created.
        for bad in [{}, {"name": ""}, {"name": "x", "credits": -1}, {"name": "x", "rate_limit": 0},
                    {"name": "x", "credits": "5"}, {"name": "x", "colour": "red"}]:  # fmt: skip
            response = await admin.post("/admin/accounts/", json=bad)
            assert response.status_code == 400, bad
            assert response.json()["error"].split(":")[0] in {"name", "credits", "rate_limit", "colour"}
        nan = await admin.post(
            "/admin/accounts/",
            content=b'{"name": "x", "credits": NaN}',
            headers={"Content-Type": "application/json"},
        )
        assert nan.status_code == 400 and nan.json()["error"].startswith("credits:")
        assert await server.services.storage.accounts.count_accounts() == 1

        # The list is cursor-paginated.
        for n in range(3):
            assert (await admin.post("/admin/accounts/", json={"name": f"more{n}"})).status_code == 201
        seen: list[str] = []
        url: str | None = "/admin/accounts/?limit=2"
        pages = 0
        while url:
            page = (await admin.get(url)).json()
            seen += [a["api_id"] for a in page["results"]]
            url, pages = page["next"], pages + 1
        assert pages == 2 and len(seen) == 4 == len(set(seen)) and seen[0] == api_id
        assert (await admin.get("/admin/accounts/?cursor=%%%")).status_code == 400
        assert (await admin.get("/admin/accounts/?limit=0")).status_code == 400

        # A second key; both authenticate; keys are listed by prefix, never in full.
        made = await admin.post(f"/admin/accounts/{api_id}/keys/")
        assert made.status_code == 201
        second = Account(api_id, made.json()["api_key"], 0)
        assert made.json()["prefix"] == second.api_key[:10]
        for account in (first, second):
            assert (await anon.get("/api/remaining_credits/", headers=account.headers)).status_code == 200
        keys = (await admin.get(f"/admin/accounts/{api_id}/keys/")).json()["results"]
        assert [k["key_id"] for k in keys] == [body["key_id"], made.json()["key_id"]]
        assert all(k["last_used_at"] is not None and k["revoked_at"] is None for k in keys)
        shown = await admin.get(f"/admin/accounts/{api_id}/")
        assert first.api_key not in shown.text and second.api_key not in shown.text

        # Revoking one key cuts off that key only, at once in this process.
        revoked = await admin.delete(f"/admin/accounts/{api_id}/keys/{body['key_id']}/")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        assert (await anon.get("/api/remaining_credits/", headers=first.headers)).status_code == 401
        assert (await anon.get("/api/remaining_credits/", headers=second.headers)).status_code == 200
        assert (await admin.delete(f"/admin/accounts/{api_id}/keys/key_nope/")).status_code == 404

        # Credits with a reason, one ledger row each, never below zero.
        credited = await admin.post(
            f"/admin/accounts/{api_id}/credits/", json={"amount": 5, "reason": "top-up"}
        )
        assert credited.status_code == 200 and credited.json()["remaining_credits"] == 15
        debited = await admin.post(
            f"/admin/accounts/{api_id}/credits/", json={"amount": -2.5, "reason": "refund"}
        )
        assert debited.json()["remaining_credits"] == 12.5
        for bad in [{"amount": -100, "reason": "x"}, {"amount": 0, "reason": "x"}, {"amount": 1},
                    {"amount": "1", "reason": "x"}, {"amount": True, "reason": "x"}, {"amount": 1, "reason": ""}]:  # fmt: skip
            response = await admin.post(f"/admin/accounts/{api_id}/credits/", json=bad)
            assert response.status_code == 400, (bad, response.text)
        overdraw = await admin.post(
            f"/admin/accounts/{api_id}/credits/", json={"amount": -100, "reason": "x"}
        )
        assert "below zero" in overdraw.json()["error"]
        for raw in (b'{"amount": NaN, "reason": "x"}', b'{"amount": Infinity, "reason": "x"}'):
            response = await admin.post(
                f"/admin/accounts/{api_id}/credits/",
                content=raw,
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code == 400 and response.json()["error"].startswith("amount:")
        adjustments = await ledger_rows(server, "adjust")
        assert [(r.amount, r.reason) for r in adjustments] == [
            (5_000_000, "top-up"),
            (-2_500_000, "refund"),
        ]
        assert (await anon.get("/api/remaining_credits/", headers=second.headers)).json() == {
            "remaining_credits": 12.5
        }

        # Rate limit and state; bad values change nothing.
        assert (await admin.patch(f"/admin/accounts/{api_id}/", json={"rate_limit": 0})).status_code == 400
        assert (await admin.patch(f"/admin/accounts/{api_id}/", json={"disabled": "yes"})).status_code == 400
        assert (await admin.patch(f"/admin/accounts/{api_id}/", json={})).status_code == 400
        patched = await admin.patch(f"/admin/accounts/{api_id}/", json={"rate_limit": 7})
        assert patched.json()["rate_limit_per_minute"] == 7 and patched.json()["disabled"] is False
        limited = await anon.get("/api/remaining_credits/", headers=second.headers)
        assert limited.headers["ratelimit-limit"] == "7"

        # Webhook secret rotation: a new current secret, the previous one in its grace period.
        before = shown.json()["webhook_secret"]
        rotated = await admin.post(f"/admin/accounts/{api_id}/webhook-secret/")
        assert rotated.status_code == 200
        assert (
            rotated.json()["webhook_secret"] != before and "webhook_secret_previous_until" in rotated.json()
        )

        # Unknown accounts: 404 everywhere.
        for method, path, payload in [
            ("GET", "/admin/accounts/tg_nobody/", None),
            ("PATCH", "/admin/accounts/tg_nobody/", {"rate_limit": 5}),
            ("POST", "/admin/accounts/tg_nobody/credits/", {"amount": 1, "reason": "x"}),
            ("POST", "/admin/accounts/tg_nobody/keys/", None),
            ("GET", "/admin/accounts/tg_nobody/keys/", None),
            ("DELETE", f"/admin/accounts/tg_nobody/keys/{made.json()['key_id']}/", None),
            ("POST", "/admin/accounts/tg_nobody/webhook-secret/", None),
        ]:
            response = await admin.request(method, path, json=payload)
            assert response.status_code == 404, (method, path)
            assert "tg_nobody" in response.json()["error"]
        # Another account's key id is unknown here too (and stays live).
        assert (
            await admin.delete(f"/admin/accounts/{seen[1]}/keys/{made.json()['key_id']}/")
        ).status_code == 404
        assert (await anon.get("/api/remaining_credits/", headers=second.headers)).status_code == 200


async def test_a_disabled_account_is_refused_and_its_pending_tasks_never_start(
    tmp_path: Path, models_file: Path, db_url: str
) -> None:
    settings = admin_settings(tmp_path, models_file, db_url)
    fake = FakeProvider()
    async with run_server(settings, {"fake": fake}, run_worker=False) as server:
        account = await server.account(credits=100)
        other = await server.account(credits=100, name="other")
        async with admin_client(server) as admin, server.client(account) as client:
            queued = [(await client.post("/sse/text_generator/", json=TASK)).json()["id"] for _ in range(3)]
            held = (await client.get("/api/remaining_credits/")).json()["remaining_credits"]
            assert held < 100
            off = await admin.patch(f"/admin/accounts/{account.api_id}/", json={"disabled": True})
            assert off.status_code == 200 and off.json()["disabled"] is True
            for method, path in [
                ("POST", "/sse/text_generator/"),
                ("GET", "/sse/text_generator/"),
                ("GET", f"/sse/text_generator/{queued[0]}/"),
                ("GET", f"/api/text_generator/{queued[0]}/"),
                ("GET", f"/sse/text_generator/{queued[0]}/webhooks/"),
                ("POST", "/sse/text_generator/stream/"),
                ("GET", "/api/remaining_credits/"),
                ("GET", "/api/usage/"),
                ("GET", "/sse/models/"),
            ]:
                response = await client.request(method, path, json=TASK if method == "POST" else None)
                assert response.status_code == 403, (method, path, response.text)
                assert "disabled" in response.json()["error"]
            # A wrong key still gets 401, not a hint that the account exists and is disabled.
            wrong = await client.get("/api/remaining_credits/", headers={"X-API-KEY": "tgk_wrong"})
            assert wrong.status_code == 401
            # The worker starts now: the disabled account's tasks were failed, not started; credits released.
            await server.services.start_worker()
            other_task = (await client.post("/sse/text_generator/", json=TASK, headers=other.headers)).json()[
                "id"
            ]
            assert (await server.wait_for(other, other_task))["status"] == "done"
            shown = (await admin.get(f"/admin/accounts/{account.api_id}/")).json()
            assert shown["remaining_credits"] == 100
            assert len(fake.calls) == 1
            on = await admin.patch(f"/admin/accounts/{account.api_id}/", json={"disabled": False})
            assert on.json()["disabled"] is False
            for task_id in queued:
                task = (await client.get(f"/sse/text_generator/{task_id}/")).json()
                assert task["status"] == "failed" and "disabled" in task["failed_reason"]
                assert task["credits_used"] == 0
            assert (await client.get("/api/remaining_credits/")).json() == {"remaining_credits": 100}
            assert len(await ledger_rows(server, "release")) == 3


async def test_usage_reconciles_with_remaining_credits(
    tmp_path: Path, models_file: Path, db_url: str
) -> None:
    settings = admin_settings(tmp_path, models_file, db_url)
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account(credits=50)
        async with admin_client(server) as admin, server.client(account) as client:
            done = [await client.post("/sse/text_generator/", json={**TASK, "sync": True}) for _ in range(3)]
            assert all(r.status_code == 201 and r.json()["status"] == "done" for r in done)
            await admin.post(
                f"/admin/accounts/{account.api_id}/credits/", json={"amount": 3.25, "reason": "gift"}
            )
            # Work the worker has not finished yet (reserved credits) is reported as reserved.
            await server.services.worker.stop(0)
            pending = (await client.post("/sse/text_generator/", json=TASK)).json()

            remaining = Decimal(
                str((await client.get("/api/remaining_credits/")).json()["remaining_credits"])
            )
            for group_by in ("model", "day"):
                usage = await client.get(f"/api/usage/?group_by={group_by}")
                assert usage.status_code == 200, usage.text
                report = usage.json()
                totals = report["totals"]
                assert totals["tasks"] == {"pending": 1, "running": 0, "done": 3, "failed": 0}
                assert totals["input_tokens"] == sum(r.json()["input_tokens"] for r in done)
                assert totals["output_tokens"] == sum(r.json()["output_tokens"] for r in done)
                used = sum(Decimal(str(r.json()["credits_used"])) for r in done)
                assert Decimal(str(totals["credits_used"])) == used > 0
                assert Decimal(str(totals["credits_added"])) == Decimal("53.25")
                assert Decimal(str(report["remaining_credits"])) == remaining
                assert (
                    Decimal(str(totals["credits_added"]))
                    - Decimal(str(totals["credits_used"]))
                    - Decimal(str(totals["credits_reserved"]))
                    == remaining
                )
                assert len(report["results"]) == 1
            assert report["results"][0]["day"] == pending["created_at"][:10]
            by_model = (await client.get("/api/usage/?group_by=model")).json()["results"]
            assert by_model[0]["model"] == "fake-model"
            # A window in the future has nothing in it.
            empty = (await client.get("/api/usage/?from=2999-01-01&to=2999-01-02")).json()
            assert empty["results"] == [] and empty["totals"]["credits_used"] == 0
            today = pending["created_at"][:10]
            window = (await client.get(f"/api/usage/?from={today}&to={today}")).json()
            assert window["totals"]["tasks"]["done"] == 3
            for bad, field in [
                ("group_by=week", "group_by"),
                ("from=yesterday", "from"),
                ("to=2025-13-01", "to"),
                ("to=9999-12-31", "to"),
                ("from=0001-01-01T00:00:00%2B05:00", "from"),
                ("from=2025-02-01&to=2025-01-01", "from"),
                ("limit=5", "unknown query parameter"),
            ]:
                response = await client.get(f"/api/usage/?{bad}")
                assert response.status_code == 400 and response.json()["error"].startswith(field), bad
            # Each account sees only its own usage.
            other = await server.account(name="other")
            mine = (await client.get("/api/usage/", headers=other.headers)).json()
            assert mine["results"] == [] and mine["remaining_credits"] == 100
            assert (await client.get("/api/usage/", headers={"X-API-KEY": "wrong"})).status_code == 401
        await asyncio.sleep(0)
