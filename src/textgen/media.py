"""Inline media parts: base64 decoding, MIME allow-lists and content sniffing."""

from __future__ import annotations

import base64
import binascii
import re

IMAGE_MIME_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/webp", "image/gif", "image/heic", "image/heif"}
)
VIDEO_MIME_TYPES = frozenset(
    {
        "video/mp4",
        "video/mpeg",
        "video/mov",
        "video/quicktime",
        "video/avi",
        "video/x-flv",
        "video/mpg",
        "video/webm",
        "video/wmv",
        "video/x-ms-wmv",
        "video/3gpp",
    }
)
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_VIDEO_BYTES = 100 * 1024 * 1024

_B64_STANDARD = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_B64_URLSAFE = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


def decode_base64(data: str) -> bytes:
    """Decode standard or URL-safe base64, padded or not; raise ValueError when it is neither."""
    compact = "".join(data.split())
    padded = compact + "=" * (-len(compact) % 4)
    try:
        if _B64_STANDARD.match(compact):
            return base64.b64decode(padded, validate=True)
        if _B64_URLSAFE.match(compact):
            return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        pass
    raise ValueError("data is not valid base64")


def decoded_length(data: str) -> int:
    """Size in bytes that ``data`` decodes to, without decoding it."""
    compact_len = len(data) - data.count("=") - sum(data.count(c) for c in " \n\r\t")
    return compact_len * 3 // 4


def sniff_mime(blob: bytes) -> str | None:
    """Guess a media type from magic bytes; ``None`` when the format is not recognised."""
    head = blob[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video/avi"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis"):
            return "image/heic"
        if brand in (b"mif1", b"msf1"):
            return "image/heif"
        if brand.startswith(b"3g"):
            return "video/3gpp"
        if brand == b"qt  ":
            return "video/quicktime"
        return "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"FLV"):
        return "video/x-flv"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "video/wmv"
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):
        return "video/mpeg"
    return None


# Declared types that name the same container family as a sniffed one.
_FAMILIES = {
    "image/heic": {"image/heic", "image/heif"},
    "image/heif": {"image/heic", "image/heif"},
    "video/mp4": {"video/mp4", "video/mov", "video/quicktime", "video/3gpp"},
    "video/quicktime": {"video/mp4", "video/mov", "video/quicktime"},
    "video/3gpp": {"video/mp4", "video/3gpp"},
    "video/mpeg": {"video/mpeg", "video/mpg"},
    "video/wmv": {"video/wmv", "video/x-ms-wmv"},
}


def check_media(kind: str, mime_type: str, data: str) -> bytes:
    """Validate one image/video part and return its bytes; raise ValueError naming the problem."""
    allowed, limit = (
        (IMAGE_MIME_TYPES, MAX_IMAGE_BYTES) if kind == "image" else (VIDEO_MIME_TYPES, MAX_VIDEO_BYTES)
    )
    if mime_type not in allowed:
        raise ValueError(
            f"mime_type {mime_type!r} is not a supported {kind} type ({', '.join(sorted(allowed))})"
        )
    if not data:
        raise ValueError("data is empty")
    if decoded_length(data) > limit:
        raise ValueError(f"{kind} is larger than the {limit // (1024 * 1024)} MB limit")
    blob = decode_base64(data)
    if len(blob) > limit:
        raise ValueError(f"{kind} is larger than the {limit // (1024 * 1024)} MB limit")
    sniffed = sniff_mime(blob)
    if sniffed is not None and mime_type not in _FAMILIES.get(sniffed, {sniffed}):
        raise ValueError(f"data looks like {sniffed}, not the declared {mime_type}")
    if sniffed is None and kind == "image":
        raise ValueError(f"data is not a recognisable {mime_type} image")
    return blob
