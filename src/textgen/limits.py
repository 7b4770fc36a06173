"""What one request may ask for, so that every check before admission, and every grammar built for the
embedded model, does bounded work. Each limit is a 400 naming the field; docs/limits.md lists them.

``check_request`` runs first, on the request as parsed JSON and before pydantic validates its items, so a
body with thousands of messages, parts, declarations or schema values is refused after counting them, not
after validating (and describing the errors of) each one. The walks are iterative and stop at the limit.
"""

from __future__ import annotations

import math
from typing import Any

from textgen.errors import BadRequest

# Gemini's own limits (docs/limits.md cites them).
MAX_STOP_SEQUENCES = 5
MAX_FUNCTION_DECLARATIONS = 512
MAX_FUNCTION_NAME_LENGTH = 64
# Starts with a letter or an underscore; letters, digits, underscores, dots, colons and dashes.
FUNCTION_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,63}$"

# textgen's own.
MAX_MESSAGES = 1_000
MAX_CONTENT_PARTS = 1_000  # in all messages together
MAX_STOP_SEQUENCE_LENGTH = 128  # characters
MAX_MODEL_NAME_LENGTH = 255  # characters of model_name
MAX_CALL_ID_LENGTH = 256  # characters of function_call.id and function_response.id
MAX_URL_LENGTH = 2048  # characters of webhook_url
# A response_json_schema, or one function's parameters.
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays
MAX_SCHEMA_VALUES = 10_000  # objects, arrays, strings, numbers, booleans and nulls (keys not counted)
MAX_NUMBER_DIGITS = 20  # digits of the integer part of a minimum / maximum (so int64 and uint64 bounds fit)

# Building a grammar for the embedded model (off the event loop) stops with a 400 past either budget.
GRAMMAR_BUILD_SECONDS = 2.0
MAX_GRAMMAR_BYTES = 512 * 1024
# The embedded model generates at most this many array items; a larger minItems is refused.
MAX_ARRAY_ITEMS = 128
# Under AUTO / VALIDATED the embedded model scores each callable function with a model pass (billed as prompt
# tokens): at most this many functions (a 400 above), within this time (past it, the best scored so far).
LOCAL_MAX_SCORED_FUNCTIONS = 32
LOCAL_SCORING_SECONDS = 10.0

# A page of the task list ends before the task that would take its JSON past this size (it always holds one
# task, whatever its size), and its cursor continues from there.
MAX_LIST_PAGE_BYTES = 8 * 1024 * 1024

# A 400 describes the first validation errors; the rest are counted.
MAX_DESCRIBED_ERRORS = 5
MAX_EXAMINED_ERRORS = 100

# Accounts (the admin API, `textgen accounts` and the settings that give new accounts their defaults).
MAX_CREDITS = 1e12  # credits of one amount: a balance given, a grant or a deduction
MAX_RATE_LIMIT = 1_000_000_000  # requests per minute of one account


def check_request(data: Any) -> None:
    """Refuse a request body (parsed JSON, not yet validated) that is over a count limit, naming the field.

    Anything of the wrong type is left for validation to describe."""
    if not isinstance(data, dict):
        return
    messages = data.get("messages")
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise BadRequest(f"messages: at most {MAX_MESSAGES} messages, not {len(messages)}")
        parts = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                parts += len(content)
        if parts > MAX_CONTENT_PARTS:
            raise BadRequest(
                f"messages: at most {MAX_CONTENT_PARTS} content parts in all messages, not {parts}"
            )
    tools = data.get("tools")
    if isinstance(tools, list):
        if len(tools) > MAX_FUNCTION_DECLARATIONS:
            raise BadRequest(f"tools: at most {MAX_FUNCTION_DECLARATIONS} tools, not {len(tools)}")
        declared = 0
        for i, tool in enumerate(tools):
            declarations = tool.get("function_declarations") if isinstance(tool, dict) else None
            if not isinstance(declarations, list):
                continue
            declared += len(declarations)
            if declared > MAX_FUNCTION_DECLARATIONS:
                total = sum(
                    len(t["function_declarations"])
                    for t in tools
                    if isinstance(t, dict) and isinstance(t.get("function_declarations"), list)
                )
                raise BadRequest(
                    f"tools: at most {MAX_FUNCTION_DECLARATIONS} function declarations in all tools "
                    f"(Gemini's limit), not {total}"
                )
            for j, declaration in enumerate(declarations):
                if isinstance(declaration, dict) and "parameters" in declaration:
                    check_schema(
                        declaration["parameters"], f"tools[{i}].function_declarations[{j}].parameters"
                    )
    config = data.get("config")
    if isinstance(config, dict) and "response_json_schema" in config:
        check_schema(config["response_json_schema"], "config.response_json_schema")


def check_schema(schema: Any, where: str) -> None:
    """Refuse a JSON Schema deeper, larger, or with wider ``minimum`` / ``maximum`` numbers than the limits.

    One iterative pass that stops at the first value over a limit."""
    values = 1
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list):
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise BadRequest(f"{where}: nested deeper than {MAX_SCHEMA_DEPTH} objects and arrays")
        values += len(node)
        if values > MAX_SCHEMA_VALUES:
            raise BadRequest(f"{where}: more than {MAX_SCHEMA_VALUES} values (the limit of a schema)")
        if isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
            continue
        for key, value in node.items():
            if key in ("minimum", "maximum") and _too_wide(value):
                raise BadRequest(
                    f"{where}: {key} has more than {MAX_NUMBER_DIGITS} digits before the decimal point"
                )
            stack.append((value, depth + 1))


def _too_wide(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False  # refused as not JSON by validation
    return bool(abs(value) >= 10**MAX_NUMBER_DIGITS)
