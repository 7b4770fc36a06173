"""``textgen_client.verify_webhook`` on webhooks a real textgen server delivered to a loopback receiver."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from tests.conftest import run_server
from tests.fakes.providers import FakeProvider
from tests.test_webhooks import Receiver, secret_of, serve_receiver, settings_for
from textgen_client import AsyncClient, WebhookVerificationError, verify_webhook
from textgen_client.webhooks import sign


async def test_verifies_real_deliveries_and_refuses_every_tampering(
    tmp_path: Path, models_file: Path
) -> None:
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server,
    ):
        account = await server.account()
        secret = await secret_of(server, account)
        async with AsyncClient(account.api_id, account.api_key, base_url=server.url) as client:
            task = await client.submit("fake-model", "signed, please", webhook_url=f"{hook}/hook")
            done = await client.wait(task, timeout=30)
        seen = (await receiver.wait(1))[0]

        message = verify_webhook(seen.headers, seen.body, secret)
        assert message.task.id == task.id and message.task.status == "done"
        assert message.task.response_text == "echo: signed, please" == done.response_text
        assert message.task.credits_used == pytest.approx(done.credits_used)
        assert message.message_id == seen.headers["webhook-id"] and message.message_id.startswith("msg_")
        assert abs(message.timestamp - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
        assert message.payload == json.loads(seen.body)
        # The body as text, and headers in any case, verify too.
        upper = {k.upper(): v for k, v in seen.headers.items()}
        assert verify_webhook(upper, seen.body.decode(), secret).task.id == task.id

        tampered = seen.body.replace(b"signed", b"forged")
        with pytest.raises(WebhookVerificationError, match="no signature matches"):
            verify_webhook(seen.headers, tampered, secret)
        reserialised = json.dumps(json.loads(seen.body), indent=1).encode()
        with pytest.raises(WebhookVerificationError):
            verify_webhook(seen.headers, reserialised, secret)
        other_secret = "whsec_" + base64.b64encode(b"x" * 32).decode()
        with pytest.raises(WebhookVerificationError):
            verify_webhook(seen.headers, seen.body, other_secret)
        for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            partial = {k: v for k, v in seen.headers.items() if k != missing}
            with pytest.raises(WebhookVerificationError, match="missing"):
                verify_webhook(partial, seen.body, secret)
        with pytest.raises(WebhookVerificationError):
            verify_webhook({**seen.headers, "webhook-id": "msg_other"}, seen.body, secret)
        # A captured request replayed later (or stamped ahead) is refused, inside the tolerance it is not.
        sent_at = int(seen.headers["webhook-timestamp"])
        with pytest.raises(WebhookVerificationError, match="too old"):
            verify_webhook(seen.headers, seen.body, secret, now=sent_at + 301)
        with pytest.raises(WebhookVerificationError, match="future"):
            verify_webhook(seen.headers, seen.body, secret, now=sent_at - 301)
        verify_webhook(seen.headers, seen.body, secret, now=sent_at + 299)
        with pytest.raises(WebhookVerificationError, match="integer"):
            verify_webhook({**seen.headers, "webhook-timestamp": "soon"}, seen.body, secret)


async def test_either_secret_verifies_during_a_rotation(tmp_path: Path, models_file: Path) -> None:
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as hook,
        run_server(settings_for(tmp_path, models_file), {"fake": FakeProvider()}) as server,
    ):
        account = await server.account()
        old = await secret_of(server, account)
        new = "whsec_" + base64.b64encode(b"n" * 32).decode()
        await server.services.storage.accounts.rotate_webhook_secret(
            account.api_id, new, dt.timedelta(hours=1)
        )
        async with AsyncClient(account.api_id, account.api_key, base_url=server.url) as client:
            task = await client.submit("fake-model", "rotating", webhook_url=f"{hook}/hook")
        seen = (await receiver.wait(1))[0]
    assert len(seen.headers["webhook-signature"].split(" ")) == 2
    assert verify_webhook(seen.headers, seen.body, old).task.id == task.id
    assert verify_webhook(seen.headers, seen.body, new).task.id == task.id


def test_signatures_match_the_standard_webhooks_reference_implementation() -> None:
    secret = "whsec_" + base64.b64encode(b"reference secret bytes").decode()
    body = b'{"id":"a1b2","status":"done"}'
    now = int(time.time())
    reference = Webhook(secret).sign("msg_1", dt.datetime.fromtimestamp(now, dt.UTC), body.decode())
    assert sign(secret, "msg_1", now, body) == reference
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": f"v2,xyz {reference}",
    }
    assert verify_webhook(headers, body, secret).task.id == "a1b2"
    # The raw key works as well as its whsec_ form; an unpadded whsec_ value decodes the same.
    assert sign(base64.b64decode(secret.removeprefix("whsec_")), "msg_1", now, body) == reference
    assert sign(secret.rstrip("="), "msg_1", now, body) == reference
    with pytest.raises(ValueError, match="base64"):
        verify_webhook(headers, body, "whsec_not base64!")
    with pytest.raises(WebhookVerificationError, match="task payload"):
        verify_webhook({**headers, "webhook-signature": sign(secret, "msg_1", now, b"[1]")}, b"[1]", secret)
