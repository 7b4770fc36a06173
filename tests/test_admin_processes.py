"""Revocation and disabling reach every process: two `textgen serve` processes on one PostgreSQL database."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.pgdb import pg_template, pg_url  # noqa: F401  (fixtures)
from tests.processes import free_port, run_cli, textgen_env, textgen_process

TOKEN = "admin-token-for-process-tests"
BOUND = 1.0  # TEXTGEN_AUTH_CACHE_SECONDS of both processes


def test_a_key_revoked_in_one_process_stops_working_in_another_within_the_bound(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    ports = [free_port(), free_port()]
    env = textgen_env(
        TEXTGEN_DATABASE_URL=pg_url,
        TEXTGEN_ADMIN_TOKEN=TOKEN,
        TEXTGEN_AUTH_CACHE_SECONDS=str(BOUND),
        TEXTGEN_RUN_WORKER="false",
        TEXTGEN_LOG_LEVEL="warning",
    )
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with (
        textgen_process("serve", "--port", str(ports[0]), env=env, log=tmp_path / "a.log", port=ports[0]),
        textgen_process(
            "serve", "--port", str(ports[1]), "--no-migrate", env=env, log=tmp_path / "b.log", port=ports[1]
        ),
    ):
        a, b = (httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=30) for p in ports)
        with a, b:
            created = a.post("/admin/accounts/", json={"name": "two", "credits": 5}, headers=admin).json()
            api_id = created["api_id"]
            spare = a.post(f"/admin/accounts/{api_id}/keys/", headers=admin).json()
            first = {"X-API-ID": api_id, "X-API-KEY": created["api_key"]}
            second = {"X-API-ID": api_id, "X-API-KEY": spare["api_key"]}
            # Process B has checked (and cached) both keys.
            for headers in (first, second):
                assert b.get("/api/remaining_credits/", headers=headers).status_code == 200
            revoked = a.delete(f"/admin/accounts/{api_id}/keys/{created['key_id']}/", headers=admin)
            assert revoked.status_code == 200
            assert a.get("/api/remaining_credits/", headers=first).status_code == 401  # at once where revoked
            time.sleep(BOUND + 0.1)  # the documented bound has passed: B must have let go of its cache entry
            assert b.get("/api/remaining_credits/", headers=first).status_code == 401
            assert b.get("/api/remaining_credits/", headers=second).status_code == 200
            # Disabling reaches B within the same bound.
            assert (
                a.patch(f"/admin/accounts/{api_id}/", json={"disabled": True}, headers=admin).status_code
                == 200
            )
            time.sleep(BOUND + 0.1)
            refused = b.get("/api/remaining_credits/", headers=second)
            assert refused.status_code == 403 and "disabled" in refused.json()["error"]
            # The CLI calls the same service: enabling from it is seen by the servers too.
            enabled = run_cli("accounts", "enable", api_id, env=env)
            assert enabled.returncode == 0, enabled.stderr
            time.sleep(BOUND + 0.1)
            assert b.get("/api/remaining_credits/", headers=second).status_code == 200
            keys = run_cli("accounts", "keys", api_id, "--json", env=env)
            listed = json.loads(keys.stdout)["keys"]
            assert [k["revoked_at"] is not None for k in listed] == [True, False]
