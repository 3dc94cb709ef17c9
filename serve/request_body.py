"""Reading ``POST /v1/answer`` bodies safely: a capped body read, multipart or JSON (base64 image), 4xx on junk.

No Ray here (only starlette), so the parsing is unit-tested without a cluster. The image is taken only from the
request's bytes; no field is ever read as a server-side path.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from medrag_ray.config import ServeLimits
from medrag_ray.serving.images import InputError

__all__ = ["ParsedRequest", "parse_body", "read_capped"]

MAX_FORM_FIELDS = 32


@dataclass(frozen=True)
class ParsedRequest:
    """The image bytes, the content type the client declared for them (multipart only) and the other fields."""

    image: bytes
    image_content_type: str | None
    fields: dict[str, Any]


async def read_capped(headers: Mapping[str, str], stream: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The body, refusing (413) a declared or actual size above ``max_bytes`` before buffering more of it."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise InputError(400, "content-length", f"is not a byte count: {declared!r}")
        if int(declared) > max_bytes:
            raise InputError(413, "body", f"is {int(declared)} bytes; the limit is {max_bytes}")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > max_bytes:
            raise InputError(413, "body", f"exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _b64(value: object) -> bytes:
    if not isinstance(value, str) or not value.strip():
        raise InputError(422, "image_base64", "must be the image file base64-encoded as a string")
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "image_base64", "is not valid base64 (RFC 4648 alphabet, padded)") from None


def _parse_json(body: bytes) -> ParsedRequest:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(400, "body", f"is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(422, "body", f"must be a JSON object of request fields, got {type(data).__name__}")
    if "image" in data:
        raise InputError(422, "image", "JSON requests carry the image as image_base64 (or upload it as multipart)")
    if "image_base64" not in data:
        raise InputError(422, "image_base64", "is missing; send the image base64-encoded or as a multipart upload")
    image = _b64(data.pop("image_base64"))
    return ParsedRequest(image, None, data)


async def _parse_multipart(content_type: str, body: bytes, limits: ServeLimits) -> ParsedRequest:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(Headers({"content-type": content_type}), stream(), max_files=1,
                             max_fields=MAX_FORM_FIELDS, max_part_size=limits.max_body_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InputError(400, "body", f"is not valid multipart/form-data ({exc.message})") from None
    try:
        image_part = form.get("image")
        if not isinstance(image_part, UploadFile):
            raise InputError(422, "image", "is missing; upload the image file in a part named 'image'")
        image = await image_part.read()
        fields: dict[str, Any] = {}
        for key in set(form.keys()) - {"image"}:
            values = form.getlist(key)
            if any(isinstance(v, UploadFile) for v in values):
                raise InputError(422, key, "must be a plain form field, not a file")
            fields[key] = list(values) if key == "choices" and len(values) > 1 else values[-1]
        return ParsedRequest(image, image_part.content_type, fields)
    finally:
        await form.close()


async def parse_body(content_type: str | None, body: bytes, limits: ServeLimits) -> ParsedRequest:
    """The request of a ``multipart/form-data`` or ``application/json`` body; 415 for other content types."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _parse_json(body)
    if kind == "multipart/form-data":
        return await _parse_multipart(content_type or "", body, limits)
    raise InputError(415, "content-type", f"{kind or 'none'} is not accepted; send multipart/form-data (image upload) "
                                          "or application/json (image_base64)")
