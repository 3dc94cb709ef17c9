"""MedPix 2.0 readers (radiology, CT and MR).

``descriptions_<split>.jsonl`` holds one record per image (``image`` id, ``U_id`` case id, ``Type``
CT/MR, ``Location``, ``Location Category`` and a ``Description`` with ``Caption``, ``Modality``,
``Plane``, ``Age``, ``Sex``, ``ACR Codes``, ``Figure Part``); ``data_<split>.jsonl`` one record per case
(``U_id``, ``TAC`` = CT image ids, ``MRI`` = MR image ids, ``Case`` with History / Exam / Findings /
Case Diagnosis / Discussion / ..., ``Topic`` with the disease discussion). Images are
``images/<image id>.png``.

* :func:`iter_medpix` -> :class:`Sample` per image, ``answer_type="report"``, ``text`` = the caption;
* :func:`iter_medpix_corpus` -> :class:`CorpusDoc` per image (caption text);
* :func:`iter_medpix_cases` -> :class:`CorpusDoc` per case: ``text`` joins History, Findings,
  Diagnosis and Discussion (empty sections left out); the image ids go to meta, the first one (CT
  first, then MR) is the document's image.

The split comes from the file name (``*_test`` -> test: the files here are MedPix 2.0's own *test*
split) and defaults to ``test`` when the name has none; ``split=`` overrides it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from medrag_ray.data.readers.common import (
    NO_IMAGE,
    MissingImageWriter,
    OnError,
    PathLike,
    RawRecord,
    ReadContext,
    RejectWriter,
    images_beside,
    iter_jsonl,
    optional_text,
    require_mapping,
    require_text,
    source_files,
    split_from_name,
)
from medrag_ray.data.schema import CorpusDoc, ReadStats, RecordError, Sample, dumps_meta

SOURCE = "medpix2"
DOMAIN = "radiology"
DEFAULT_SPLIT = "test"
CASE_SECTIONS: tuple[tuple[str, str], ...] = (
    ("History", "History"),
    ("Findings", "Findings"),
    ("Case Diagnosis", "Diagnosis"),
    ("Discussion", "Discussion"),
)
"""(field in ``Case``, heading in the document text) of the sections a case document is made of."""


def _image_file(image_id: str) -> str:
    return image_id if Path(image_id).suffix else f"{image_id}.png"


def _split(file: Path, split: str | None) -> str:
    return split or split_from_name(file.stem) or DEFAULT_SPLIT


def _description(raw: RawRecord, image_root: PathLike | None, split: str | None, ctx: ReadContext) -> dict[str, Any]:
    """The record fields (all but ``answer_type``) of one descriptions record: one image and its caption."""
    data = require_mapping(raw)
    image_id = require_text(data, "image")
    desc = data.get("Description")
    if not isinstance(desc, Mapping):
        raise RecordError("Description", f"must be an object holding the Caption, got {desc!r}"[:200])
    caption = require_text(desc, "Caption", hint="the per-image caption is the document text")
    ref = ctx.image(_image_file(image_id), [images_beside(raw.file, image_root)], field_name="image")
    meta = {
        "image_id": image_id,
        "case_id": optional_text(data, "U_id"),
        "type": optional_text(data, "Type"),
        "location": optional_text(data, "Location"),
        "location_category": optional_text(data, "Location Category"),
        "modality": optional_text(desc, "Modality"),
        "plane": optional_text(desc, "Plane"),
        "age": desc.get("Age"),
        "sex": desc.get("Sex"),
        "acr_codes": desc.get("ACR Codes"),
        "figure_part": desc.get("Figure Part"),
    }
    return {
        "id": f"{SOURCE}/{image_id}",
        "domain": DOMAIN,
        "split": _split(raw.file, split),
        "source": SOURCE,
        "text": caption,
        "meta": dumps_meta(meta),
        **ref.fields(),
    }


def _convert_sample(raw: RawRecord, *, image_root: PathLike | None, split: str | None, ctx: ReadContext) -> Sample:
    return Sample(answer_type="report", **_description(raw, image_root, split, ctx))


def _convert_doc(raw: RawRecord, *, image_root: PathLike | None, split: str | None, ctx: ReadContext) -> CorpusDoc:
    return CorpusDoc(**_description(raw, image_root, split, ctx))


def _id_list(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RecordError(key, f"must be a list of image ids, got {value!r}"[:200])
    return [v.strip() for v in value]


def _convert_case(raw: RawRecord, *, image_root: PathLike | None, split: str | None, ctx: ReadContext) -> CorpusDoc:
    data = require_mapping(raw)
    case_id = require_text(data, "U_id")
    case = data.get("Case")
    if not isinstance(case, Mapping):
        raise RecordError("Case", f"must be an object with the case report sections, got {case!r}"[:200])
    parts = [(heading, optional_text(case, key)) for key, heading in CASE_SECTIONS]
    text = "\n".join(f"{heading}: {body}" for heading, body in parts if body)
    if not text:
        names = [key for key, _ in CASE_SECTIONS]
        raise RecordError("Case", f"has none of the sections {names} filled; a case document needs one")
    ct_images, mr_images = _id_list(data, "TAC"), _id_list(data, "MRI")
    images = ct_images + mr_images
    ref = NO_IMAGE
    if images:
        roots = [images_beside(raw.file, image_root)]
        ref = ctx.image(_image_file(images[0]), roots, field_name="TAC" if ct_images else "MRI")
    topic = data.get("Topic") if isinstance(data.get("Topic"), Mapping) else {}
    meta = {
        "case_id": case_id,
        "images": images,
        "ct_images": ct_images,
        "mr_images": mr_images,
        "title": optional_text(case, "Title"),
        "diagnosis": optional_text(case, "Case Diagnosis"),
        "diagnosis_by": optional_text(case, "Diagnosis By"),
        "differential_diagnosis": optional_text(case, "Differential Diagnosis"),
        "exam": optional_text(case, "Exam"),
        "treatment": optional_text(case, "Treatment & Follow Up"),
        "topic": dict(topic),
    }
    return CorpusDoc(
        id=f"{SOURCE}/case/{case_id}",
        domain=DOMAIN,
        split=_split(raw.file, split),
        source=f"{SOURCE}/cases",
        text=text,
        meta=dumps_meta(meta),
        **ref.fields(),
    )


def _files(path: PathLike, prefix: str, what: str, split: str | None) -> list[Path]:
    """The ``<prefix>_*.jsonl`` files of a folder, or the given file (after checking ``split``)."""
    return source_files(what, path, [f"{prefix}_*.jsonl" if Path(path).is_dir() else "*.jsonl"], split=split)


def iter_medpix(
    path: PathLike,
    *,
    image_root: PathLike | None = None,
    split: str | None = None,
    check_images: bool = True,
    embed_images: bool = False,
    stats: ReadStats | None = None,
    on_error: OnError = "raise",
    rejects: RejectWriter | None = None,
    missing_images: MissingImageWriter | None = None,
    limit: int = 0,
) -> Iterator[Sample]:
    """One report Sample per MedPix image (``descriptions_*.jsonl`` or the ``medpix2`` folder)."""
    files = _files(path, "descriptions", "medpix", split)
    ctx = ReadContext(
        "medpix", stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=check_images, embed_images=embed_images, limit=limit,
    )  # fmt: skip
    return ctx.read_files(files, iter_jsonl, partial(_convert_sample, image_root=image_root, split=split, ctx=ctx))


def iter_medpix_corpus(
    path: PathLike,
    *,
    image_root: PathLike | None = None,
    split: str | None = None,
    check_images: bool = True,
    embed_images: bool = False,
    stats: ReadStats | None = None,
    on_error: OnError = "raise",
    rejects: RejectWriter | None = None,
    missing_images: MissingImageWriter | None = None,
    limit: int = 0,
) -> Iterator[CorpusDoc]:
    """One caption CorpusDoc per MedPix image (``descriptions_*.jsonl`` or the ``medpix2`` folder)."""
    files = _files(path, "descriptions", "medpix_corpus", split)
    ctx = ReadContext(
        "medpix_corpus", stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=check_images, embed_images=embed_images, limit=limit,
    )  # fmt: skip
    return ctx.read_files(files, iter_jsonl, partial(_convert_doc, image_root=image_root, split=split, ctx=ctx))


def iter_medpix_cases(
    path: PathLike,
    *,
    image_root: PathLike | None = None,
    split: str | None = None,
    check_images: bool = True,
    embed_images: bool = False,
    stats: ReadStats | None = None,
    on_error: OnError = "raise",
    rejects: RejectWriter | None = None,
    missing_images: MissingImageWriter | None = None,
    limit: int = 0,
) -> Iterator[CorpusDoc]:
    """One case-report CorpusDoc per MedPix case (``data_*.jsonl`` or the ``medpix2`` folder)."""
    files = _files(path, "data", "medpix_cases", split)
    ctx = ReadContext(
        "medpix_cases", stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=check_images, embed_images=embed_images, limit=limit,
    )  # fmt: skip
    return ctx.read_files(files, iter_jsonl, partial(_convert_case, image_root=image_root, split=split, ctx=ctx))
