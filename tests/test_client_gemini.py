"""The Python client with a Gemini model (the fake upstream speaking the recorded wire format): function calls
in sync and streamed answers, replayed with their thought signatures, and a streamed text answer."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.test_gemini import WEATHER_TOOLS, fake_gemini, gemini_service
from textgen_client import AsyncClient, FunctionCall, StreamEnd, TextDelta, function_response

MODEL = "gemini-3-flash-preview"


async def test_function_call_round_trip_sync_and_streamed(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account()
        async with AsyncClient(account.api_id, account.api_key, base_url=server.url) as client:
            question = {"role": "user", "content": "What is the weather in Paris?"}
            asked = await client.generate(MODEL, [question], tools=WEATHER_TOOLS)
            assert asked.status == "done" and len(asked.function_calls) == 1
            call = asked.function_calls[0]
            assert call.name == "get_weather" and isinstance(call.args.get("location"), str)
            assert call.thought_signature  # Gemini 3 refuses a replayed call without it

            answered = await client.generate(
                MODEL,
                [question, call.to_message(), function_response("get_weather", {"temperature_c": 21})],
                tools=WEATHER_TOOLS,
            )
            assert answered.status == "done" and '"temperature_c": 21' in answered.response_text
            replayed = fake.last.body["contents"][1]["parts"][0]
            sent = base64.urlsafe_b64decode(replayed["thoughtSignature"])
            assert sent == base64.b64decode(call.thought_signature) and sent in fake.issued_signatures

            events = [e async for e in client.stream(MODEL, [question], tools=WEATHER_TOOLS)]
            calls = [e for e in events if isinstance(e, FunctionCall)]
            assert [c.name for c in calls] == ["get_weather"] and calls[0].thought_signature
            end = events[-1]
            assert isinstance(end, StreamEnd) and end.function_calls == tuple(calls) and end.text == ""
            stored = await client.get(end.task_id)
            assert stored.function_calls[0].name == "get_weather"
            # The stream relays Gemini's chunk as sent; the task keeps the standard alphabet. Either decodes alike.
            signature = calls[0].thought_signature
            stored_signature = stored.function_calls[0].thought_signature
            assert signature and stored_signature
            assert base64.urlsafe_b64decode(signature) == base64.b64decode(stored_signature)
            # Either form replays.
            for replay in (calls[0], stored.function_calls[0]):
                follow_up = await client.generate(
                    MODEL,
                    [question, replay.to_message(), function_response("get_weather", {"temperature_c": 9})],
                    tools=WEATHER_TOOLS,
                )
                assert follow_up.status == "done", follow_up.failed_reason
                assert '"temperature_c": 9' in follow_up.response_text


async def test_streamed_text_from_gemini_ends_with_the_task_and_its_charge(tmp_path: Path) -> None:
    async with fake_gemini(chunks=6) as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=50)
        async with AsyncClient(account.api_id, account.api_key, base_url=server.url) as client:
            before = await client.remaining_credits()
            stream = client.stream(MODEL, "Write a short tagline for an AI video tool.")
            deltas = [e.text async for e in stream if isinstance(e, TextDelta)]
            assert stream.end is not None and len(deltas) >= 2
            assert "".join(deltas) == stream.end.text == fake.reply_text
            assert stream.end.finish_reason == "STOP" and stream.end.output_tokens > 0
            task = await client.get(stream.end.task_id)
            assert task.status == "done" and task.response_text == fake.reply_text
            after = await client.remaining_credits()
            assert before - after == pytest.approx(stream.end.credits_used, abs=1e-6)
            assert stream.end.credits_used == pytest.approx(task.credits_used)
