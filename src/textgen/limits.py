"""What one request may ask for, so that every check before admission, and every grammar built for the
embedded model, does bounded work. Each limit is a 400 naming the field; docs/limits.md lists them."""

from __future__ import annotations

# Building a grammar for the embedded model (off the event loop) stops with a 400 past either budget.
GRAMMAR_BUILD_SECONDS = 2.0
MAX_GRAMMAR_BYTES = 512 * 1024
# The embedded model generates at most this many array items; a larger minItems is refused.
MAX_ARRAY_ITEMS = 128
