"""Hostile requests from an ordinary account: each is refused cheaply with a 4xx, never a 5xx."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import run_server
from tests.fakes.providers import FakeProvider
from tests.reliability.conftest import reliability_settings
from textgen import limits
from textgen.http import errors
from textgen.protocol import TextGenRequest

CREATE = "/sse/text_generator/"


def _cursor(stamp: str, task_id: str = "00000000-0000-0000-0000-000000000000") -> str:
    return "n:" + base64.urlsafe_b64encode(f"{stamp}|{task_id}".encode()).decode().rstrip("=")


async def test_thousands_of_invalid_parts_are_refused_by_counting_from_an_account_without_credits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    examined: list[tuple[object, ...]] = []
    real_loc = errors._loc

    def counting_loc(parts: tuple[object, ...], enclosing: set[str] | None = None) -> str:
        examined.append(parts)
        return real_loc(parts, enclosing)

    monkeypatch.setattr(errors, "_loc", counting_loc)
    settings = reliability_settings(tmp_path, "http://127.0.0.1:9", max_body_bytes=1024 * 1024)
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        broke = await server.account(credits=0)
        async with server.client(broke) as client:
            # 12,000 parts: refused once counted, before any part is validated or any error described.
            parts = [{"type": "bogus", "text": "x"} for _ in range(12_000)]
            body = {"model_name": "fake-model", "messages": [{"role": "user", "content": parts}]}
            response = await client.post(CREATE, json=body)
            assert response.status_code == 400, response.text
            assert response.json() == {
                "error": f"messages: at most {limits.MAX_CONTENT_PARTS} content parts in all messages, not 12000"
            }
            assert examined == []
            # At the limit every part is validated, and only the first errors are examined and described.
            body["messages"] = [{"role": "user", "content": parts[: limits.MAX_CONTENT_PARTS]}]
            response = await client.post(CREATE, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error.startswith("messages[0].content[0]"), error
            not_shown = limits.MAX_CONTENT_PARTS - limits.MAX_DESCRIBED_ERRORS
            assert error.endswith(f"(and {not_shown} more)"), error
            assert len(examined) == limits.MAX_EXAMINED_ERRORS


def test_the_validation_filter_keeps_inner_errors_and_drops_their_enclosing_ones() -> None:
    with pytest.raises(ValidationError) as raised:
        TextGenRequest.model_validate_json(
            '{"model_name": "m", "messages": [{"role": "user", "content": [{"type": "bogus"}]}]}'
        )
    message = errors.describe_validation(raised.value)
    # The str branch of content's union ("messages[0].content: Input should be a valid string") is dropped:
    # an error inside the list branch says what is wrong.
    assert message.startswith("messages[0].content[0]"), message
    assert "messages[0].content:" not in message


async def test_cursor_outside_the_representable_range_is_a_400(tmp_path: Path) -> None:
    settings = reliability_settings(tmp_path, "http://127.0.0.1:9")
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        async with server.client(account) as client:
            for cursor in (
                _cursor("9999-12-31T23:59:59-05:00"),
                _cursor("0001-01-01T00:00:00+05:00"),
                _cursor("2026-01-01T00:00:00+00:00", "x" * 65),
            ):
                response = await client.get(CREATE, params={"cursor": cursor})
                assert response.status_code == 400, (cursor, response.text)
                assert response.json() == {"error": "cursor: invalid pagination cursor"}
            # The edge of the range is an ordinary (empty) page, and the connection is still usable.
            response = await client.get(CREATE, params={"cursor": _cursor("9999-12-31T23:59:59+00:00")})
            assert response.status_code == 200, response.text
            assert (await client.get("/healthz")).status_code == 200


async def test_megabyte_stop_sequences_are_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    settings = reliability_settings(tmp_path, "http://127.0.0.1:9")
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        async with server.client(account) as client:
            stops = [chr(ord("a") + i) * 1024 * 1024 for i in range(16)]
            body = {
                "model_name": "fake-model",
                "messages": [{"role": "user", "content": "hi"}],
                "config": {"stop_sequences": stops},
            }
            response = await client.post(CREATE, json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"].startswith("config.stop_sequences"), response.json()
            body["config"]["stop_sequences"] = [s[: limits.MAX_STOP_SEQUENCE_LENGTH] for s in stops[:5]]
            assert (await client.post(CREATE, json=body)).status_code == 201
            [task] = (await client.get(CREATE)).json()["results"]
        # What is stored for a task with the most stop sequences: their bytes are bounded by the limits.
        stored = server.services.tasks.stored_request(TextGenRequest.model_validate_json(json.dumps(body)))
        assert len(json.dumps(stored["config"]["stop_sequences"])) <= 5 * (
            limits.MAX_STOP_SEQUENCE_LENGTH + 4
        )
        assert task["config"]["stop_sequences"] == body["config"]["stop_sequences"]
