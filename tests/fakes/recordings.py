"""The recorded Gemini answers of ``shared/reference/gemini-fixtures``, as the bytes an HTTP client would read.

Each recording becomes one ``Exchange`` per request it answers (a js-genai replay file can hold several): the
status, the content type and the body. Raw captures (``*.sse``, ``*.txt``) and error bodies are used byte for
byte. The other shapes are rebuilt as Gemini frames them: payload-per-line files (``*.jsonl``) and replay files'
stream segments become ``data: <json>\\r\\n\\r\\n`` events with Gemini's spacing; replay files' unary bodies and
error bodies are pretty-printed with a 2-space indent and a trailing newline (the size of the recorded 404 stream
body, Content-Length 858, is exactly that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "reference" / "gemini-fixtures"
KINDS = ("generate", "stream", "errors")
UNARY_TYPE = "application/json; charset=UTF-8"
SSE_TYPE = "text/event-stream"
# Recorded headers worth replaying; the others describe the recorded transfer (gzip, lengths, dates).
_KEPT_HEADERS = ("content-disposition", "server")


@dataclass(frozen=True)
class Exchange:
    """One recorded answer: what Gemini sent back for one request."""

    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def events(self) -> list[dict[str, Any]]:
        """The JSON of every ``data:`` event of an SSE body, as a reference reader sees it."""
        found: list[dict[str, Any]] = []
        for block in self.body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n"):
            lines = [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]
            if lines:
                found.append(json.loads(b"\n".join(lines)))
        return found

    def tail(self) -> dict[str, Any] | None:
        """The raw JSON that follows the last event of an SSE body (an error after HTTP 200), if any."""
        text = self.body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        rest = b"\n".join(line for line in text.split(b"\n") if line and not line.startswith(b"data:"))
        return json.loads(rest) if rest.strip() else None

    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass(frozen=True)
class Recording:
    kind: str  # generate, stream or errors
    path: Path
    exchanges: list[Exchange]

    @property
    def name(self) -> str:
        """The short name the index of the fixtures uses: g01, s15, e08b..."""
        return self.path.name.split("-", 1)[0]

    @property
    def exchange(self) -> Exchange:
        return self.exchanges[0]


def pretty(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def sse_event(payload: Any) -> bytes:
    """One event as Gemini frames it: ESF spacing (``": "`` after keys, none after commas), CRLF CRLF."""
    return b"data: " + json.dumps(payload, separators=(",", ": "), ensure_ascii=False).encode() + b"\r\n\r\n"


def _replay_file(data: dict[str, Any], stream: bool) -> list[Exchange]:
    exchanges = []
    for interaction in data["interactions"]:
        response = interaction["response"]
        headers = {key.lower(): value for key, value in response["headers"].items()}
        segments = response["bodySegments"]
        if stream and response["statusCode"] == 200:
            body = b"".join(sse_event(segment) for segment in segments)
        else:
            [segment] = segments
            body = pretty(segment)
        exchanges.append(
            Exchange(
                status=response["statusCode"],
                content_type=headers.get("content-type", SSE_TYPE if stream else UNARY_TYPE),
                body=body,
                headers={key: headers[key] for key in _KEPT_HEADERS if key in headers},
            )
        )
    return exchanges


def load(path: Path) -> Recording:
    kind = path.parent.name
    raw = path.read_bytes()
    if kind == "errors":
        status = json.loads(raw)["error"]["code"]
        return Recording(kind, path, [Exchange(status, UNARY_TYPE, raw)])
    if path.suffix in (".sse", ".txt"):
        return Recording(kind, path, [Exchange(200, SSE_TYPE, raw, {"content-disposition": "attachment"})])
    if path.suffix == ".jsonl":
        body = b"".join(sse_event(json.loads(line)) for line in raw.splitlines() if line.strip())
        return Recording(kind, path, [Exchange(200, SSE_TYPE, body, {"content-disposition": "attachment"})])
    data = json.loads(raw)
    if "interactions" in data:
        return Recording(kind, path, _replay_file(data, stream=kind == "stream"))
    return Recording(kind, path, [Exchange(200, UNARY_TYPE, raw)])


def paths(kind: str) -> list[Path]:
    return sorted(path for path in (FIXTURES / kind).iterdir() if path.is_file())


def recordings(kind: str) -> list[Recording]:
    return [load(path) for path in paths(kind)]


def by_name(name: str) -> Recording:
    """A recording by its short name (``s15``)."""
    for kind in KINDS:
        for path in paths(kind):
            if path.name.split("-", 1)[0] == name:
                return load(path)
    raise KeyError(name)
