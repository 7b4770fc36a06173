"""The usage page in a real headless browser (Debian's chromium driven by selenium), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import Account, run_server
from tests.fakes.providers import FakeProvider
from tests.pgdb import pg_template, pg_url  # noqa: F401  (fixtures)
from tests.test_admin import BEARER, TASK, TOKEN, admin_settings, db_url  # noqa: F401  (fixture)
from textgen.catalog import ModelSpec
from textgen.errors import UpstreamError
from textgen.protocol import GenerationInput
from textgen.providers.base import Generation, Progress

T = TypeVar("T")
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class FailsOnRequest(FakeProvider):
    """Echoes, except that a message saying "fail" fails with a reason."""

    async def generate(
        self, spec: ModelSpec, request: GenerationInput, *, account: str, progress: Progress | None = None
    ) -> Generation:
        if request.messages[-1].text() == "fail":
            raise UpstreamError("the upstream refused: quota exhausted")
        return await super().generate(spec, request, account=account, progress=progress)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.fail("chromium and chromium-driver are needed: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


async def in_browser(action: Callable[..., T], *args: Any) -> T:
    """Selenium blocks; run it off the event loop that serves the app."""
    return await asyncio.to_thread(action, *args)


def sign_in(driver: WebDriver, url: str, token: str) -> None:
    driver.get(url + "/admin/")
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    WebDriverWait(driver, 30).until(
        lambda d: d.find_elements(By.ID, "accounts") or d.find_elements(By.ID, "login-error")
    )


def text(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text.strip())


async def test_usage_page_in_a_browser(
    tmp_path: Path,
    models_file: Path,
    db_url: str,  # noqa: F811
    browser: WebDriver,
) -> None:
    settings = admin_settings(tmp_path, models_file, db_url)
    async with (
        run_server(settings, {"fake": FailsOnRequest()}) as server,
        httpx.AsyncClient(base_url=server.url, headers=BEARER, timeout=60) as admin,
    ):
        made = (await admin.post("/admin/accounts/", json={"name": "page", "credits": 40})).json()
        account = Account(made["api_id"], made["api_key"], 0)
        spare = (await admin.post(f"/admin/accounts/{account.api_id}/keys/")).json()
        other = Account(account.api_id, spare["api_key"], 0)
        async with server.client(account) as client:
            for content in ("one", "two", "fail"):
                body = {**TASK, "sync": True, "messages": [{"role": "user", "content": content}]}
                await client.post("/sse/text_generator/", json=body)
            # A webhook to a closed loopback port: one failed attempt for the health table.
            hooked = await client.post(
                "/sse/text_generator/", json={**TASK, "webhook_url": "http://127.0.0.1:9/"}
            )
            task_id = hooked.json()["id"]
            await server.wait_for(account, task_id)
            for _ in range(600):
                deliveries = (await client.get(f"/sse/text_generator/{task_id}/webhooks/")).json()
                if deliveries["results"] and deliveries["results"][0]["attempts"]:
                    break
                await asyncio.sleep(0.05)
            usage = (await client.get("/api/usage/")).json()
        shown = (await admin.get(f"/admin/accounts/{account.api_id}/")).json()

        # The wrong token is refused; the right one signs in and never appears in the URL.
        await in_browser(sign_in, browser, server.url, "not-the-token")
        assert "Wrong admin token" in await in_browser(text, browser, "#login-error")
        await in_browser(sign_in, browser, server.url, TOKEN)
        assert TOKEN not in browser.current_url
        cookies = await in_browser(browser.get_cookies)
        assert [(c["name"], c["httpOnly"]) for c in cookies] == [("textgen_admin", True)]
        assert all(TOKEN not in c["value"] for c in cookies)

        # The figures on the page are the API's.
        row = f"#accounts tr[data-api-id='{account.api_id}']"
        assert float(await in_browser(text, browser, f"{row} .balance")) == shown["remaining_credits"]
        assert "active" in await in_browser(text, browser, f"{row} .state")
        keys = await in_browser(browser.find_elements, By.CSS_SELECTOR, f"{row} li[data-key-id]")
        assert len(keys) == len(shown["keys"]) == 2
        totals = usage["totals"]
        day = f"#tasks-by-day tr[data-day='{usage['results'][0]['day']}']"
        for status, count in totals["tasks"].items():
            assert int(await in_browser(text, browser, f"{day} td[data-status='{status}']")) == count
        assert totals["tasks"]["done"] == 3 and totals["tasks"]["failed"] == 1
        model = f"#model-days tr[data-model='fake-model'][data-day='{usage['results'][0]['day']}']"
        assert int(await in_browser(text, browser, f"{model} .input")) == totals["input_tokens"]
        assert int(await in_browser(text, browser, f"{model} .output")) == totals["output_tokens"]
        assert float(await in_browser(text, browser, f"{model} .credits")) == totals["credits_used"]
        failures = await in_browser(text, browser, "#failures")
        assert "quota exhausted" in failures
        attempts = deliveries["results"][0]["attempts"]
        assert int(await in_browser(text, browser, "#attempts")) == len(attempts) >= 1
        assert int(await in_browser(text, browser, "#attempts-ok")) == 0

        # Revoke the first key from the page: it gets 401, the other key still works.
        button = await in_browser(browser.find_element, By.ID, f"revoke-{made['key_id']}")
        await in_browser(button.click)
        await in_browser(
            WebDriverWait(browser, 30).until,
            lambda d: d.find_elements(
                By.CSS_SELECTOR, f"li[data-key-id='{made['key_id']}'][data-revoked='1']"
            ),
        )
        async with server.client() as anon:
            assert (await anon.get("/api/remaining_credits/", headers=account.headers)).status_code == 401
            assert (await anon.get("/api/remaining_credits/", headers=other.headers)).status_code == 200
        listed = (await admin.get(f"/admin/accounts/{account.api_id}/keys/")).json()["results"]
        assert [k["revoked_at"] is not None for k in listed] == [True, False]
        await in_browser(browser.save_screenshot, str(tmp_path / "admin-page.png"))
        assert (tmp_path / "admin-page.png").stat().st_size > 10_000

        # A form post from another origin is refused, signed in or not.
        async with server.client() as anon:
            forged = await anon.post(
                "/admin/page/revoke",
                content=f"api_id={account.api_id}&key_id={spare['key_id']}",
                headers={
                    "Origin": "http://evil.example",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
            assert forged.status_code in (401, 403)
            assert (await anon.get("/api/remaining_credits/", headers=other.headers)).status_code == 200
