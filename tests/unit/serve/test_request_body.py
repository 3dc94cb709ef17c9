"""Body parsing of POST /v1/answer: capped reads, JSON with base64, multipart uploads, and their refusals."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest

from medrag_ray.config import ServeLimits
from medrag_ray.serving.images import InputError
from serve.request_body import parse_body, read_capped

LIMITS = ServeLimits(max_body_bytes=4096, max_image_bytes=2048)
BOUNDARY = "medragboundary"


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def multipart(fields: dict[str, str], image: bytes | None, content_type: str = "image/png") -> bytes:
    out = b""
    for key, value in fields.items():
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n").encode()
    if image is not None:
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                f"Content-Type: {content_type}\r\n\r\n").encode() + image + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def refused(coro) -> InputError:  # noqa: ANN001
    with pytest.raises(InputError) as info:
        run(coro)
    return info.value


def test_read_capped_refuses_declared_and_streamed_excess() -> None:
    assert run(read_capped({"content-length": "6"}, chunks(b"abc", b"def"), 6)) == b"abcdef"
    err = refused(read_capped({"content-length": "7"}, chunks(b"abcdefg"), 6))
    assert (err.status, err.field) == (413, "body")
    err = refused(read_capped({}, chunks(b"abcd", b"efg"), 6))  # chunked: no length declared
    assert err.status == 413
    assert refused(read_capped({"content-length": "-1"}, chunks(b""), 6)).status == 400


def test_json_body_with_base64_image() -> None:
    image = b"\x89PNG\r\n\x1a\nrest"
    body = ('{"image_base64": "data:image/png;base64,' + base64.b64encode(image).decode() + '", "question": "q?",'
            ' "k": 2}').encode()
    parsed = run(parse_body("application/json; charset=utf-8", body, LIMITS))
    assert parsed.image == image and parsed.image_content_type is None and parsed.fields == {"question": "q?", "k": 2}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, "body"),
        (b"\xff\xfe junk", 400, "body"),
        (b"[1, 2]", 422, "body"),
        (b'{"question": "q"}', 422, "image_base64"),
        (b'{"image_base64": "***", "question": "q"}', 400, "image_base64"),
        (b'{"image_base64": 5}', 422, "image_base64"),
        (b'{"image": "/etc/passwd", "question": "q"}', 422, "image"),
    ],
)
def test_bad_json_bodies(body: bytes, status: int, field: str) -> None:
    err = refused(parse_body("application/json", body, LIMITS))
    assert (err.status, err.field) == (status, field)


def test_multipart_upload_keeps_the_declared_content_type_and_repeated_choices() -> None:
    body = multipart({"question": "Is it?", "task": "closed"}, b"\xff\xd8\xffjpeg", content_type="image/jpeg")
    body = body.replace(f"--{BOUNDARY}--".encode(), (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"choices\"\r\n\r\nleft\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"choices\"\r\n\r\nright\r\n--{BOUNDARY}--").encode())
    parsed = run(parse_body(f"multipart/form-data; boundary={BOUNDARY}", body, LIMITS))
    assert parsed.image == b"\xff\xd8\xffjpeg" and parsed.image_content_type == "image/jpeg"
    assert parsed.fields == {"question": "Is it?", "task": "closed", "choices": ["left", "right"]}


def test_bad_multipart_and_content_types() -> None:
    ct = f"multipart/form-data; boundary={BOUNDARY}"
    assert refused(parse_body(ct, multipart({"question": "q"}, None), LIMITS)).field == "image"
    assert refused(parse_body(ct, b"--" + BOUNDARY.encode() + b"\r\ngarbage", LIMITS)).status == 422  # no image part
    assert refused(parse_body("multipart/form-data", multipart({}, b"x"), LIMITS)).status == 400  # no boundary
    for content_type in ("text/plain", None, "image/png"):
        err = refused(parse_body(content_type, b"x", LIMITS))
        assert (err.status, err.field) == (415, "content-type")
