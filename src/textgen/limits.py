"""What one request may ask for, so that every check before admission, and every grammar built for the
embedded model, does bounded work. Each limit is a 400 naming the field.

``check_request`` runs first, on the request as parsed JSON and before pydantic validates its items, so a
body with thousands of messages or parts is refused after counting them, not after validating (and
describing the errors of) each one.
"""

from __future__ import annotations

from typing import Any

from textgen.errors import BadRequest

MAX_MESSAGES = 1_000
MAX_CONTENT_PARTS = 1_000  # in all messages together

# Building a grammar for the embedded model (off the event loop) stops with a 400 past either budget.
GRAMMAR_BUILD_SECONDS = 2.0
MAX_GRAMMAR_BYTES = 512 * 1024
# The embedded model generates at most this many array items; a larger minItems is refused.
MAX_ARRAY_ITEMS = 128

# A 400 describes the first validation errors; the rest are counted.
MAX_DESCRIBED_ERRORS = 5
MAX_EXAMINED_ERRORS = 100


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
