"""Property-based fuzzing of the HTTP API from its OpenAPI documents (ours and the contract we implement).

Every generated request (valid and invalid) is sent with real credentials to a live service whose models
answer from the fake model or the fake Gemini upstream; every response must be a documented status with a
body that matches the schema, and never a 5xx.
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.reliability.conftest import PLENTY, LiveService, assert_books_balance
from textgen.protocol import TextGenConfig

REPO = Path(__file__).resolve().parents[2]
SHARED_SPEC = REPO.parent / "shared" / "spec" / "openapi-text-generator.yaml"
CASES = 500
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    ignored_auth,
]
# Generated model names are almost never real; these steer part of the cases into actual generation.
MODELS = [
    None,
    "fake-model",
    "gemini-2.5-flash",
    "gemini-2.5-flash",
    "gemini-3-flash-preview",
    "fake-model",  # the fuzzed service runs no embedded model
]

pytestmark = [
    pytest.mark.timeout(600),
    # Schemathesis draws from `random` inside some strategies (its own business, not this suite's).
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning"
    ),
]


def steer(case: Case, model: str | None, webhook_url: str) -> None:
    """Point part of the cases at real models; keep every webhook on loopback (no traffic leaves)."""
    body = case.body
    if not isinstance(body, dict):
        return
    if model is not None and isinstance(body.get("model_name"), str):
        body["model_name"] = model
    hook = body.get("webhook_url")
    if isinstance(hook, str) and "//" in hook:
        body["webhook_url"] = webhook_url


def repair(case: Case) -> None:
    """Make a valid-per-schema body pass the rules a schema cannot state (a message needs content, a
    function call comes from the model), so that generation itself is fuzzed, not only validation."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return
    messages = [m for m in body["messages"] if isinstance(m, dict)] or [{}]
    for message in messages:
        for key in set(message) - {"role", "content", "function_call", "function_response"}:
            del message[key]
        for key, allowed in (
            ("function_call", {"name", "args"}),
            ("function_response", {"name", "response"}),
        ):
            if isinstance(message.get(key), dict):
                message[key] = {k: v for k, v in message[key].items() if k in allowed}
        if isinstance(message.get("function_call"), dict):
            message["role"] = "model"
            message.pop("function_response", None)
        elif isinstance(message.get("function_response"), dict) or message.get("role") not in (
            "user",
            "model",
        ):
            message["role"] = "user"
        content = message.get("content")
        if isinstance(content, list):
            content = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if not content or not isinstance(content, str | list):
            content = "hi"
        message["content"] = content
    body["messages"] = messages
    if isinstance(body.get("config"), dict):
        body["config"] = {k: v for k, v in body["config"].items() if _valid_config({k: v})}
    for key in set(body) - {"model_name", "messages", "system_instruction", "config", "sync", "webhook_url"}:
        del body[key]  # tools are fuzzed by the unrepaired cases


def _valid_config(config: dict[str, Any]) -> bool:
    try:
        TextGenConfig.model_validate(config)
    except ValueError:
        return False
    return True


def fuzz(schema: schemathesis.BaseSchema, service: LiveService, cases: int) -> Counter[int]:
    """Send ``cases`` generated requests, valid and invalid, validating each response; count the statuses."""
    statuses: Counter[int] = Counter()
    session = requests.Session()
    # Half the cases are valid per schema and repaired, so that a fair share reaches generation.
    strategy = st.one_of(
        st.tuples(schema.as_strategy(GenerationMode.POSITIVE), st.just(True)),
        st.tuples(schema.as_strategy(GenerationMode.POSITIVE), st.just(False)),
        st.tuples(schema.as_strategy(GenerationMode.NEGATIVE), st.just(False)),
        st.tuples(schema.as_strategy(GenerationMode.POSITIVE), st.just(True)),
    )

    @settings(
        max_examples=cases,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(generated=strategy, model=st.sampled_from(MODELS))
    def run(generated: tuple[Case, bool], model: str | None) -> None:
        case, repaired = generated
        # Strategies may hand out shared objects; edits must not leak into later draws.
        case.body = copy.deepcopy(case.body)
        if repaired:
            repair(case)
        steer(case, model, service.webhook_url)
        response = case.call_and_validate(
            base_url=service.url, session=session, headers=service.headers, checks=CHECKS, timeout=60
        )
        statuses[response.status_code] += 1

    try:
        run()
    finally:
        session.close()
    return statuses


def assert_meaningful(statuses: Counter[int]) -> None:
    """The run counts only if it sent enough cases and a fair share got past validation into generation."""
    assert statuses.total() >= CASES, statuses
    assert statuses[201] >= 10, statuses  # tasks were created, not only refused
    assert statuses[429] == 0 and statuses[402] == 0, statuses  # limits never made the run meaningless


def own_schema(service: LiveService) -> schemathesis.BaseSchema:
    document = requests.get(f"{service.url}/openapi.json", timeout=10).json()
    return schemathesis.openapi.from_dict(document)


def test_own_openapi_document_holds_under_fuzzing(live_service: LiveService) -> None:
    schema = own_schema(live_service)
    # Every operation, then the two that create tasks (where nearly all the logic is) once more.
    statuses = fuzz(schema, live_service, CASES // 2)
    creating = schema.include(method="POST", path=["/sse/text_generator/", "/sse/text_generator/stream/"])
    statuses += fuzz(creating, live_service, CASES // 2)
    assert_meaningful(statuses)
    _settled(live_service)


def test_contract_holds_under_fuzzing(live_service: LiveService) -> None:
    if not SHARED_SPEC.is_file():
        pytest.fail(f"the contract is expected at {SHARED_SPEC} (shared/ beside the repository)")
    schema = schemathesis.openapi.from_path(str(SHARED_SPEC))
    assert_meaningful(fuzz(schema, live_service, CASES))
    _settled(live_service)


def _settled(service: LiveService) -> None:
    """After the storm, every async task the fuzzing created finishes and the books still balance."""
    service.loop.run(_wait_terminal(service), timeout=120)
    service.loop.run(assert_books_balance(service.server.services, service.account, PLENTY))


async def _wait_terminal(service: LiveService) -> None:
    store = service.server.services.storage
    for _ in range(1200):
        counts = await store.tasks.counts()
        if not counts.get("pending") and not counts.get("running"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"tasks never finished: {counts}")
