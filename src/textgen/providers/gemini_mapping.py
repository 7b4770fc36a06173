"""This API's requests as Gemini REST requests (plain dicts, camelCase), media checks and token bounds.

Responses are read by ``gemini_wire``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from textgen import media
from textgen.errors import BadRequest
from textgen.protocol import GenerationInput, ImagePart, TextPart, VideoPart
from textgen.providers.base import estimate_prompt_tokens

# Gemini's own lists; the API accepts a few synonyms that are renamed on the way.
GEMINI_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})
GEMINI_VIDEO_TYPES = frozenset(
    {
        "video/mp4",
        "video/mpeg",
        "video/mov",
        "video/avi",
        "video/x-flv",
        "video/mpg",
        "video/webm",
        "video/wmv",
        "video/3gpp",
    }
)
MIME_SYNONYMS = {"video/quicktime": "video/mov", "video/x-ms-wmv": "video/wmv"}

CONTEXT_TOKENS = 1_048_576  # Gemini refuses longer prompts, so no estimate needs to be larger
IMAGE_TILE = 768
IMAGE_TILE_TOKENS = 258
IMAGE_MAX_TOKENS_GEMINI3 = 1120  # media_resolution high, the default for images
UNKNOWN_IMAGE_SIDE = 8192
VIDEO_TOKENS_PER_SECOND = 300  # 263/s at default resolution (258 per frame at 1 fps, 32 audio), with margin
VIDEO_MIN_BITS_PER_SECOND = 100_000  # bounds the duration of a video whose container is not understood


@dataclass(frozen=True, slots=True)
class FileRef:
    """A media part that was uploaded through the File API instead of sent inline."""

    uri: str
    mime_type: str


def gemini_mime(mime_type: str) -> str:
    return MIME_SYNONYMS.get(mime_type, mime_type)


def check_request(request: GenerationInput) -> None:
    """Refuse, before any work, what Gemini would refuse: media types outside its lists, bad signatures (its
    limits on stop sequences and function declarations are the request's own, ``textgen.limits``)."""
    for i, message in enumerate(request.messages):
        if not isinstance(message.content, str):
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    continue
                allowed = GEMINI_IMAGE_TYPES if isinstance(part, ImagePart) else GEMINI_VIDEO_TYPES
                if gemini_mime(part.mime_type) not in allowed:
                    raise BadRequest(
                        f"messages[{i}].content[{j}].mime_type: {part.mime_type} is not accepted by Gemini "
                        f"(accepted {part.type} types: {', '.join(sorted(allowed))})"
                    )
        call = message.function_call
        if call is not None and call.thought_signature is not None:
            try:
                media.decode_base64(call.thought_signature)
            except ValueError as exc:
                raise BadRequest(
                    f"messages[{i}].function_call.thought_signature: not valid base64 (send back the value "
                    "Gemini returned, unchanged)"
                ) from exc


def signature_bytes(request: GenerationInput) -> int:
    """The length of the thought signatures a request sends back (what ``check_request`` decodes)."""
    return sum(
        len(message.function_call.thought_signature)
        for message in request.messages
        if message.function_call is not None and message.function_call.thought_signature is not None
    )


def media_positions(request: GenerationInput) -> list[tuple[int, int, ImagePart | VideoPart]]:
    return [
        (i, j, part)
        for i, message in enumerate(request.messages)
        if not isinstance(message.content, str)
        for j, part in enumerate(message.content)
        if isinstance(part, (ImagePart, VideoPart))
    ]


def plan_uploads(request: GenerationInput, inline_limit: int) -> list[tuple[int, int, VideoPart]]:
    """The videos to send through the File API so that the request stays under ``inline_limit`` bytes."""
    parts = media_positions(request)
    # Base64 text as it goes on the wire, plus a generous allowance for everything that is not media.
    total = sum(len(part.data) for _, _, part in parts) + estimate_prompt_tokens(request) * 2
    if total <= inline_limit:
        return []
    chosen: list[tuple[int, int, VideoPart]] = []
    videos = sorted(
        ((i, j, p) for i, j, p in parts if isinstance(p, VideoPart)), key=lambda item: -len(item[2].data)
    )
    for i, j, part in videos:
        if total <= inline_limit:
            break
        chosen.append((i, j, part))
        total -= len(part.data)
    return chosen


def wire_base64(data: str) -> str:
    """Base64 as it goes on the wire: without whitespace, padded (Gemini reads both alphabets)."""
    if " " in data or "\n" in data or "\r" in data or "\t" in data:
        data = "".join(data.split())
    return data + "=" * (-len(data) % 4)


def build_contents(
    request: GenerationInput, files: Mapping[tuple[int, int], FileRef]
) -> list[dict[str, Any]]:
    """``contents`` of a GenerateContentRequest, in the REST (camelCase) spelling."""
    contents: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        parts: list[dict[str, Any]] = []
        if isinstance(message.content, str):
            if message.content:
                parts.append({"text": message.content})
        else:
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    parts.append({"text": part.text})
                elif (i, j) in files:
                    ref = files[(i, j)]
                    parts.append({"fileData": {"fileUri": ref.uri, "mimeType": ref.mime_type}})
                else:
                    mime = gemini_mime(part.mime_type)
                    parts.append({"inlineData": {"mimeType": mime, "data": wire_base64(part.data)}})
        call = message.function_call
        if call is not None:
            function_call: dict[str, Any] = {"name": call.name, "args": call.args}
            if call.id is not None:
                function_call["id"] = call.id
            call_part: dict[str, Any] = {"functionCall": function_call}
            if call.thought_signature:
                call_part["thoughtSignature"] = wire_base64(call.thought_signature)
            parts.append(call_part)
        response = message.function_response
        if response is not None:
            function_response: dict[str, Any] = {"name": response.name, "response": response.response}
            if response.id is not None:
                function_response["id"] = response.id
            parts.append({"functionResponse": function_response})
        contents.append({"role": message.role.value, "parts": parts})
    return contents


def build_body(
    request: GenerationInput,
    files: Mapping[tuple[int, int], FileRef],
    default_output_tokens: int | None = None,
) -> dict[str, Any]:
    """The whole GenerateContentRequest (without the model, which is in the URL).

    ``default_output_tokens`` is the model's output budget, sent when the request names none: it is what the
    task reserved credits for, and Gemini's own default is the model's maximum."""
    body: dict[str, Any] = {"contents": build_contents(request, files)}
    if request.system_instruction:
        body["systemInstruction"] = {"parts": [{"text": request.system_instruction}]}
    config = request.config
    generation = {
        "temperature": config.temperature,
        "topP": config.top_p,
        "topK": config.top_k,
        "maxOutputTokens": config.max_output_tokens or default_output_tokens,
        "presencePenalty": config.presence_penalty,
        "frequencyPenalty": config.frequency_penalty,
        "seed": config.seed,
        "stopSequences": config.stop_sequences,
        "responseMimeType": config.response_mime_type.value if config.response_mime_type else None,
        "responseJsonSchema": config.response_json_schema,
    }
    generation = {key: value for key, value in generation.items() if value is not None}
    if generation:
        body["generationConfig"] = generation
    declarations: list[dict[str, Any]] = []
    for tool in request.tools:
        for declaration in tool.function_declarations:
            entry: dict[str, Any] = {"name": declaration.name}
            if declaration.description:
                entry["description"] = declaration.description
            if declaration.parameters is not None:
                entry["parametersJsonSchema"] = declaration.parameters
            declarations.append(entry)
    if declarations:
        # Gemini treats every declaration alike, whichever tool holds it: one tool, in order.
        body["tools"] = [{"functionDeclarations": declarations}]
    fcc = request.tool_config.function_calling_config if request.tool_config else None
    if fcc is not None:
        calling: dict[str, Any] = {"mode": fcc.mode.value}
        if fcc.allowed_function_names is not None:
            calling["allowedFunctionNames"] = fcc.allowed_function_names
        body["toolConfig"] = {"functionCallingConfig": calling}
    return body


# -- token bounds ------------------------------------------------------------


def estimate_input_tokens(request: GenerationInput) -> int:
    """An upper bound of the prompt's tokens, media included, for the credit reservation."""
    total = estimate_prompt_tokens(request)
    for _, _, part in media_positions(request):
        blob = media.decode_base64(part.data)
        total += image_tokens(blob) if isinstance(part, ImagePart) else video_tokens(blob)
        if total >= CONTEXT_TOKENS:
            return CONTEXT_TOKENS
    return min(total, CONTEXT_TOKENS)


def image_tokens(blob: bytes) -> int:
    width, height = image_size(blob) or (UNKNOWN_IMAGE_SIDE, UNKNOWN_IMAGE_SIDE)
    tiles = math.ceil(width / IMAGE_TILE) * math.ceil(height / IMAGE_TILE)
    return max(tiles * IMAGE_TILE_TOKENS, IMAGE_MAX_TOKENS_GEMINI3)


def video_tokens(blob: bytes) -> int:
    seconds = mp4_duration(blob)
    if seconds is None:
        seconds = len(blob) * 8 / VIDEO_MIN_BITS_PER_SECOND
    return math.ceil(max(seconds, 1.0) * VIDEO_TOKENS_PER_SECOND)


def image_size(blob: bytes) -> tuple[int, int] | None:
    """Width and height from the header of a PNG, GIF, WebP or JPEG image."""
    try:
        if blob.startswith(b"\x89PNG\r\n\x1a\n"):
            w, h = struct.unpack(">II", blob[16:24])
            return int(w), int(h)
        if blob[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", blob[6:10])
            return int(w), int(h)
        if blob.startswith(b"RIFF") and blob[8:12] == b"WEBP":
            return _webp_size(blob)
        if blob.startswith(b"\xff\xd8"):
            return _jpeg_size(blob)
    except struct.error:
        return None
    return None


def _webp_size(blob: bytes) -> tuple[int, int] | None:
    kind = blob[12:16]
    if kind == b"VP8X":
        w = int.from_bytes(blob[24:27], "little") + 1
        h = int.from_bytes(blob[27:30], "little") + 1
        return w, h
    if kind == b"VP8L":
        bits = int.from_bytes(blob[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 ":
        w, h = struct.unpack("<HH", blob[26:30])
        return int(w) & 0x3FFF, int(h) & 0x3FFF
    return None


def _jpeg_size(blob: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(blob):
        if blob[i] != 0xFF:
            i += 1
            continue
        marker = blob[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(blob[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", blob[i + 5 : i + 9])
            return int(w), int(h)
        i += 2 + length
    return None


def mp4_duration(blob: bytes) -> float | None:
    """Duration in seconds from an MP4/QuickTime ``moov/mvhd`` box, walking boxes without reading media."""
    moov = _find_box(blob, 0, len(blob), b"moov")
    if moov is None:
        return None
    mvhd = _find_box(blob, moov[0], moov[1], b"mvhd")
    if mvhd is None:
        return None
    start = mvhd[0]
    try:
        if blob[start] == 1:
            timescale, duration = struct.unpack(">IQ", blob[start + 20 : start + 32])
        else:
            timescale, duration = struct.unpack(">II", blob[start + 12 : start + 20])
    except (struct.error, IndexError):
        return None
    return float(duration) / timescale if timescale else None


def _find_box(blob: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    """(payload start, payload end) of the first box of ``kind`` between ``start`` and ``end``."""
    i = start
    while i + 8 <= end:
        size = int.from_bytes(blob[i : i + 4], "big")
        header = 8
        if size == 1 and i + 16 <= end:
            size = int.from_bytes(blob[i + 8 : i + 16], "big")
            header = 16
        elif size == 0:
            size = end - i
        if size < header:
            return None
        if blob[i + 4 : i + 8] == kind:
            return i + header, min(i + size, end)
        i += size
    return None
