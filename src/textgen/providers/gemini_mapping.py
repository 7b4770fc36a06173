"""Translation between this API's requests and Gemini's: contents, config, tools, responses, token bounds."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.genai import types

from textgen import media
from textgen.errors import BadRequest, UpstreamError
from textgen.protocol import GenerationInput, ImagePart, TextPart, VideoPart
from textgen.providers.base import FunctionCall, Generation, StreamChunk, estimate_prompt_tokens

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

OK_FINISH_REASONS = frozenset({"STOP", "MAX_TOKENS", "FINISH_REASON_UNSPECIFIED"})
_CONTENT_POLICY = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "LANGUAGE",
        "IMAGE_SAFETY",
    }
)
_FINISH_EXPLAINED = {
    "SAFETY": "the response was flagged by Gemini's safety filters",
    "RECITATION": "the response too closely resembled existing material",
    "BLOCKLIST": "the response contained a blocked term",
    "PROHIBITED_CONTENT": "the response was flagged as prohibited content",
    "SPII": "the response contained sensitive personal information",
    "LANGUAGE": "the response language is not supported",
    "MALFORMED_FUNCTION_CALL": "the model produced a function call that does not parse",
    "UNEXPECTED_TOOL_CALL": "the model called a tool that is not enabled",
    "TOO_MANY_TOOL_CALLS": "the model made too many tool calls",
    "OTHER": "Gemini gave no reason",
}
_RAW_FIELDS = {
    "candidates",
    "prompt_feedback",
    "usage_metadata",
    "model_version",
    "response_id",
    "create_time",
}


@dataclass(frozen=True, slots=True)
class FileRef:
    """A media part that was uploaded through the File API instead of sent inline."""

    uri: str
    mime_type: str


def gemini_mime(mime_type: str) -> str:
    return MIME_SYNONYMS.get(mime_type, mime_type)


def check_request(request: GenerationInput) -> None:
    """Refuse, before any work, what Gemini would refuse: media types outside its lists, bad signatures."""
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


def build_contents(request: GenerationInput, files: Mapping[tuple[int, int], FileRef]) -> list[types.Content]:
    contents: list[types.Content] = []
    for i, message in enumerate(request.messages):
        parts: list[types.Part] = []
        if isinstance(message.content, str):
            if message.content:
                parts.append(types.Part(text=message.content))
        else:
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    parts.append(types.Part(text=part.text))
                elif (i, j) in files:
                    ref = files[(i, j)]
                    parts.append(
                        types.Part(file_data=types.FileData(file_uri=ref.uri, mime_type=ref.mime_type))
                    )
                else:
                    blob = types.Blob(
                        data=media.decode_base64(part.data), mime_type=gemini_mime(part.mime_type)
                    )
                    parts.append(types.Part(inline_data=blob))
        call = message.function_call
        if call is not None:
            signature = media.decode_base64(call.thought_signature) if call.thought_signature else None
            parts.append(
                types.Part(
                    function_call=types.FunctionCall(name=call.name, args=call.args, id=call.id),
                    thought_signature=signature,
                )
            )
        response = message.function_response
        if response is not None:
            parts.append(
                types.Part(
                    function_response=types.FunctionResponse(
                        name=response.name,
                        response=response.response,
                        id=response.id,
                    )
                )
            )
        contents.append(types.Content(role=message.role.value, parts=parts))
    return contents


def build_config(request: GenerationInput) -> types.GenerateContentConfig:
    config = request.config
    tools: list[Any] = [
        types.Tool(
            function_declarations=[
                types.FunctionDeclaration(
                    name=declaration.name,
                    description=declaration.description or None,
                    parameters_json_schema=declaration.parameters,
                )
                for declaration in tool.function_declarations
            ]
        )
        for tool in request.tools
    ]
    tool_config = None
    fcc = request.tool_config.function_calling_config if request.tool_config else None
    if fcc is not None:
        tool_config = types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(
                mode=types.FunctionCallingConfigMode(fcc.mode.value),
                allowed_function_names=fcc.allowed_function_names,
            )
        )
    return types.GenerateContentConfig(
        system_instruction=(
            types.Content(parts=[types.Part(text=request.system_instruction)])
            if request.system_instruction
            else None
        ),
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_output_tokens=config.max_output_tokens,
        presence_penalty=config.presence_penalty,
        frequency_penalty=config.frequency_penalty,
        seed=config.seed,
        stop_sequences=config.stop_sequences,
        response_mime_type=config.response_mime_type.value if config.response_mime_type else None,
        response_json_schema=config.response_json_schema,
        tools=tools or None,
        tool_config=tool_config,
        # This service relays one request as one upstream call; the caller runs its functions.
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        automatic_continuation=False,
    )


# -- responses ------------------------------------------------------------


def usage_tokens(usage: types.GenerateContentResponseUsageMetadata | None) -> tuple[int, int]:
    """(input, output) tokens; thinking is billed as output."""
    if usage is None:
        return 0, 0
    prompt = (usage.prompt_token_count or 0) + (usage.tool_use_prompt_token_count or 0)
    return prompt, (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value))


def check_response(response: types.GenerateContentResponse) -> str | None:
    """Raise UpstreamError for a blocked prompt or a failed finish; return the finish reason if any."""
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        reason = _enum_name(feedback.block_reason)
        detail = f": {feedback.block_reason_message}" if feedback.block_reason_message else ""
        raise UpstreamError(f"Gemini blocked the prompt ({reason}){detail}", status_code=400)
    if not response.candidates:
        return None
    finish = response.candidates[0].finish_reason
    if finish is None:
        return None
    name = _enum_name(finish)
    if name not in OK_FINISH_REASONS:
        explained = _FINISH_EXPLAINED.get(name, "see Gemini's finish reasons")
        raise UpstreamError(
            f"Gemini stopped the response with finish reason {name}: {explained}",
            status_code=400 if name in _CONTENT_POLICY else 502,
        )
    return name


def response_parts(response: types.GenerateContentResponse) -> tuple[str, list[FunctionCall]]:
    if not response.candidates:
        return "", []
    content = response.candidates[0].content
    text: list[str] = []
    calls: list[FunctionCall] = []
    for part in (content.parts if content is not None else None) or []:
        if part.text is not None and not part.thought:
            text.append(part.text)
        if part.function_call is not None:
            signature = base64.b64encode(part.thought_signature).decode() if part.thought_signature else None
            calls.append(
                FunctionCall(
                    name=part.function_call.name or "",
                    args=dict(part.function_call.args or {}),
                    id=part.function_call.id,
                    thought_signature=signature,
                )
            )
    return "".join(text), calls


def to_generation(response: types.GenerateContentResponse) -> Generation:
    finish = check_response(response)
    text, calls = response_parts(response)
    input_tokens, output_tokens = usage_tokens(response.usage_metadata)
    return Generation(
        text=text,
        function_calls=calls,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish_reason=finish or "STOP",
        model_version=response.model_version or "",
    )


def to_chunk(response: types.GenerateContentResponse) -> StreamChunk:
    finish = check_response(response)
    text, calls = response_parts(response)
    input_tokens, output_tokens = usage_tokens(response.usage_metadata)
    raw = response.model_dump(mode="json", by_alias=True, exclude_none=True, include=_RAW_FIELDS)
    return StreamChunk(
        text=text,
        function_calls=calls,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish_reason=finish,
        model_version=response.model_version or "",
        raw=raw,
    )


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
