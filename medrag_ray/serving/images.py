"""Decoding untrusted image bytes: format sniffing, size and pixel limits, truncated files, decompression bombs.

Only encoded bytes are accepted (never a path), only PNG and JPEG, and the pixel count is read from the header
before any pixel is decoded, so a small file that declares a huge image (a "PNG bomb") is refused without
allocating it. Every refusal is an :class:`InputError` carrying the HTTP status the service answers with.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

__all__ = ["ALLOWED_CONTENT_TYPES", "InputError", "decode_image", "sniff_format"]

ALLOWED_CONTENT_TYPES: dict[str, str] = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
"""Declared content types a multipart image part may carry, and the format its bytes must then be."""

_MAGIC: tuple[tuple[bytes, str], ...] = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))


@dataclass
class InputError(ValueError):
    """A request the service refuses: ``status`` (4xx), the request ``field`` at fault, and what to do."""

    status: int
    field: str
    message: str

    def __post_init__(self) -> None:
        super().__init__(f"{self.field}: {self.message}")

    def __reduce__(self) -> tuple[type[InputError], tuple[int, str, str]]:  # crosses process boundaries intact
        return (InputError, (self.status, self.field, self.message))

    def to_dict(self) -> dict[str, object]:
        return {"status": self.status, "field": self.field, "message": self.message}


def sniff_format(data: bytes) -> str | None:
    """``"PNG"`` / ``"JPEG"`` from the file's magic bytes, None for anything else."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def decode_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    content_type: str | None = None,
    field: str = "image",
) -> Image.Image:
    """Decode ``data`` to an RGB PIL image, or raise :class:`InputError`.

    413 when the bytes exceed ``max_bytes`` or the header declares more than ``max_pixels``; 415 for a format
    other than PNG/JPEG or a declared ``content_type`` that is not an image type or disagrees with the bytes;
    400 for empty, truncated or corrupt data.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InputError(400, field, f"expected image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InputError(400, field, "the image is empty; send the PNG or JPEG file's bytes")
    if len(data) > max_bytes:
        raise InputError(413, field, f"the image is {len(data)} bytes; the limit is {max_bytes}")
    fmt = sniff_format(data)
    if content_type is not None:
        declared = content_type.split(";")[0].strip().lower()
        if declared not in ALLOWED_CONTENT_TYPES:
            raise InputError(415, field, f"content type {declared!r} is not accepted; send image/png or image/jpeg")
        if fmt is not None and ALLOWED_CONTENT_TYPES[declared] != fmt:
            raise InputError(415, field, f"declared {declared} but the bytes are a {fmt} file; fix the content type")
    if fmt is None:
        raise InputError(415, field, "the bytes are not a PNG or JPEG file (unknown signature); send PNG or JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width < 1 or height < 1:
                raise InputError(400, field, f"the image declares a size of {width}x{height}")
            if width * height > max_pixels:
                raise InputError(413, field, f"the image declares {width}x{height} = {width * height} pixels; the "
                                             f"limit is {max_pixels}")
            image.load()
            return image.convert("RGB")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(413, field, f"the image is a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:  # PIL's errors for corrupt files
        raise InputError(
            400, field, f"the {fmt} file cannot be decoded ({type(exc).__name__}: {exc}); is it truncated?"
        ) from None
