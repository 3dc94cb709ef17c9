"""Decoding untrusted image bytes: formats, limits, truncation, PNG bombs, content types."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medrag_ray.serving.images import InputError, decode_image, sniff_format

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 256 * 256}


def encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 255, size=(size[1], size[0], channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=None).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR declares ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def status_of(data: bytes, **kwargs: object) -> tuple[int, str]:
    with pytest.raises(InputError) as info:
        decode_image(data, **{**LIMITS, **kwargs})  # type: ignore[arg-type]
    return info.value.status, info.value.message


def test_png_and_jpeg_decode_to_rgb_with_their_pixels() -> None:
    png = encoded("PNG")
    image = decode_image(png, **LIMITS)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    gray = decode_image(encoded("JPEG", mode="L"), **LIMITS, content_type="image/jpeg")
    assert gray.mode == "RGB" and gray.size == (40, 30)
    assert sniff_format(png) == "PNG" and sniff_format(b"GIF89a...") is None


def test_refusals_and_their_statuses() -> None:
    png = encoded("PNG")
    assert status_of(b"")[0] == 400
    assert status_of(png, max_bytes=len(png) - 1)[0] == 413
    assert status_of(b"GIF89a" + b"\x00" * 64)[0] == 415
    assert status_of(b"%PDF-1.7 not an image")[0] == 415
    assert status_of(png, content_type="text/plain")[0] == 415
    assert status_of(png, content_type="image/jpeg")[0] == 415  # declared JPEG, bytes are a PNG
    status, message = status_of(png[: len(png) // 2])
    assert status == 400 and "truncated" in message
    status, message = status_of(encoded("JPEG")[:300])
    assert status == 400


def test_png_bomb_is_refused_from_its_header_before_decoding() -> None:
    status, message = status_of(png_declaring(50_000, 50_000))
    assert status == 413 and "2500000000 pixels" in message
    assert status_of(png_declaring(257, 256))[0] == 413  # one column over max_pixels
    # Inside the pixel limit the same forged file fails as corrupt data (its IDAT is too short), not as a bomb.
    assert status_of(png_declaring(16, 16))[0] == 400


def test_input_error_survives_pickling_with_its_fields() -> None:
    err = pickle.loads(pickle.dumps(InputError(413, "image", "too big")))
    assert isinstance(err, InputError) and (err.status, err.field, err.message) == (413, "image", "too big")
    assert str(err) == "image: too big" and err.to_dict() == {"status": 413, "field": "image", "message": "too big"}
