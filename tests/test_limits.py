"""The documented request limits (textgen.limits, docs/limits.md) over HTTP: each holds at its edge and is a
400 naming the field one past it, refused before anything is validated item by item."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from textgen import idempotency, limits, protocol
from textgen.catalog import load_catalog
from textgen.protocol import TextGenRequest
from textgen.providers.local_output import plan_output
from textgen.settings import Settings
from textgen.structured import Budget, compile_schema, json_grammar
from textgen.webhooks import sender
from textgen.webhooks.sender import FairShare

CREATE = "/sse/text_generator/"
LIMITS_DOC = (Path(__file__).resolve().parents[1] / "docs" / "limits.md").read_text()
# The settings' defaults, as the docs state them.
SETTINGS: dict[str, Any] = {name: info.default for name, info in Settings.model_fields.items()}


def body(**overrides: Any) -> dict[str, Any]:
    return {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}], **overrides}


def declarations(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"name": f"f{i}"} for i in range(start, start + n)]


def nested(depth: int) -> dict[str, Any]:
    """A schema whose JSON nests ``depth`` objects (an ignored keyword holds the nesting)."""
    schema: dict[str, Any] = {}
    for _ in range(depth - 1):
        schema = {"x": schema}
    return {"type": "object", **schema} if schema else {"type": "object"}


@pytest.fixture
async def served(tmp_path: Path, models_file: Path) -> AsyncIterator[tuple[Server, Account]]:
    settings = make_settings(tmp_path, models_file=models_file)
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        yield server, await server.account(credits=1_000_000)


async def post(served: tuple[Server, Account], payload: dict[str, Any]) -> httpx.Response:
    server, account = served
    async with server.client(account) as client:
        return await client.post(CREATE, json=payload)


def user(text: str = "hi") -> dict[str, Any]:
    return {"role": "user", "content": text}


def parts(n: int) -> list[dict[str, Any]]:
    return [{"type": "text", "text": "p"} for _ in range(n)]


# (edge body, body one past the edge, the field the 400 names, words of the message)
CASES: list[Any] = [
    pytest.param(
        body(messages=[user()] * limits.MAX_MESSAGES),
        body(messages=[user()] * (limits.MAX_MESSAGES + 1)),
        "messages: at most 1000 messages, not 1001",
        id="messages",
    ),
    pytest.param(
        body(messages=[{"role": "user", "content": parts(400)}, {"role": "user", "content": parts(600)}]),
        body(messages=[{"role": "user", "content": parts(400)}, {"role": "user", "content": parts(601)}]),
        "messages: at most 1000 content parts in all messages, not 1001",
        id="content-parts",
    ),
    pytest.param(
        body(
            tools=[
                {"function_declarations": declarations(500)},
                {"function_declarations": declarations(12, 500)},
            ]
        ),
        body(
            tools=[
                {"function_declarations": declarations(500)},
                {"function_declarations": declarations(13, 500)},
            ]
        ),
        "tools: at most 512 function declarations in all tools (Gemini's limit), not 513",
        id="function-declarations",
    ),
    pytest.param(
        body(tools=[{"function_declarations": [{"name": "a:b.c-d_" + "e" * 56}]}]),
        body(tools=[{"function_declarations": [{"name": "a:b.c-d_" + "e" * 57}]}]),
        "tools[0].function_declarations[0].name",
        id="function-name-length",
    ),
    pytest.param(
        body(tools=[{"function_declarations": [{"name": "_ns:get.v2-x"}]}]),
        body(tools=[{"function_declarations": [{"name": "2get"}]}]),
        "tools[0].function_declarations[0].name",
        id="function-name-charset",
    ),
    pytest.param(
        body(config={"stop_sequences": ["a", "b", "c", "d", "e"]}),
        body(config={"stop_sequences": ["a", "b", "c", "d", "e", "f"]}),
        "config.stop_sequences",
        id="stop-sequences",
    ),
    pytest.param(
        body(config={"stop_sequences": ["s" * 128]}),
        body(config={"stop_sequences": ["s" * 129]}),
        "config.stop_sequences[0]",
        id="stop-sequence-length",
    ),
    pytest.param(
        body(config={"response_json_schema": nested(64)}),
        body(config={"response_json_schema": nested(65)}),
        "config.response_json_schema: nested deeper than 64 objects and arrays",
        id="schema-depth",
    ),
    pytest.param(
        body(config={"response_json_schema": {"enum": [0] * 9998}}),
        body(config={"response_json_schema": {"enum": [0] * 9999}}),
        "config.response_json_schema: more than 10000 values",
        id="schema-values",
    ),
    pytest.param(
        body(config={"response_json_schema": {"type": "integer", "minimum": -(10**20 - 1)}}),
        body(config={"response_json_schema": {"type": "integer", "minimum": -(10**20)}}),
        "config.response_json_schema: minimum has more than 20 digits before the decimal point",
        id="number-width",
    ),
    pytest.param(
        body(
            tools=[
                {
                    "function_declarations": [
                        {"name": "f", "parameters": {"type": "object", "maximum": 10**20 - 1}}
                    ]
                }
            ]
        ),
        body(
            tools=[
                {"function_declarations": [{"name": "f", "parameters": {"type": "object", "maximum": 1e20}}]}
            ]
        ),
        "tools[0].function_declarations[0].parameters: maximum has more than 20 digits",
        id="parameters-number-width",
    ),
]


@pytest.mark.parametrize(("edge", "past", "named"), CASES)
async def test_limit_holds_at_its_edge_and_one_past_it_is_a_400(
    served: tuple[Server, Account], edge: dict[str, Any], past: dict[str, Any], named: str
) -> None:
    accepted = await post(served, edge)
    assert accepted.status_code == 201, accepted.text
    refused = await post(served, past)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"].startswith(named), refused.json()


async def test_thousand_digit_bounds_are_a_400_not_a_500(served: tuple[Server, Account]) -> None:
    for kind in ("integer", "number"):
        schema = {"type": kind, "minimum": int("1" + "7" * 999), "maximum": int("8" * 1000)}
        response = await post(served, body(config={"response_json_schema": schema}))
        assert response.status_code == 400, response.text
        assert "minimum has more than 20 digits" in response.json()["error"]


def test_bounds_at_the_width_limit_make_a_small_grammar() -> None:
    # The widest bounds allowed, with digits that need every kind of alternative: the grammar stays small.
    lo, hi = -(10**20 - 1), 98765432109876543210
    for kind in ("integer", "number"):
        grammar = json_grammar(compile_schema({"type": kind, "minimum": lo, "maximum": hi}))
        assert len(grammar) < 64 * 1024, len(grammar)


async def test_a_duplicate_among_the_most_declarations_is_named(served: tuple[Server, Account]) -> None:
    names = [*declarations(limits.MAX_FUNCTION_DECLARATIONS - 1), {"name": "f7"}]
    response = await post(served, body(tools=[{"function_declarations": names}]))
    assert response.status_code == 400, response.text
    assert response.json()["error"].endswith("tools: function 'f7' is declared more than once")


async def test_allowed_function_names_are_bounded(served: tuple[Server, Account]) -> None:
    tools = [{"function_declarations": declarations(2)}]
    config = {"mode": "ANY", "allowed_function_names": ["f0"] * (limits.MAX_FUNCTION_DECLARATIONS + 1)}
    response = await post(served, body(tools=tools, tool_config={"function_calling_config": config}))
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("tool_config.function_calling_config.allowed_function_names")


LOCAL = "smollm2-135m-instruct"


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[tuple[Server, Account]]:
    """The embedded model, in this process (so the limits can be patched), without a worker: a request it
    admits is a pending task."""
    async with run_server(make_settings(tmp_path, local_model_instances=1), run_worker=False) as server:
        yield server, await server.account(credits=1_000_000)


def local_body(schema: dict[str, Any]) -> dict[str, Any]:
    return body(model_name=LOCAL, config={"response_json_schema": schema})


def grammar_bytes(payload: dict[str, Any]) -> int:
    """The grammar budget a request spends, as the embedded model's check counts it."""
    budget = Budget(size=2**62)
    plan_output(TextGenRequest.model_validate_json(json.dumps(payload)), budget)
    return budget.used


async def test_the_grammar_size_budget_holds_at_its_edge_and_one_past_it_is_a_400(
    local: tuple[Server, Account], monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string"} for i in range(20)},
        "required": ["p0"],
    }
    payload = local_body(schema)
    size = grammar_bytes(payload)
    assert 1000 < size < limits.MAX_GRAMMAR_BYTES, size
    monkeypatch.setattr(limits, "MAX_GRAMMAR_BYTES", size)
    accepted = await post(local, payload)
    assert accepted.status_code == 201, accepted.text
    monkeypatch.setattr(limits, "MAX_GRAMMAR_BYTES", size - 1)
    refused = await post(local, payload)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == (
        f"config.response_json_schema: its grammar is larger than the limit of {size - 1} bytes"
    )


async def test_a_grammar_that_takes_longer_than_its_time_budget_is_a_400(
    local: tuple[Server, Account], monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = local_body({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert (await post(local, payload)).status_code == 201
    # No time at all: the deadline has passed by the grammar's first rule, whatever the machine's speed.
    monkeypatch.setattr(limits, "GRAMMAR_BUILD_SECONDS", 0.0)
    refused = await post(local, payload)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == (
        "config.response_json_schema: building its grammar took longer than the limit of 0 s"
    )
    server, account = local
    async with server.client(account) as client:
        tasks = (await client.get(CREATE)).json()["results"]
    assert len(tasks) == 1, "the refused request left no task"


async def test_min_items_holds_at_the_array_limit_and_one_past_it_is_a_400(
    local: tuple[Server, Account],
) -> None:
    def array(min_items: int) -> dict[str, Any]:
        return local_body({"type": "array", "items": {"type": "integer"}, "minItems": min_items})

    accepted = await post(local, array(limits.MAX_ARRAY_ITEMS))
    assert accepted.status_code == 201, accepted.text
    refused = await post(local, array(limits.MAX_ARRAY_ITEMS + 1))
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == (
        f"config.response_json_schema: minItems {limits.MAX_ARRAY_ITEMS + 1} is more than the "
        f"{limits.MAX_ARRAY_ITEMS} items the local model can generate"
    )


def test_docs_state_every_limit() -> None:
    # (value, phrase): a list, not a dict, since several limits share a value.
    stated: list[tuple[object, str]] = [
        (limits.MAX_STOP_SEQUENCES, "| `config.stop_sequences` | at most {:,} |"),
        (limits.MAX_FUNCTION_DECLARATIONS, "in all `tools` together | at most {:,} |"),
        (
            limits.MAX_FUNCTION_NAME_LENGTH,
            "| 1 to {} characters; starts with a letter or `_`; then letters, digits, `_`, `.`, `:`, `-`",
        ),
        (limits.MAX_MESSAGES, "| `messages` | 1 to {:,} messages |"),
        (limits.MAX_CONTENT_PARTS, "| at most {:,} in all messages together |"),
        (
            limits.MAX_FUNCTION_DECLARATIONS,
            "| `tools` | at most {:,} (each holds at least one declaration) |",
        ),
        (limits.MAX_STOP_SEQUENCE_LENGTH, "| each of `config.stop_sequences` | 1 to {:,} characters |"),
        (limits.MAX_SCHEMA_DEPTH, "nested at most {:,} objects and arrays deep"),
        (limits.MAX_SCHEMA_VALUES, "at most {:,} JSON values"),
        (limits.MAX_NUMBER_DIGITS, "at most {} digits before the decimal point"),
        (limits.MAX_ARRAY_ITEMS, "array items generated | at most {:,}"),
        (limits.MAX_GRAMMAR_BYTES // 1024, "and {} KiB of grammar"),
        (limits.MAX_EXAMINED_ERRORS, "examines at most its first {} errors"),
        (limits.MAX_DESCRIBED_ERRORS, "names the first {}"),
        (limits.MAX_LIST_PAGE_BYTES // 1024 // 1024, "| a page of the task list | at most {} MiB of JSON"),
        (limits.LOCAL_MAX_SCORED_FUNCTIONS, "| callable functions under `AUTO` / `VALIDATED` | at most {} "),
        # Lengths of names and ids.
        (
            limits.MAX_CALL_ID_LENGTH,
            "| `function_call.id`, `function_response.id` | at most {:,} characters |",
        ),
        (
            limits.MAX_FUNCTION_NAME_LENGTH,
            "| `function_call.name`, `function_response.name` | at most {:,} characters |",
        ),
        (limits.MAX_MODEL_NAME_LENGTH, "| `model_name` | at most {:,} characters |"),
        (protocol.MAX_URL_LENGTH, "| `webhook_url` | at most {:,} characters |"),
        (idempotency.MAX_KEY_LENGTH, "| `Idempotency-Key` header | 1 to {:,} characters |"),
        (SETTINGS["list_max_limit"], "| `?limit=` of the task list | 1 to {:,} (`TEXTGEN_LIST_MAX_LIMIT`) |"),
        # Accounts.
        (limits.MAX_RATE_LIMIT, "| an account's rate limit | 1 to {:,} requests per minute"),
        (SETTINGS["default_rate_limit"], "new accounts get `TEXTGEN_DEFAULT_RATE_LIMIT` ({})"),
        (limits.MAX_CREDITS, "a finite number of at most {:,.0f} credits in size"),
        (SETTINGS["default_credits"], "`TEXTGEN_DEFAULT_CREDITS` ({:g}) must be one too"),
        # Tasks and webhooks.
        (SETTINGS["task_max_attempts"], "A queued task runs at most `TEXTGEN_TASK_MAX_ATTEMPTS` ({}) times"),
        (SETTINGS["task_max_attempts"] + 1, "claimed {} times and never finished"),
        (SETTINGS["webhook_refused_ports"], "by default {} (a 400 naming the port)"),
        (
            SETTINGS["webhook_max_redeliveries"],
            "at most `TEXTGEN_WEBHOOK_MAX_REDELIVERIES` ({}) per task; 409 past it",
        ),
        (
            SETTINGS["webhook_concurrency"],
            "| attempts in flight, per process | `TEXTGEN_WEBHOOK_CONCURRENCY` ({});",
        ),
        (SETTINGS["webhook_timeout_seconds"], "| one attempt | `TEXTGEN_WEBHOOK_TIMEOUT_SECONDS` ({:g} s)"),
        (sender.MAX_RESPONSE_BYTES // 1024, "at most {} KiB of the receiver's answer is read"),
        # Time, memory and authentication.
        (SETTINGS["generation_timeout_seconds"], "`TEXTGEN_GENERATION_TIMEOUT_SECONDS` ({:g} s)"),
        (
            SETTINGS["request_bodies_budget_bytes"] // 1024 // 1024,
            "`TEXTGEN_REQUEST_BODIES_BUDGET_BYTES` ({} MiB)",
        ),
        (
            SETTINGS["max_body_bytes"] // 1024 // 1024,
            "| request body | {} MiB (`TEXTGEN_MAX_BODY_BYTES`, 413 above)",
        ),
        (
            SETTINGS["auth_failures_per_minute"],
            "`TEXTGEN_AUTH_FAILURES_PER_MINUTE` ({}) failed authentications",
        ),
    ]
    share = FairShare.of(SETTINGS["webhook_concurrency"])
    stated += [
        (share.per_destination, "holds at most a quarter of them ({} of {})"),
        (share.per_account, "one account at most half ({} of {})"),
    ]
    # Each model's output limits: the built-in catalog's, one row per provider.
    catalog = load_catalog()
    rows = {"local": "| `smollm2-135m-instruct` (the embedded model) |", "gemini": "| the Gemini models |"}
    assert {spec.provider for spec in catalog.values()} == set(rows)
    for provider, row in rows.items():
        figures = {
            (s.max_output_tokens, s.default_output_tokens) for s in catalog.values() if s.provider == provider
        }
        assert len(figures) == 1, (provider, figures)
        most, default = figures.pop()
        stated.append((most, row + " at most {:,} | " + f"{default:,} |"))
    doc = " ".join(LIMITS_DOC.split())  # phrases may be wrapped
    for value, phrase in stated:
        wanted = phrase.format(value, SETTINGS["webhook_concurrency"])
        assert wanted in doc, wanted
    assert f"{limits.GRAMMAR_BUILD_SECONDS:g} s and" in LIMITS_DOC
    assert f"| scoring those functions | {limits.LOCAL_SCORING_SECONDS:g} s;" in LIMITS_DOC


class _BrokenCheck(FakeProvider):
    def check(self, spec: Any, request: Any) -> None:
        raise RecursionError("maximum recursion depth exceeded")


async def test_a_check_that_fails_inside_is_a_logged_503_not_a_500(
    tmp_path: Path, models_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, models_file=models_file)
    async with run_server(settings, {"fake": _BrokenCheck()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            response = await client.post(CREATE, json=body())
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert "fake-model" in response.json()["error"]
            tasks = (await client.get(CREATE)).json()["results"]
    assert tasks == []
    assert any("RecursionError" in (r.exc_text or "") for r in caplog.records), caplog.text


async def test_a_list_page_ends_before_its_json_passes_the_byte_limit(
    served: tuple[Server, Account], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_LIST_PAGE_BYTES", 50_000)
    server, account = served
    async with server.client(account) as client:
        ids = []
        for size in (20_000, 20_000, 20_000, 20_000, 20_000, 60_000):
            created = await client.post(CREATE, json=body(messages=[user("x" * size)]))
            assert created.status_code == 201, created.text
            ids.insert(0, created.json()["id"])  # newest first
        pages = []
        url: str | None = f"{CREATE}?limit=5"
        while url:
            response = await client.get(url)
            assert response.status_code == 200, response.text
            assert len(response.content) <= 60_000 + 1_000
            page = response.json()
            pages.append([task["id"] for task in page["results"]])
            url = page["next"]
        # The 60 KB task is a page by itself; then two 20 KB tasks fit in 50 KB, a third would not.
        assert pages == [ids[:1], ids[1:3], ids[3:5], ids[5:]]
        # Back from the third page: the two tasks nearest it.
        third = (await client.get(f"{CREATE}?limit=5")).json()
        third = (await client.get(third["next"])).json()
        third = (await client.get(third["next"])).json()
        back = (await client.get(third["previous"])).json()
        assert [task["id"] for task in back["results"]] == ids[1:3]
        assert back["previous"] is not None and back["next"] is not None


def nested_any_of(levels: int) -> dict[str, Any]:
    """``anyOf`` nested ``levels`` deep, with keywords beside each that apply to every branch."""
    schema: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 9}
    for i in range(levels):
        schema = {
            "anyOf": [schema, {"type": "object", "properties": {f"p{i}": {"type": "string"}}}],
            "type": ["integer", "object", "null"],
            "minimum": 1,
            "description": f"level {i}",
        }
    return schema


def test_nested_any_of_costs_work_linear_in_its_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each level used to double the work; count the schema nodes rewritten and converted instead of timing it.
    from textgen import structured

    counted = {"shape": 0, "visit": 0}

    def counting(name: str, real: Any) -> Any:
        def wrapper(self: Any, *args: Any) -> Any:
            counted[name] += 1
            return real(self, *args)

        return wrapper

    monkeypatch.setattr(structured._Normaliser, "_shape", counting("shape", structured._Normaliser._shape))
    monkeypatch.setattr(structured._Converter, "visit", counting("visit", structured._Converter.visit))
    work = []
    for levels in (6, 12, 18, 24):
        counted.update(shape=0, visit=0)
        json_grammar(compile_schema(nested_any_of(levels)))
        work.append((counted["shape"], counted["visit"]))
    steps = {(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(work)}
    assert len(steps) == 1, work  # the same work for every six more levels
