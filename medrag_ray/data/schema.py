"""Record schemas shared by every reader, job and deployment.

Three record kinds, each a frozen dataclass with a matching Arrow schema so that the same rows flow
through plain Python, Parquet files and Ray Data blocks unchanged:

* :class:`Sample` -- one image with its report/caption and, optionally, one question and answer.
  VQA rows, report-generation rows and MedMNIST label rows are all samples.
* :class:`CorpusDoc` -- one retrievable document of a domain's corpus (a report or caption with the
  image it describes), what the per-domain retrievers R_d index.
* :class:`PreferencePair` -- one preference pair (MMed-RAG alignment data, or pairs we mine).

Images are referenced by ``image_path`` (absolute, or relative to the file that lists them) or carried
inline as encoded bytes in ``image_bytes``; ``image_available`` says whether the pixels can be read.
Anything source-specific that does not fit the common fields is kept as a JSON string in ``meta``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

DOMAINS: tuple[str, ...] = ("radiology", "ophthalmology", "pathology", "dermatology")
SPLITS: tuple[str, ...] = ("train", "val", "test")
ANSWER_TYPES: tuple[str, ...] = ("closed", "open", "report", "label", "")
PAIR_TYPES: tuple[str, ...] = ("cm", "oa1", "oa2", "unknown")
UNKNOWN_DOMAIN = "unknown"
"""The route of an image the router cannot place in one of its indexed domains (answered without retrieval)."""


class RecordError(ValueError):
    """A record that does not satisfy the schema; the message names the field and the fix."""

    def __init__(self, field_name: str, message: str, *, source: str = "", location: str = "") -> None:
        self.field_name = field_name
        self.source = source
        self.location = location
        where = ", ".join(p for p in (source, location) if p)
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}field '{field_name}': {message}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RecordError(name, f"{value!r} is not one of {list(choices)}; use one of those values")


def _check_nonempty(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(name, "must be a non-empty string")


@dataclass(frozen=True)
class Sample:
    """One image with its report/caption and optionally one question/answer pair."""

    id: str
    domain: str
    split: str
    source: str
    text: str = ""
    """Report (radiology, ophthalmology) or caption (pathology) describing the image."""
    question: str = ""
    answer: str = ""
    answer_type: str = ""
    """``closed`` (yes/no), ``open``, ``report`` (generate ``text``), ``label`` (class name) or ``""``."""
    image_path: str = ""
    image_bytes: bytes | None = None
    image_available: bool = False
    meta: str = "{}"

    def __post_init__(self) -> None:
        _check_nonempty("id", self.id)
        _check_choice("domain", self.domain, DOMAINS)
        _check_choice("split", self.split, SPLITS)
        _check_choice("answer_type", self.answer_type, ANSWER_TYPES)
        if self.answer_type in ("closed", "open", "label") and not self.answer.strip():
            raise RecordError("answer", f"is empty but answer_type is {self.answer_type!r}")
        if self.answer_type in ("closed", "open") and not self.question.strip():
            raise RecordError("question", f"is empty but answer_type is {self.answer_type!r}")
        _check_meta(self.meta)


@dataclass(frozen=True)
class CorpusDoc:
    """One retrievable document: a report/caption and the image it belongs to."""

    id: str
    domain: str
    split: str
    source: str
    text: str
    image_path: str = ""
    image_bytes: bytes | None = None
    image_available: bool = False
    meta: str = "{}"

    def __post_init__(self) -> None:
        _check_nonempty("id", self.id)
        _check_choice("domain", self.domain, DOMAINS)
        _check_choice("split", self.split, SPLITS)
        _check_nonempty("text", self.text)
        _check_meta(self.meta)


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair: a prompt, a preferred and a dispreferred answer, and which image each uses.

    ``chosen_noised`` / ``rejected_noised`` follow MMed-RAG's alignment files: 1 means that side's image
    is replaced by the noisy image x_v* (cross-modality pairs D_cm reject with the noised image).
    """

    id: str
    domain: str
    source: str
    pair_type: str
    prompt: str
    chosen: str
    rejected: str
    image_path: str = ""
    image_bytes: bytes | None = None
    image_available: bool = False
    chosen_noised: int = 0
    rejected_noised: int = 0
    meta: str = "{}"
    noised_image_bytes: bytes | None = None
    """The noisy image x_v* (PNG) of a side marked noised, when the pair was mined here; None in MMed-RAG's
    released files, whose trainer regenerates the noise."""

    def __post_init__(self) -> None:
        _check_nonempty("id", self.id)
        _check_choice("domain", self.domain, DOMAINS)
        _check_choice("pair_type", self.pair_type, PAIR_TYPES)
        _check_nonempty("prompt", self.prompt)
        _check_nonempty("chosen", self.chosen)
        _check_nonempty("rejected", self.rejected)
        for name in ("chosen_noised", "rejected_noised"):
            if getattr(self, name) not in (0, 1):
                raise RecordError(name, f"must be 0 or 1, got {getattr(self, name)!r}")
        _check_meta(self.meta)


def _check_meta(meta: str) -> None:
    try:
        value = json.loads(meta)
    except (TypeError, json.JSONDecodeError) as exc:
        raise RecordError("meta", f"must be a JSON object string ({exc})") from None
    if not isinstance(value, dict):
        raise RecordError("meta", "must encode a JSON object")


def dumps_meta(meta: Mapping[str, Any]) -> str:
    """Encode source-specific extras for the ``meta`` field (sorted keys, so rows are reproducible)."""
    return json.dumps(dict(meta), sort_keys=True, ensure_ascii=False, default=str)


_ARROW_TYPES: dict[str, pa.DataType] = {
    "str": pa.string(),
    "bytes | None": pa.binary(),
    "bool": pa.bool_(),
    "int": pa.int64(),
}

Record = TypeVar("Record", Sample, CorpusDoc, PreferencePair)


def arrow_schema(cls: type[Record]) -> pa.Schema:
    """The Arrow schema of a record class (field order and types follow the dataclass)."""
    return pa.schema(
        [pa.field(f.name, _ARROW_TYPES[str(f.type)], nullable=str(f.type) == "bytes | None") for f in fields(cls)]
    )


SAMPLE_SCHEMA = arrow_schema(Sample)
CORPUS_SCHEMA = arrow_schema(CorpusDoc)
PAIR_SCHEMA = arrow_schema(PreferencePair)


def to_table(records: Iterable[Record], cls: type[Record]) -> pa.Table:
    """Records to an Arrow table with the class's schema."""
    rows = [asdict(r) for r in records]
    return pa.Table.from_pylist(rows, schema=arrow_schema(cls))


def from_rows(rows: Iterable[Mapping[str, Any]], cls: type[Record]) -> Iterator[Record]:
    """Rows (dicts, e.g. from Arrow or Ray Data) back to validated records; unknown keys are an error."""
    names = {f.name for f in fields(cls)}
    for i, row in enumerate(rows):
        unknown = set(row) - names
        if unknown:
            raise RecordError(sorted(unknown)[0], f"row {i} has fields not in {cls.__name__}: {sorted(unknown)}")
        yield cls(**{k: v for k, v in row.items() if k in names})


def write_parquet(records: Iterable[Record], cls: type[Record], path: str | Path) -> int:
    """Write records to one Parquet file; returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = to_table(records, cls)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return table.num_rows


def read_parquet(path: str | Path, cls: type[Record]) -> list[Record]:
    """Read a Parquet file (or a directory of them) written with :func:`write_parquet`."""
    table = pq.read_table(path, schema=arrow_schema(cls))
    return list(from_rows(table.to_pylist(), cls))


@dataclass
class ReadStats:
    """Counts a reader logs at the end: nothing is dropped without being counted."""

    read: int = 0
    kept: int = 0
    rejected: int = 0
    missing_images: int = 0
    rejects_by_field: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    """Reader-specific counts of kept records worth reporting (e.g. ``unparseable_answers``)."""

    def reject(self, field_name: str) -> None:
        self.rejected += 1
        self.rejects_by_field[field_name] = self.rejects_by_field.get(field_name, 0) + 1

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
