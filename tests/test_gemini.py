"""Gemini models through the service, against a fake upstream that speaks the real wire format."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from tests.conftest import Server, free_socket, make_settings, run_server, serve_app
from tests.fakes.fake_gemini import FakeGemini, Fault
from textgen.providers.gemini import GeminiProvider
from textgen.settings import Settings

PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
# Retries compressed so that the fault tests stay fast; the policy is the same.
FAST_RETRIES: dict[str, Any] = {
    "gemini_retry_initial_delay_seconds": 0.01,
    "gemini_retry_max_delay_seconds": 0.05,
    "gemini_max_attempts": 3,
    "gemini_retry_budget_seconds": 10.0,
    "gemini_file_poll_seconds": 0.01,
}


def gemini_settings(tmp_path: Path, url: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "gemini_api_key": "test-key",
        "gemini_base_url": url,
        **FAST_RETRIES,
        **overrides,
    }
    return make_settings(tmp_path, **values)


@asynccontextmanager
async def fake_gemini(**kwargs: Any) -> AsyncIterator[tuple[FakeGemini, str]]:
    fake = FakeGemini(**kwargs)
    async with serve_app(fake.app) as url:
        yield fake, url


@asynccontextmanager
async def gemini_service(tmp_path: Path, url: str | None, **overrides: Any) -> AsyncIterator[Server]:
    settings = gemini_settings(tmp_path, url, **overrides)
    async with run_server(settings, {"gemini": GeminiProvider(settings)}) as server:
        yield server


def mp4(seconds: float, payload: int = 64) -> bytes:
    """A minimal MP4: ftyp, moov/mvhd with the duration, and an mdat of filler."""
    ftyp = struct.pack(">I4s4sI4s", 20, b"ftyp", b"isom", 0x200, b"isom")
    mvhd_body = struct.pack(">B3xIIII", 0, 0, 0, 1000, int(seconds * 1000)) + bytes(80)
    mvhd = struct.pack(">I4s", 8 + len(mvhd_body), b"mvhd") + mvhd_body
    moov = struct.pack(">I4s", 8 + len(mvhd), b"moov") + mvhd
    mdat = struct.pack(">I4s", 8 + payload, b"mdat") + bytes(payload)
    return ftyp + moov + mdat


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def parts_of(body: dict[str, Any], index: int = -1) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = body["contents"][index]["parts"]
    return parts


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


GUIDE_BODY: dict[str, Any] = {
    "model_name": "gemini-2.5-flash",
    "messages": [{"role": "user", "content": "Write a short tagline for an AI video tool."}],
    "system_instruction": "You are a creative marketing copywriter.",
    "config": {"temperature": 0.8, "max_output_tokens": 256},
}
WEATHER_TOOLS: list[dict[str, Any]] = [
    {
        "function_declarations": [
            {
                "name": "get_weather",
                "description": "Get the current weather for a given location.",
                "parameters": {
                    "type": "object",
                    "properties": {"location": {"type": "string", "description": "City name"}},
                    "required": ["location"],
                },
            }
        ]
    }
]


async def balance(server: Server, account: Any) -> float:
    async with server.client(account) as client:
        value: float = (await client.get("/api/remaining_credits/")).json()["remaining_credits"]
        return value


async def create(server: Server, account: Any, body: dict[str, Any]) -> dict[str, Any]:
    async with server.client(account) as client:
        response = await client.post("/sse/text_generator/", json=body)
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


# -- the guide's examples --------------------------------------------------------------------------------


async def test_sync_example_reaches_gemini_and_settles_credits(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        fake.thoughts_tokens = 11
        account = await server.account(credits=10)
        task = await create(server, account, {**GUIDE_BODY, "sync": True})
        assert task["status"] == "done", task
        assert task["response_text"] == fake.reply_text
        assert task["response_function_calls"] == []
        received = fake.last
        assert received.model == "gemini-2.5-flash"
        assert not received.stream
        assert received.headers["x-goog-api-key"] == "test-key"
        assert received.body["systemInstruction"]["parts"] == [{"text": GUIDE_BODY["system_instruction"]}]
        assert received.body["contents"] == [
            {"role": "user", "parts": [{"text": "Write a short tagline for an AI video tool."}]}
        ]
        assert received.body["generationConfig"] == {"temperature": 0.8, "maxOutputTokens": 256}
        # Thinking is billed as output: candidates (9 words) + thoughts (11).
        assert task["output_tokens"] == len(fake.reply_text.split()) + 11
        assert task["input_tokens"] > 0
        assert task["credits_used"] > 0
        assert abs(await balance(server, account) - (10 - task["credits_used"])) < 1e-9


async def test_async_example_every_config_field_reaches_gemini(tmp_path: Path) -> None:
    config = {
        "temperature": 1.3,
        "top_p": 0.9,
        "top_k": 17,
        "max_output_tokens": 300,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "seed": 42,
        "stop_sequences": ["END", "STOP!"],
        "response_mime_type": "text/plain",
    }
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account()
        created = await create(server, account, {**GUIDE_BODY, "config": config})
        assert created["status"] == "pending"
        done = await server.wait_for(account, created["id"])
        assert done["status"] == "done", done
        assert done["response_text"] == fake.reply_text
        assert fake.last.body["generationConfig"] == {
            "temperature": 1.3,
            "topP": 0.9,
            "topK": 17,
            "maxOutputTokens": 300,
            "presencePenalty": 0.5,
            "frequencyPenalty": -0.25,
            "seed": 42,
            "stopSequences": ["END", "STOP!"],
            "responseMimeType": "text/plain",
        }


async def test_multi_turn_history_keeps_roles_and_order(tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello! How can I help?"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Two."}],
        },
    ]
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account()
        task = await create(
            server, account, {"model_name": "gemini-2.5-pro", "messages": messages, "sync": True}
        )
        assert task["status"] == "done", task
        assert fake.last.model == "gemini-2.5-pro"
        assert fake.last.body["contents"] == [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello! How can I help?"}]},
            {"role": "user", "parts": [{"text": "Part one."}, {"text": "Two."}]},
        ]
        assert "systemInstruction" not in fake.last.body
        assert "tools" not in fake.last.body


async def test_image_example_sends_inline_data(tmp_path: Path) -> None:
    body = {
        "model_name": "gemini-2.5-flash",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "data": PNG_1X1, "mime_type": "image/png"},
                    {"type": "text", "text": "Describe what you see in this image."},
                ],
            }
        ],
        "sync": True,
    }
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account()
        task = await create(server, account, body)
        assert task["status"] == "done", task
        parts = parts_of(fake.last.body)
        assert parts[0]["inlineData"]["mimeType"] == "image/png"
        assert parts[1] == {"text": "Describe what you see in this image."}
        assert fake.last.inline_data == [("image/png", base64.b64decode(PNG_1X1))]


async def test_image_type_gemini_does_not_take_is_refused_with_the_part_index(tmp_path: Path) -> None:
    gif = b64(
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,"
        b"\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )
    body = {
        "model_name": "gemini-2.5-flash",
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "model", "content": "ok"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "x"},
                    {"type": "image", "data": gif, "mime_type": "image/gif"},
                ],
            },
        ],
    }
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=5)
        async with server.client(account) as client:
            response = await client.post("/sse/text_generator/", json=body)
        assert response.status_code == 400
        assert "messages[2].content[1]" in response.json()["error"]
        assert "image/gif" in response.json()["error"]
        assert fake.generate_requests == []
        assert await balance(server, account) == 5


async def test_more_than_gemini_takes_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """Gemini takes at most 5 stop sequences and 512 function declarations (a 400 from it otherwise)."""
    many_tools = [{"function_declarations": [{"name": f"tool_{i}"} for i in range(513)]}]
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=5)
        async with server.client(account) as client:
            stops = await client.post(
                "/sse/text_generator/",
                json={**GUIDE_BODY, "config": {"max_output_tokens": 64, "stop_sequences": list("abcdef")}},
            )
            tools = await client.post("/sse/text_generator/", json={**GUIDE_BODY, "tools": many_tools})
        assert stops.status_code == 400
        assert stops.json()["error"].startswith("config.stop_sequences: ")
        assert tools.status_code == 400
        assert tools.json()["error"].startswith("tools: at most 512 function declarations")
        assert fake.generate_requests == []
        assert await balance(server, account) == 5
        five = await create(
            server,
            account,
            {
                **GUIDE_BODY,
                "config": {"max_output_tokens": 64, "stop_sequences": list("abcde")},
                "sync": True,
            },
        )
        assert five["status"] == "done", five
        assert fake.last.body["generationConfig"]["stopSequences"] == list("abcde")


async def test_function_calling_round_trip_keeps_the_thought_signature(tmp_path: Path) -> None:
    question = {"role": "user", "content": "What is the weather in San Francisco?"}
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account()
        first = await create(
            server,
            account,
            {
                "model_name": "gemini-3-flash-preview",
                "messages": [question],
                "tools": WEATHER_TOOLS,
                "tool_config": {"function_calling_config": {"mode": "AUTO"}},
                "sync": True,
            },
        )
        assert first["status"] == "done", first
        assert first["response_text"] == ""
        [call] = first["response_function_calls"]
        assert call["name"] == "get_weather"
        assert call["args"] == {"location": "San Francisco"}
        signature = call["thought_signature"]
        assert base64.b64decode(signature) in fake.issued_signatures
        sent = fake.last.body
        assert sent["tools"] == [
            {
                "functionDeclarations": [
                    {
                        "name": "get_weather",
                        "description": "Get the current weather for a given location.",
                        "parametersJsonSchema": WEATHER_TOOLS[0]["function_declarations"][0]["parameters"],
                    }
                ]
            }
        ]
        assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}

        follow_up: dict[str, Any] = {
            "model_name": "gemini-3-flash-preview",
            "messages": [
                question,
                {"role": "model", "function_call": call},
                {
                    "role": "user",
                    "function_response": {
                        "name": "get_weather",
                        "response": {"temperature": 62, "condition": "Foggy"},
                    },
                },
            ],
            "tools": WEATHER_TOOLS,
            "sync": True,
        }
        second = await create(server, account, follow_up)
        assert second["status"] == "done", second
        assert second["response_text"] == 'get_weather returned {"condition": "Foggy", "temperature": 62}'
        assert second["response_function_calls"] == []
        model_part, response_part = parts_of(fake.last.body, 1)[0], parts_of(fake.last.body, 2)[0]
        assert model_part["functionCall"] == {"name": "get_weather", "args": {"location": "San Francisco"}}
        assert base64.urlsafe_b64decode(model_part["thoughtSignature"]) == base64.b64decode(signature)
        assert response_part == {
            "functionResponse": {
                "name": "get_weather",
                "response": {"temperature": 62, "condition": "Foggy"},
            }
        }

        # A history that drops the signature is refused by Gemini 3; that 400 reaches the client unretried.
        start = await balance(server, account)
        requests_before = len(fake.generate_requests)
        unsigned = {k: v for k, v in call.items() if k != "thought_signature"}
        follow_up["messages"][1] = {"role": "model", "function_call": unsigned}
        third = await create(server, account, follow_up)
        assert third["status"] == "failed"
        assert "400 INVALID_ARGUMENT" in third["failed_reason"]
        assert "missing a thought_signature" in third["failed_reason"]
        assert len(fake.generate_requests) == requests_before + 1
        assert third["credits_used"] == 0
        assert await balance(server, account) == start


async def test_guide_function_response_follow_up(tmp_path: Path) -> None:
    body = {
        "model_name": "gemini-2.5-flash",
        "messages": [
            {"role": "user", "content": "What is the weather in San Francisco?"},
            {
                "role": "model",
                "function_call": {"name": "get_weather", "args": {"location": "San Francisco"}},
            },
            {
                "role": "user",
                "function_response": {
                    "name": "get_weather",
                    "response": {"temperature": 62, "condition": "Foggy"},
                },
            },
        ],
        "tools": WEATHER_TOOLS,
        "sync": True,
    }
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account()
        task = await create(server, account, body)
        assert task["status"] == "done", task
        assert "Foggy" in task["response_text"]
        assert task["response_function_calls"] == []
        assert parts_of(fake.last.body, 1) == [
            {"functionCall": {"name": "get_weather", "args": {"location": "San Francisco"}}}
        ]
        assert fake.last.body["contents"][1]["role"] == "model"


async def test_tool_config_modes_and_allowed_names_reach_gemini(tmp_path: Path) -> None:
    tools: list[dict[str, Any]] = [
        {
            "function_declarations": [
                {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
                {"name": "get_time", "description": "Current time."},
            ]
        },
        {"function_declarations": [{"name": "get_news"}]},
    ]
    question = [{"role": "user", "content": "What time is it?"}]
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account()
        modes: list[tuple[dict[str, Any], dict[str, Any]]] = [
            (
                {"mode": "VALIDATED", "allowed_function_names": ["get_time"]},
                {"mode": "VALIDATED", "allowedFunctionNames": ["get_time"]},
            ),
            (
                {"mode": "ANY", "allowed_function_names": ["get_news", "get_time"]},
                {"mode": "ANY", "allowedFunctionNames": ["get_news", "get_time"]},
            ),
            ({"mode": "NONE"}, {"mode": "NONE"}),
        ]
        for fcc, expected in modes:
            task = await create(
                server,
                account,
                {
                    "model_name": "gemini-2.5-flash",
                    "messages": question,
                    "tools": tools,
                    "tool_config": {"function_calling_config": fcc},
                    "sync": True,
                },
            )
            assert task["status"] == "done", task
            assert fake.last.body["toolConfig"] == {"functionCallingConfig": expected}
            if fcc["mode"] == "NONE":
                assert task["response_function_calls"] == []
            else:
                assert [c["name"] for c in task["response_function_calls"]] == [
                    fcc["allowed_function_names"][0]
                ]
        sent_tools = fake.last.body["tools"]
        # Gemini treats all declarations alike; the SDK sends them as one tool, in order.
        assert [[d["name"] for d in t["functionDeclarations"]] for t in sent_tools] == [
            ["get_weather", "get_time", "get_news"],
        ]
        assert sent_tools[0]["functionDeclarations"][1] == {
            "name": "get_time",
            "description": "Current time.",
        }
        assert (
            sent_tools[0]["functionDeclarations"][0]["parametersJsonSchema"]
            == tools[0]["function_declarations"][0]["parameters"]
        )


async def test_structured_output_sends_the_json_schema_and_returns_json(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "tagline": {"type": "string"},
            "score": {"type": "integer", "minimum": 1},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["tagline", "score", "tags"],
    }
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account()
        task = await create(
            server,
            account,
            {
                **GUIDE_BODY,
                "config": {"response_json_schema": schema},
                "sync": True,
            },
        )
        assert task["status"] == "done", task
        jsonschema.validate(json.loads(task["response_text"]), schema)
        assert fake.last.body["generationConfig"] == {
            "maxOutputTokens": 8192,  # the model's default output budget
            "responseMimeType": "application/json",
            "responseJsonSchema": schema,
        }


# -- the File API path for large videos ------------------------------------------------------------------


async def test_video_past_the_inline_limit_goes_through_the_file_api(tmp_path: Path) -> None:
    video = mp4(3.0, payload=4000)
    body = {
        "model_name": "gemini-2.5-flash",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video", "data": b64(video), "mime_type": "video/mp4"},
                    {"type": "image", "data": PNG_1X1, "mime_type": "image/png"},
                    {"type": "text", "text": "Summarise this video."},
                ],
            }
        ],
        "sync": True,
    }
    async with (
        fake_gemini() as (fake, url),
        gemini_service(tmp_path, url, gemini_inline_request_bytes=3000) as server,
    ):
        fake.file_polls_until_active = 2
        account = await server.account()
        task = await create(server, account, body)
        assert task["status"] == "done", task
        parts = parts_of(fake.last.body)
        assert parts[0]["fileData"]["mimeType"] == "video/mp4"
        file_id = parts[0]["fileData"]["fileUri"].rsplit("/", 1)[-1]
        assert "inlineData" in parts[1]  # the small image stays inline
        assert [kind for kind, fid in fake.file_requests if fid == file_id] == [
            "start",
            "upload",
            "get",
            "get",
            "get",
            "delete",
        ]
        assert fake.files == {}
        assert fake.deleted_files == [f"files/{file_id}"]


async def test_small_video_stays_inline(tmp_path: Path) -> None:
    video = mp4(1.0)
    body = {
        "model_name": "gemini-2.5-flash",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video", "data": b64(video), "mime_type": "video/quicktime"},
                ],
            }
        ],
        "sync": True,
    }
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account()
        task = await create(server, account, body)
        assert task["status"] == "done", task
        assert fake.last.inline_data == [("video/mov", video)]
        assert fake.file_requests == []


# -- upstream faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "attempts", "status", "reason"),
    [
        pytest.param([Fault(status=429, retry_delay="0.02s")] * 2, 3, "done", "", id="429-retried"),
        pytest.param([Fault(status=503)], 2, "done", "", id="503-retried"),
        pytest.param(
            [Fault(status=503, message="The model is overloaded.")] * 3,
            3,
            "failed",
            "Gemini answered 503 UNAVAILABLE: The model is overloaded. (gave up after 3 attempts)",
            id="503-gives-up",
        ),
        pytest.param(
            [Fault(status=429, message="Quota exceeded.", retry_delay="30s")],
            1,
            "failed",
            "Gemini answered 429 RESOURCE_EXHAUSTED: Quota exceeded. (gave up after 1 attempts: the next try "
            "would pass the 10 s retry budget)",
            id="429-retry-delay-past-budget",
        ),
        pytest.param(
            [Fault(status=400, message="Invalid value at 'generation_config.top_k'.")],
            1,
            "failed",
            "Gemini answered 400 INVALID_ARGUMENT: Invalid value at 'generation_config.top_k'.",
            id="400-not-retried",
        ),
        pytest.param(
            [Fault(status=500)] * 2 + [Fault(status=504)],
            3,
            "failed",
            "Gemini answered 504 DEADLINE_EXCEEDED: fake failure",
            id="5xx-gives-up",
        ),
        pytest.param(
            [Fault(block_reason="PROHIBITED_CONTENT")],
            1,
            "failed",
            "Gemini blocked the prompt (PROHIBITED_CONTENT)",
            id="blocked-prompt",
        ),
        pytest.param(
            [Fault(finish_reason="SAFETY")],
            1,
            "failed",
            "Gemini stopped the response with finish reason SAFETY: the response was flagged by Gemini's "
            "safety filters",
            id="finish-safety",
        ),
        pytest.param([Fault(finish_reason="MAX_TOKENS")], 1, "done", "", id="finish-max-tokens"),
    ],
)
async def test_upstream_faults_end_in_the_documented_state(
    tmp_path: Path, faults: list[Fault], attempts: int, status: str, reason: str
) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        for fault in faults:
            fake.add_fault(fault)
        account = await server.account(credits=10)
        created = await create(server, account, GUIDE_BODY)
        task = await server.wait_for(account, created["id"])
        assert task["status"] == status, task
        assert len(fake.generate_requests) == attempts
        if status == "failed":
            assert task["failed_reason"].startswith(reason), task["failed_reason"]
            # An answer Gemini stopped is billed by its usage; an error status, or a blocked prompt that
            # reports no usage (as recorded), is not.
            billed = bool(faults[-1].finish_reason)
            assert (task["credits_used"] > 0) == billed
            assert await balance(server, account) == pytest.approx(10 - task["credits_used"])
        else:
            assert task["response_text"] == fake.reply_text
            assert await balance(server, account) == pytest.approx(10 - task["credits_used"])


async def test_retry_after_header_is_honoured_as_well(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        fake.add_fault(Fault(status=429, retry_after="60"))
        account = await server.account(credits=10)
        task = await create(server, account, {**GUIDE_BODY, "sync": True})
        assert task["status"] == "failed"
        assert "429 RESOURCE_EXHAUSTED" in task["failed_reason"]
        assert "retry budget" in task["failed_reason"]
        assert len(fake.generate_requests) == 1


async def test_slow_upstream_times_out_and_releases_the_reservation(tmp_path: Path) -> None:
    async with (
        fake_gemini() as (fake, url),
        gemini_service(tmp_path, url, gemini_timeout_seconds=0.2, gemini_max_attempts=2) as server,
    ):
        fake.add_fault(Fault(delay=1.0))
        fake.add_fault(Fault(delay=1.0))
        account = await server.account(credits=10)
        task = await create(server, account, {**GUIDE_BODY, "sync": True})
        assert task["status"] == "failed"
        assert task["failed_reason"].startswith("Gemini did not answer in time")
        assert "gave up after 2 attempts" in task["failed_reason"]
        assert await balance(server, account) == 10


async def test_unreachable_upstream_fails_with_a_clear_reason(tmp_path: Path) -> None:
    sock = free_socket()  # bound but never listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with gemini_service(tmp_path, url) as server:
            account = await server.account(credits=10)
            task = await create(server, account, {**GUIDE_BODY, "sync": True})
            assert task["status"] == "failed"
            assert task["failed_reason"].startswith("could not reach Gemini")
            assert "gave up after 3 attempts" in task["failed_reason"]
            assert await balance(server, account) == 10
    finally:
        sock.close()


async def test_wrong_api_key_reaches_the_client(tmp_path: Path) -> None:
    async with fake_gemini(api_key="the-real-key") as (_, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=10)
        task = await create(server, account, {**GUIDE_BODY, "sync": True})
        assert task["status"] == "failed"
        assert "API key not valid" in task["failed_reason"]
        assert await balance(server, account) == 10


async def test_no_key_means_not_configured(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url, gemini_api_key=None) as server:
        account = await server.account(credits=10)
        async with server.client(account) as client:
            response = await client.post("/sse/text_generator/", json=GUIDE_BODY)
            assert response.status_code == 400
            assert "not configured on this server" in response.json()["error"]
            ready = (await client.get("/readyz")).json()
        assert ready["checks"]["providers"] == {"gemini": "not configured"}
        assert fake.generate_requests == []
        assert await balance(server, account) == 10


async def test_cancelling_a_running_gemini_task_closes_the_upstream_call(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        fake.faults.append(Fault(delay=4))  # the upstream holds the call: a cancel ends it sooner
        account = await server.account()
        created = await create(server, account, GUIDE_BODY)
        for _ in range(600):
            if fake.generate_requests:
                break
            await asyncio.sleep(0.05)
        assert fake.generate_requests, "the call never reached the upstream"
        async with server.client(account) as client:
            answer = await client.post(f"/sse/text_generator/{created['id']}/cancel/")
        task = answer.json()
        assert answer.status_code == 200 and task["status"] == "failed", task
        assert task["failed_reason"] == "cancelled" and task["output_tokens"] == 0
        assert len(fake.generate_requests) == 1  # closed, not retried
        summary = await server.services.storage.accounts.ledger_summary(account.id)
        assert summary.ledger_sum == summary.balance
