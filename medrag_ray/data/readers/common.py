"""Machinery shared by the record readers: raw-record streams, error policy, images, side files.

Every reader follows the same shape: a stream of :class:`RawRecord` (one per JSONL line, JSON array item
or array row, or one carrying the parse error of a malformed line/file) goes through
:meth:`ReadContext.records` with a ``convert`` function that builds a schema record or raises
:class:`~medrag_ray.data.schema.RecordError`. The context then applies the error policy:

* ``on_error="raise"`` (default): the first bad record raises a ``RecordError`` whose message names the
  source file, the line (JSONL) or record index (JSON arrays, 0-based), the field and the fix;
* ``on_error="skip"``: the record is rejected -- counted in :class:`ReadStats` by field, written as one
  JSONL line to the :class:`RejectWriter` side file when one is given, logged -- and reading goes on.

A record whose image file is not found is not an error: it is kept with ``image_available=False``,
counted in ``ReadStats.missing_images``, listed in the :class:`MissingImageWriter` side file when one is
given, and logged in aggregate. An image file that exists but does not decode is an error (field
``image``). At the end (or when the consumer stops early) the context logs read/kept/rejected/missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image

from medrag_ray.data.schema import DOMAINS, SPLITS, CorpusDoc, PreferencePair, ReadStats, RecordError, Sample

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")
RAW_TRUNCATE = 2000
"""Characters of the raw record kept in a reject line."""
MAX_LOGGED_REJECTS = 20
"""Rejects logged one by one; further ones are counted and summarized."""

Record = Sample | CorpusDoc | PreferencePair
R = TypeVar("R", Sample, CorpusDoc, PreferencePair)
PathLike = str | Path


# ------------------------------------------------------------------------------------ raw records


@dataclass(frozen=True)
class RawRecord:
    """One source record before conversion, with where it came from (or the error that stopped parsing)."""

    file: Path
    location: str
    """``line N`` (1-based, JSONL), ``record N`` (0-based index in a JSON array) or an array key."""
    index: int
    """0-based position of the record in its file (-1 for a file-level error)."""
    data: Any = None
    error: RecordError | None = None
    raw_text: str = ""

    def raw(self) -> str:
        """The raw record as text, truncated for a reject line."""
        text = self.raw_text
        if not text:
            try:
                text = json.dumps(self.data, ensure_ascii=False, default=str)
            except (TypeError, ValueError):
                text = repr(self.data)
        return text[:RAW_TRUNCATE]


def file_error_record(path: Path, location: str, field_name: str, message: str, raw_text: str = "") -> RawRecord:
    err = RecordError(field_name, message, source=str(path), location=location)
    return RawRecord(path, location, -1, error=err, raw_text=raw_text[:RAW_TRUNCATE])


def iter_jsonl(path: Path) -> Iterator[RawRecord]:
    """Stream a JSONL file line by line; blank lines are not records; a malformed line is an error record."""
    index = 0
    with path.open("rb") as fh:
        for lineno, raw_line in enumerate(fh, 1):
            if not raw_line.strip():
                continue
            location = f"line {lineno}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                err = RecordError(
                    "<json>",
                    f"line is not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8",
                    source=str(path),
                    location=location,
                )
                yield RawRecord(path, location, index, error=err, raw_text=repr(raw_line[:RAW_TRUNCATE]))
                index += 1
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                err = RecordError(
                    "<json>",
                    f"malformed JSON ({exc.msg} at column {exc.colno}); fix or remove this line",
                    source=str(path),
                    location=location,
                )
                yield RawRecord(path, location, index, error=err, raw_text=line.rstrip("\n"))
            else:
                yield RawRecord(path, location, index, data=data, raw_text=line.rstrip("\n"))
            index += 1


def iter_json_array(path: Path) -> Iterator[RawRecord]:
    """Load a JSON file holding an array of records (loaded whole) and yield its items."""
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        yield file_error_record(
            path,
            f"line {exc.lineno} column {exc.colno}",
            "<json>",
            f"malformed JSON ({exc.msg}); the whole file could not be parsed, fix it and re-run",
        )
        return
    except UnicodeDecodeError as exc:
        yield file_error_record(path, f"byte {exc.start}", "<json>", f"file is not UTF-8 ({exc.reason}); re-encode it")
        return
    if not isinstance(data, list):
        yield file_error_record(
            path, "top level", "<json>", f"expected a JSON array of records, got {type(data).__name__}"
        )
        return
    for i, item in enumerate(data):
        yield RawRecord(path, f"record {i}", i, data=item)


def collect_files(path: PathLike, patterns: Sequence[str], what: str) -> list[Path]:
    """``path`` itself when it is a file, else the files under it matching ``patterns`` (recursive, sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: input path {path} does not exist; pass an existing file or folder")
    files = sorted({p for pattern in patterns for p in path.rglob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"{what}: no files matching {list(patterns)} under {path}; check the input path")
    return files


# --------------------------------------------------------------------------------- field helpers


def require_mapping(raw: RawRecord) -> Mapping[str, Any]:
    if not isinstance(raw.data, Mapping):
        raise RecordError("<record>", f"expected a JSON object, got {type(raw.data).__name__}")
    return raw.data


def require_text(data: Mapping[str, Any], key: str, *, numbers_ok: bool = False, hint: str = "") -> str:
    """A required non-empty string field (surrounding whitespace stripped)."""
    fix = f"; {hint}" if hint else ""
    if key not in data or data[key] is None:
        raise RecordError(key, f"is missing{fix}")
    value = data[key]
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RecordError(key, f"must be a string, got {type(value).__name__} {value!r}{fix}")
    if not value.strip():
        raise RecordError(key, f"is empty{fix}")
    return value.strip()


def optional_text(data: Mapping[str, Any], key: str) -> str:
    """An optional string field ('' when absent); a non-string is an error."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(key, f"must be a string, got {type(value).__name__} {value!r}")
    return value.strip()


def require_id(data: Mapping[str, Any], keys: Sequence[str] = ("id",)) -> str:
    """The record's own id from the first present key of ``keys`` (int or non-empty string)."""
    for key in keys:
        if key in data and data[key] is not None:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise RecordError(key or '""', f"id must be an integer or a string, got {value!r}")
            text = str(value).strip()
            if not text:
                raise RecordError(key or '""', "id is empty")
            return text
    shown = ", ".join(repr(k) for k in keys)
    raise RecordError(keys[0] or '""', f"is missing (looked for the id under {shown})")


def image_list(data: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, list[str]]:
    """``(key, paths)`` for the first present image field; a string or a non-empty list of strings."""
    for key in keys:
        if key in data and data[key] is not None:
            value = data[key]
            paths = [value] if isinstance(value, str) else value
            if not isinstance(paths, list) or not paths:
                raise RecordError(key, f"must be a path or a non-empty list of paths, got {value!r}")
            if not all(isinstance(p, str) and p.strip() for p in paths):
                raise RecordError(key, f"every image path must be a non-empty string, got {value!r}")
            return key, [p.strip() for p in paths]
    raise RecordError(keys[0], f"is missing (expected one of {list(keys)} with the image path)")


def split_from_name(name: str) -> str | None:
    """``train``/``val``/``test`` from a file name such as ``pathology_train`` or ``testset`` (None if unclear)."""
    aliases = {
        "train": "train", "training": "train", "trainset": "train",
        "val": "val", "valid": "val", "validation": "val", "dev": "val", "valset": "val",
        "test": "test", "testing": "test", "testset": "test",
    }  # fmt: skip
    found = {aliases[t] for t in re.split(r"[^a-z]+", name.lower()) if t in aliases}
    return found.pop() if len(found) == 1 else None


def check_split(split: str | None, what: str) -> str | None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"{what}: split={split!r} is not one of {list(SPLITS)}")
    return split


def check_domain(domain: str | None, what: str) -> str | None:
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"{what}: domain={domain!r} is not one of {list(DOMAINS)}")
    return domain


def source_files(
    what: str, path: PathLike, patterns: Sequence[str], *, split: str | None = None, domain: str | None = None
) -> list[Path]:
    """Check a reader's ``split`` / ``domain`` options, then collect its input files (:func:`collect_files`)."""
    check_split(split, what)
    check_domain(domain, what)
    return collect_files(path, patterns, what)


def hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) from ``key`` (SHA-256), for hash-based split assignment."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# ------------------------------------------------------------------------------------ yes / no

_LEADING_YES_NO = re.compile(r"(yes|no)(?![\w'’-])(?!\s+\w)", re.IGNORECASE)


def normalize_yes_no(answer: str, mode: Literal["leading", "exact"] = "leading") -> str | None:
    """``"yes"``/``"no"`` when ``answer`` is a yes/no answer, else None.

    ``exact`` (clean datasets: VQA-RAD, PathVQA): the whole answer, case-insensitive, without surrounding
    whitespace and a trailing ``.``/``!``, is ``yes`` or ``no``. Open answers like ``"no hyperplasia"``
    stay open.

    ``leading`` (the MMed-RAG test files, DESIGN.md): strip, drop leading ``-``, then the first token must
    be a yes/no *answer word*: ``yes``/``no`` followed by the end or by punctuation (``"Yes."``,
    ``"- No."``, ``"No. (...)"``, ``"No, the ..."``, ``"Yes  (assuming ...)"``). A yes/no followed
    directly by another word starts a sentence, not an answer (``"No answer can be provided ..."``,
    ``"No information provided"``, ``"No mention of ..."``), and is unparseable, as is anything else.
    """
    text = answer.strip()
    if mode == "exact":
        word = text.rstrip(".!").strip().lower()
        return word if word in ("yes", "no") else None
    if mode != "leading":
        raise ValueError(f"mode must be 'leading' or 'exact', got {mode!r}")
    text = text.lstrip("-").strip()
    match = _LEADING_YES_NO.match(text)
    return match.group(1).lower() if match else None


def clean_vqa_fields(data: Mapping[str, Any]) -> dict[str, str]:
    """The ``question``, ``answer`` and ``answer_type`` fields of a clean VQA record (VQA-RAD, PathVQA).

    ``question`` and ``answer`` (numbers allowed) are required; the answer is normalized with
    :func:`normalize_yes_no` in ``exact`` mode: ``"yes"``/``"no"`` is ``"closed"``, any other answer is
    kept verbatim (stripped) and ``"open"``.
    """
    question = require_text(data, "question")
    answer_text = require_text(data, "answer", numbers_ok=True)
    normalized = normalize_yes_no(answer_text, mode="exact")
    answer, answer_type = (normalized, "closed") if normalized else (answer_text, "open")
    return {"question": question, "answer": answer, "answer_type": answer_type}


def strip_image_tag(text: str) -> str:
    """Remove every ``<image>`` placeholder (and the whitespace around it) from a question."""
    return re.sub(r"\s*<image>\s*", " ", text).strip()


def strip_leading_image_tag(text: str) -> str:
    """Remove the leading ``<image>`` placeholder line of a LLaVA-style human turn; keep the rest verbatim."""
    if text.startswith("<image>"):
        return text[len("<image>") :].lstrip("\n")
    return text


# ---------------------------------------------------------------------------------------- images


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale (common for medical PNGs) min-max scaled to 8-bit ``L``."""
    arr = np.asarray(im, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
    return Image.fromarray(scaled.round().astype(np.uint8), mode="L")


def load_image(image: PathLike | bytes, *, name: str = "") -> Image.Image:
    """Decode an image file or encoded bytes fully and return it as RGB.

    Raises RecordError (field ``image``) naming the file when it is missing, truncated or not an image.
    """
    what = name or ("<image bytes>" if isinstance(image, (bytes, bytearray)) else str(image))
    try:
        src: Any = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else Path(image)
        with Image.open(src) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return _to_8bit(im).convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError:
        raise RecordError("image", f"file {what} does not exist; check the path / image_root", source=what) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RecordError(
            "image",
            f"cannot decode {what} ({type(exc).__name__}: {exc}); the file is truncated or not an image: "
            "replace it, or convert with skip_bad to reject its records",
            source=what,
        ) from None


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` array."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def resolve_image_path(path: str, roots: Sequence[PathLike | None]) -> tuple[Path, bool]:
    """Where an image is: ``path`` if absolute, else the first ``root / path`` that exists.

    Returns ``(path, found)``; when nothing exists the first candidate is returned with ``found=False``
    (the raw relative path when there is no root at all).
    """
    rel = Path(path)
    if rel.is_absolute():
        candidates = [rel]
    else:
        candidates = [Path(root) / rel for root in roots if root is not None and str(root) != ""]
    for cand in candidates:
        if cand.is_file():
            return cand.absolute(), True
    return (candidates[0] if candidates else rel), False


def images_beside(file: Path, image_root: PathLike | None, folder: str = "images") -> Path:
    """Where a source's images lie: ``image_root`` when given, else ``folder`` beside the source ``file``."""
    return Path(image_root) if image_root is not None else file.parent / folder


@dataclass(frozen=True)
class ImageRef:
    """The image fields of a record."""

    path: str
    available: bool
    data: bytes | None = None

    def fields(self) -> dict[str, Any]:
        """The record fields ``image_path``, ``image_bytes`` and ``image_available``."""
        return {"image_path": self.path, "image_bytes": self.data, "image_available": self.available}


NO_IMAGE = ImageRef("", False, None)
"""The image of a record that has none."""


# ------------------------------------------------------------------------------------ side files


class JsonlSideFile:
    """A line-buffered JSONL side file (created, truncated, on open); use as a context manager."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8", buffering=1)
        self.count = 0

    def write_row(self, row: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(dict(row), ensure_ascii=False, default=str) + "\n")
        self.count += 1

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> JsonlSideFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RejectWriter(JsonlSideFile):
    """One line per rejected record: source, file, location, field, reason, raw record (truncated)."""

    def write_reject(self, *, source: str, error: RecordError, raw: str) -> None:
        self.write_row(
            {
                "source": source,
                "file": error.source,
                "location": error.location,
                "field": error.field_name,
                "reason": error_reason(error),
                "raw": raw[:RAW_TRUNCATE],
            }
        )


class MissingImageWriter(JsonlSideFile):
    """One line per kept record whose image file was not found: source, file, location, id, image_path."""

    def write_missing(self, *, source: str, file: str, location: str, record_id: str, image_path: str) -> None:
        self.write_row(
            {"source": source, "file": file, "location": location, "id": record_id, "image_path": image_path}
        )


def read_side_file(path: PathLike) -> list[dict[str, Any]]:
    """The rows of a reject / missing-image side file."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def error_reason(error: RecordError) -> str:
    """The message of a RecordError without its ``file, location: field 'x':`` prefix."""
    text = str(error)
    marker = f"field '{error.field_name}': "
    at = text.find(marker)
    return text[at + len(marker) :] if at >= 0 else text


# --------------------------------------------------------------------------------------- context


class ReadContext:
    """The per-call state of a reader: options, stats, error policy, id uniqueness, image checks."""

    def __init__(
        self,
        source: str,
        *,
        stats: ReadStats | None = None,
        on_error: OnError = "raise",
        rejects: RejectWriter | None = None,
        missing_images: MissingImageWriter | None = None,
        check_images: bool = True,
        embed_images: bool = False,
        limit: int = 0,
    ) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"{source}: on_error must be one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
        if limit < 0:
            raise ValueError(f"{source}: limit must be >= 0 (0 = all records), got {limit}")
        self.source = source
        self.stats = stats if stats is not None else ReadStats()
        self.on_error = on_error
        self.rejects = rejects
        self.missing_writer = missing_images
        self.check_images = check_images
        self.embed_images = embed_images
        self.limit = limit
        self._seen_ids: dict[str, str] = {}
        self._decode_errors: dict[Path, str | None] = {}
        self._logged_rejects = 0
        self._summary_logged = False

    # -- the driver
    def records(
        self,
        raws: Iterable[RawRecord],
        convert: Callable[[RawRecord], R],
        on_kept: Callable[[R, RawRecord], None] | None = None,
    ) -> Iterator[R]:
        """Convert ``raws`` with the error policy; stop after ``limit`` kept records; log the summary."""
        try:
            for raw in raws:
                if self.limit and self.stats.kept >= self.limit:
                    break
                record = self._one(raw, convert)
                if record is None:
                    continue
                if on_kept is not None:
                    on_kept(record, raw)
                yield record
        finally:
            self.log_summary()

    def read_files(
        self,
        files: Iterable[Path],
        iter_file: Callable[[Path], Iterable[RawRecord]],
        convert: Callable[[RawRecord], R],
        on_kept: Callable[[R, RawRecord], None] | None = None,
    ) -> Iterator[R]:
        """:meth:`records` over the raw records that ``iter_file`` streams from each of ``files``, in order."""
        return self.records((raw for file in files for raw in iter_file(file)), convert, on_kept)

    def _one(self, raw: RawRecord, convert: Callable[[RawRecord], R]) -> R | None:
        self.stats.read += 1
        try:
            if raw.error is not None:
                raise raw.error
            try:
                record = convert(raw)
            except RecordError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise RecordError("<record>", f"unexpected record structure ({type(exc).__name__}: {exc})") from exc
            first = self._seen_ids.get(record.id)
            if first is not None:
                raise RecordError(
                    "id", f"duplicate id {record.id!r} (first seen at {first}); ids must be unique in a source"
                )
        except RecordError as exc:
            self._reject(self._locate(exc, raw), raw, exc)
            return None
        self._seen_ids[record.id] = f"{raw.file.name} {raw.location}"
        self.stats.kept += 1
        if not record.image_available and record.image_bytes is None and record.image_path:
            self._missing(record, raw)
        return record

    @staticmethod
    def _locate(exc: RecordError, raw: RawRecord) -> RecordError:
        if exc.source == str(raw.file) and exc.location:
            return exc
        reason = error_reason(exc)
        return RecordError(exc.field_name, reason, source=str(raw.file), location=raw.location)

    def _reject(self, err: RecordError, raw: RawRecord, cause: RecordError) -> None:
        if self.on_error == "raise":
            hint = " (convert with on_error='skip' / skip_bad=true to reject bad records and go on)"
            raise RecordError(
                err.field_name, error_reason(err) + hint, source=err.source, location=err.location
            ) from (cause if cause is not err else None)
        self.stats.reject(err.field_name)
        if self.rejects is not None:
            self.rejects.write_reject(source=self.source, error=err, raw=raw.raw())
        if self._logged_rejects < MAX_LOGGED_REJECTS:
            logger.warning("%s: rejected %s", self.source, err)
        elif self._logged_rejects == MAX_LOGGED_REJECTS:
            logger.warning("%s: more rejects follow; they are counted (and in the rejects file if given)", self.source)
        self._logged_rejects += 1

    def _missing(self, record: Record, raw: RawRecord) -> None:
        self.stats.missing_images += 1
        logger.debug("%s: %s %s: image not found: %s", self.source, raw.file, raw.location, record.image_path)
        if self.missing_writer is not None:
            self.missing_writer.write_missing(
                source=self.source,
                file=str(raw.file),
                location=raw.location,
                record_id=record.id,
                image_path=record.image_path,
            )

    # -- images
    def image(self, path: str, roots: Sequence[PathLike | None], *, field_name: str = "image") -> ImageRef:
        """Resolve an image; check that it decodes (``check_images``) and embed its bytes (``embed_images``)."""
        resolved, found = resolve_image_path(path, roots)
        if not found:
            return ImageRef(str(resolved), False, None)
        if self.check_images:
            if resolved not in self._decode_errors:
                try:
                    load_image(resolved)
                    self._decode_errors[resolved] = None
                except RecordError as exc:
                    self._decode_errors[resolved] = error_reason(exc)
            problem = self._decode_errors[resolved]
            if problem is not None:
                raise RecordError(field_name, problem)
        return ImageRef(str(resolved), True, resolved.read_bytes() if self.embed_images else None)

    # -- summary
    def log_summary(self) -> None:
        if self._summary_logged:
            return
        self._summary_logged = True
        s = self.stats
        by_field = f" by field {s.rejects_by_field}" if s.rejects_by_field else ""
        extra = f", {s.counters}" if s.counters else ""
        logger.info(
            "%s: read %d, kept %d, rejected %d%s, missing images %d%s",
            self.source, s.read, s.kept, s.rejected, by_field, s.missing_images, extra,
        )  # fmt: skip
        if s.missing_images:
            where = f" (listed in {self.missing_writer.path})" if self.missing_writer is not None else ""
            logger.warning(
                "%s: %d records kept with image_available=False because their image file was not found%s; "
                "pass image_root=<folder holding the images> to resolve them",
                self.source, s.missing_images, where,
            )  # fmt: skip
