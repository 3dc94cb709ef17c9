"""Readers for the public MMed-RAG data files (read unchanged; their images are not shipped).

Layout (``mmed_rag/``) and what each reader makes of it:

* ``training/retriever/<domain>/*.json`` -> :class:`CorpusDoc`. The domain is the folder name (the files
  have no domain field). Records differ per source: text under ``report`` (IU-Xray, MIMIC, Harvard,
  PMC-OA) or ``caption`` (Quilt-1M); image under ``image_path`` (a string or a list: the first one is
  ``image_path``, all of them go to ``meta["images"]``) or ``image``; an optional ``image_root`` (the
  authors' disk) per record. Ids are ints or strings; the split comes from the file name
  (``*_train`` / ``*_val*``), the record's own ``split`` (its original dataset's split) stays in meta.
* ``training/alignment/<domain>/*.json`` -> :class:`PreferencePair`. LLaVA-style ``conversations``
  (chosen) and ``rejected_conversations``: the human turn is the prompt (``prompt`` drops the leading
  ``<image>\\n`` line, ``meta["prompt_raw"]`` keeps it verbatim), the gpt turn the answer (verbatim).
  Flags ``rejected_noised`` / ``chosen_noised`` default to 0. **pair_type rule**: ``"cm"`` when
  ``rejected_noised == 1`` (the rejected side uses the noised image: MMed-RAG's cross-modality pairs
  D_cm, its stage-1 DPO data), else ``"unknown"`` -- the rest is stage-2 data, a mix of D_oa1 (retrieval
  helps) and D_oa2 (retrieval hurts) that the files do not tell apart. Source ids repeat (one image gives
  several pairs), so ids are ``mmed_rag/<file>/<record index>`` with the source id in meta.
* ``test/vqa/<dataset>_test.jsonl`` -> :class:`Sample` (``split="test"``). The ``<image>`` tag is removed
  from the question (raw question in meta). Answers are normalized with
  :func:`normalize_yes_no` (``leading`` mode): a yes/no answer gives ``answer_type="closed"`` and
  ``answer`` ``"yes"``/``"no"``; anything else is *unparseable*: kept as ``answer_type="open"`` with the
  stripped raw answer, counted in ``stats.counters["unparseable_answers"]`` and logged
  (``meta["answer_parsed"]`` says which). The raw answer is always in ``meta["answer_raw"]``.
  The files are evaluated as published, so rows that are not usable VQA items are *kept*, counted and
  logged rather than rejected: an empty answer (iuxray 124) or a question with no words (iuxray 499, 998
  hold only ``<image>``, 2496 only ``")"``) gives ``answer_type=""`` (``meta["question_empty"]``,
  ``stats.counters["empty_questions"]``). A missing or non-string question/answer is still an error.
* ``test/report/<dataset>_test.json`` -> :class:`Sample` (``answer_type="report"``, ``text`` = the report or
  caption, ``split="test"``; the record's own ``split`` stays in meta as ``source_split``).

Test files are mapped to domains by dataset (:data:`MMED_RAG_DATASET_DOMAINS`). Image paths are resolved
against ``image_root`` (when a user has the images) and then the record's own ``image_root``; a missing
image keeps the record with ``image_available=False`` (see :mod:`.common`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from medrag_ray.data.readers.common import (
    ImageRef,
    MissingImageWriter,
    OnError,
    PathLike,
    RawRecord,
    ReadContext,
    RejectWriter,
    image_list,
    iter_json_array,
    iter_jsonl,
    normalize_yes_no,
    optional_text,
    require_id,
    require_mapping,
    require_text,
    source_files,
    split_from_name,
    strip_image_tag,
    strip_leading_image_tag,
)
from medrag_ray.data.schema import DOMAINS, CorpusDoc, PreferencePair, ReadStats, RecordError, Sample, dumps_meta

logger = logging.getLogger(__name__)

MMED_RAG_DATASET_DOMAINS: dict[str, str] = {
    "iuxray": "radiology",
    "mimic": "radiology",
    "harvard": "ophthalmology",
    "pmc-oa": "pathology",
    "quilt-1m": "pathology",
}
"""Domain of each MMed-RAG test dataset (test files are named ``<dataset>_test.json[l]``)."""

UNPARSEABLE = "unparseable_answers"
"""``ReadStats.counters`` key: MMed-RAG VQA answers that are not a yes/no answer."""
EMPTY_QUESTIONS = "empty_questions"
"""``ReadStats.counters`` key: MMed-RAG VQA rows whose question has no words once ``<image>`` is removed."""

_TEXT_KEYS = ("report", "caption")
_IMAGE_KEYS = ("image_path", "image")


# ------------------------------------------------------------------------------------ helpers


def _folder_domain(file: Path, domain: str | None) -> str:
    if domain is not None:
        return domain
    name = file.parent.name
    if name not in DOMAINS:
        raise RecordError(
            "domain",
            f"folder {name!r} of {file.name} is not a known domain {list(DOMAINS)}; put the file under "
            "training/<kind>/<domain>/ or pass domain=...",
        )
    return name


def dataset_of(file: Path) -> str:
    """``iuxray_test.jsonl`` -> ``iuxray``; ``quilt-1m_test.json`` -> ``quilt-1m``."""
    return re.sub(r"[_-](train|val|test)$", "", file.stem)


def _dataset_domain(file: Path, domain: str | None) -> str:
    if domain is not None:
        return domain
    dataset = dataset_of(file)
    if dataset not in MMED_RAG_DATASET_DOMAINS:
        raise RecordError(
            "domain",
            f"dataset {dataset!r} (from the file name {file.name}) has no domain; known datasets: "
            f"{sorted(MMED_RAG_DATASET_DOMAINS)}; name the file <dataset>_test.* or pass domain=...",
        )
    return MMED_RAG_DATASET_DOMAINS[dataset]


def _text_field(data: Mapping[str, Any]) -> tuple[str, str]:
    key = next((k for k in _TEXT_KEYS if k in data), _TEXT_KEYS[0])
    return key, require_text(data, key, hint="expected the text under 'report' or 'caption'")


def _record_root(data: Mapping[str, Any]) -> str | None:
    root = data.get("image_root")
    if root is not None and not isinstance(root, str):
        raise RecordError("image_root", f"must be a string path, got {root!r}")
    return root or None


def _extras(data: Mapping[str, Any], used: set[str]) -> dict[str, Any]:
    """Unconsumed source fields for meta; the empty key (a pandas index column) becomes ``unnamed_index``."""
    extras = {k: v for k, v in data.items() if k not in used and k != ""}
    if "" in data and "" not in used:
        extras["unnamed_index"] = data[""]
    return extras


def _record_image(
    data: Mapping[str, Any], keys: tuple[str, ...], image_root: PathLike | None, ctx: ReadContext
) -> tuple[str, list[str], str | None, ImageRef]:
    """``(image key, image paths, record's image_root, first image)``; the image is resolved against
    ``image_root`` then the record's own ``image_root``, and checked (see :meth:`ReadContext.image`)."""
    image_key, images = image_list(data, keys)
    record_root = _record_root(data)
    return image_key, images, record_root, ctx.image(images[0], [image_root, record_root], field_name=image_key)


def _text_record(
    raw: RawRecord, data: Mapping[str, Any], image_root: PathLike | None, ctx: ReadContext, **meta: Any
) -> dict[str, Any]:
    """The fields shared by retriever docs and report-test samples: id, source, text (report or caption),
    image and meta (unconsumed source fields, the source id and split, the images, and ``meta``)."""
    source_id = require_id(data, ("id", ""))
    text_key, text = _text_field(data)
    image_key, images, record_root, ref = _record_image(data, _IMAGE_KEYS, image_root, ctx)
    extras = _extras(data, {"id", text_key, image_key, "image_root", "split"} | ({""} if "id" not in data else set()))
    extras.update(
        source_id=source_id,
        record_index=raw.index,
        images=images,
        image_root=record_root,
        source_split=data.get("split"),
        text_field=text_key,
        **meta,
    )
    return {
        "id": f"mmed_rag/{raw.file.stem}/{source_id}",
        "source": f"mmed_rag/{raw.file.stem}",
        "text": text,
        "meta": dumps_meta(extras),
        **ref.fields(),
    }


# ---------------------------------------------------------------------------------- retriever


def _convert_retriever(
    raw: RawRecord, *, image_root: PathLike | None, domain: str | None, split: str | None, ctx: ReadContext
) -> CorpusDoc:
    data = require_mapping(raw)
    dom = _folder_domain(raw.file, domain)
    sp = split or split_from_name(raw.file.stem)
    if sp is None:
        raise RecordError(
            "split", f"cannot tell train/val/test from the file name {raw.file.name}; pass split=..."
        )
    return CorpusDoc(domain=dom, split=sp, **_text_record(raw, data, image_root, ctx))


def iter_mmed_rag_retriever(
    path: PathLike,
    *,
    image_root: PathLike | None = None,
    domain: str | None = None,
    split: str | None = None,
    check_images: bool = True,
    embed_images: bool = False,
    stats: ReadStats | None = None,
    on_error: OnError = "raise",
    rejects: RejectWriter | None = None,
    missing_images: MissingImageWriter | None = None,
    limit: int = 0,
) -> Iterator[CorpusDoc]:
    """Retriever corpora (``training/retriever/<domain>/*.json``, a folder or one file) as CorpusDocs."""
    files = source_files("mmed_rag_retriever", path, ["*.json"], split=split, domain=domain)
    ctx = ReadContext(
        "mmed_rag_retriever", stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=check_images, embed_images=embed_images, limit=limit,
    )  # fmt: skip
    convert = partial(_convert_retriever, image_root=image_root, domain=domain, split=split, ctx=ctx)
    return ctx.read_files(files, iter_json_array, convert)


# ---------------------------------------------------------------------------------- alignment


def _turns(data: Mapping[str, Any], key: str) -> tuple[str, str]:
    """``(human text, gpt text)`` of a two-turn LLaVA conversation, verbatim."""
    turns = data.get(key)
    if turns is None:
        raise RecordError(key, "is missing (expected a list of {'from', 'value'} turns)")
    if not isinstance(turns, list) or len(turns) != 2:
        got = f"{len(turns)} turns" if isinstance(turns, list) else type(turns).__name__
        raise RecordError(key, f"must hold exactly one human and one gpt turn, got {got}")
    roles = []
    values = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise RecordError(key, f"turn {i} must be an object with a string 'value', got {turn!r}"[:300])
        roles.append(turn.get("from"))
        values.append(turn["value"])
    if roles[0] not in ("human", "user") or roles[1] not in ("gpt", "assistant"):
        raise RecordError(key, f"turns must be human then gpt, got {roles}")
    for role, value in zip(("human", "gpt"), values, strict=True):
        if not value.strip():
            raise RecordError(key, f"the {role} turn is empty")
    return values[0], values[1]


def _flag(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key, 0)
    if isinstance(value, bool):
        return int(value)
    if value not in (0, 1) or not isinstance(value, int):
        raise RecordError(key, f"must be 0 or 1 (1 = that side uses the noised image), got {value!r}")
    return value


def _convert_alignment(
    raw: RawRecord, *, image_root: PathLike | None, domain: str | None, ctx: ReadContext
) -> PreferencePair:
    data = require_mapping(raw)
    dom = _folder_domain(raw.file, domain)
    prompt_raw, chosen = _turns(data, "conversations")
    rejected_prompt, rejected = _turns(data, "rejected_conversations")
    if rejected_prompt != prompt_raw:
        raise RecordError(
            "rejected_conversations",
            "its human turn differs from the one in 'conversations'; a pair must share one prompt",
        )
    prompt = strip_leading_image_tag(prompt_raw)
    if not prompt.strip():
        raise RecordError("conversations", "the human turn holds only the <image> tag, no prompt")
    rejected_noised = _flag(data, "rejected_noised")
    chosen_noised = _flag(data, "chosen_noised")
    image_key, images, record_root, ref = _record_image(data, ("image", "image_path"), image_root, ctx)
    source_id = data.get("id")
    meta = _extras(
        data,
        {"id", image_key, "image_root", "conversations", "rejected_conversations", "rejected_noised", "chosen_noised"},
    )
    meta.update(source_id=source_id, record_index=raw.index, prompt_raw=prompt_raw, images=images,
                image_root=record_root)  # fmt: skip
    return PreferencePair(
        id=f"mmed_rag/{raw.file.stem}/{raw.index}",
        domain=dom,
        source=f"mmed_rag/{raw.file.stem}",
        pair_type="cm" if rejected_noised == 1 else "unknown",
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        chosen_noised=chosen_noised,
        rejected_noised=rejected_noised,
        meta=dumps_meta(meta),
        **ref.fields(),
    )


def iter_mmed_rag_alignment(
    path: PathLike,
    *,
    image_root: PathLike | None = None,
    domain: str | None = None,
    check_images: bool = True,
    embed_images: bool = False,
    stats: ReadStats | None = None,
    on_error: OnError = "raise",
    rejects: RejectWriter | None = None,
    missing_images: MissingImageWriter | None = None,
    limit: int = 0,
) -> Iterator[PreferencePair]:
    """Alignment (DPO) data (``training/alignment/<domain>/*.json``) as PreferencePairs."""
    files = source_files("mmed_rag_alignment", path, ["*.json"], domain=domain)
    ctx = ReadContext(
        "mmed_rag_alignment", stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=check_images, embed_images=embed_images, limit=limit,
    )  # fmt: skip
    convert = partial(_convert_alignment, image_root=image_root, domain=domain, ctx=ctx)
    return ctx.read_files(files, iter_json_array, convert)


# ---------------------------------------------------------------------------------- test VQA


def _convert_vqa(
    raw: RawRecord, *, image_root: PathLike | None, domain: str | None, split: str, ctx: ReadContext
) -> Sample:
    data = require_mapping(raw)
    dom = _dataset_domain(raw.file, domain)
    qid = require_id(data, ("question_id", "id"))
    question_raw = data.get("question")
    if not isinstance(question_raw, str):
        got = "missing" if question_raw is None else repr(question_raw)
        raise RecordError("question", f"is {got}; expected a string")
    question = strip_image_tag(question_raw)
    has_question = any(ch.isalnum() for ch in question)
    answer_raw = data.get("answer")
    if not isinstance(answer_raw, str):
        got = "missing" if answer_raw is None else repr(answer_raw)
        raise RecordError("answer", f"is {got}; expected a string")
    normalized = normalize_yes_no(answer_raw, mode="leading")
    answer = normalized or answer_raw.strip()
    if not has_question or not answer:
        answer_type = ""  # not a usable VQA item (kept and counted, see the module docstring)
    else:
        answer_type = "closed" if normalized else "open"
    image_key, images, _, ref = _record_image(data, ("image", "image_path"), image_root, ctx)
    meta = _extras(data, {"question_id", "id", "question", "answer", image_key, "report", "text", "image_root"})
    meta.update(
        question_id=qid,
        question_raw=question_raw,
        answer_raw=answer_raw,
        answer_parsed=normalized is not None,
        question_empty=not has_question,
        images=images,
        dataset=dataset_of(raw.file),
    )
    if "text" in data:  # iuxray: the question with the [yes, no] instruction
        meta["prompt_text"] = data["text"]
    return Sample(
        id=f"mmed_rag/{raw.file.stem}/{qid}",
        domain=dom,
        split=split,
        source=f"mmed_rag/{raw.file.stem}",
        text=optional_text(data, "report"),
        question=question,
        answer=answer,
        answer_type=answer_type,
        meta=dumps_meta(meta),
        **ref.fields(),
    )


def _count_vqa_defects(stats: ReadStats, record: Sample, raw: RawRecord) -> None:
    meta = json.loads(record.meta)
    if meta["question_empty"]:
        stats.count(EMPTY_QUESTIONS)
        logger.info("%s %s: question %r has no words; kept as answer_type=''",
                    raw.file.name, raw.location, meta["question_raw"][:120])  # fmt: skip
    if not meta["answer_parsed"]:
        stats.count(UNPARSEABLE)
        logger.info("%s %s: answer %r is not a yes/no answer; kept as answer_type=%r",
                    raw.file.name, raw.location, meta["answer_raw"][:120], record.answer_type)  # fmt: skip


def iter_mmed_rag_vqa(
    path: PathLike,
    *,
    image_root: PathLike | None = None,
    domain: str | None = None,
    split: str = "test",
    check_images: bool = True,
    embed_images: bool = False,
    stats: ReadStats | None = None,
    on_error: OnError = "raise",
    rejects: RejectWriter | None = None,
    missing_images: MissingImageWriter | None = None,
    limit: int = 0,
) -> Iterator[Sample]:
    """Closed VQA test files (``test/vqa/<dataset>_test.jsonl``) as Samples; counts unparseable answers."""
    files = source_files("mmed_rag_vqa", path, ["*.jsonl"], split=split, domain=domain)
    ctx = ReadContext(
        "mmed_rag_vqa", stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=check_images, embed_images=embed_images, limit=limit,
    )  # fmt: skip
    convert = partial(_convert_vqa, image_root=image_root, domain=domain, split=split, ctx=ctx)
    return ctx.read_files(files, iter_jsonl, convert, on_kept=partial(_count_vqa_defects, ctx.stats))


# -------------------------------------------------------------------------------- test report


def _convert_report(
    raw: RawRecord, *, image_root: PathLike | None, domain: str | None, split: str, ctx: ReadContext
) -> Sample:
    data = require_mapping(raw)
    dom = _dataset_domain(raw.file, domain)
    fields = _text_record(raw, data, image_root, ctx, dataset=dataset_of(raw.file))
    return Sample(domain=dom, split=split, answer_type="report", **fields)


def iter_mmed_rag_report(
    path: PathLike,
    *,
    image_root: PathLike | None = None,
    domain: str | None = None,
    split: str = "test",
    check_images: bool = True,
    embed_images: bool = False,
    stats: ReadStats | None = None,
    on_error: OnError = "raise",
    rejects: RejectWriter | None = None,
    missing_images: MissingImageWriter | None = None,
    limit: int = 0,
) -> Iterator[Sample]:
    """Report-generation test files (``test/report/<dataset>_test.json``) as Samples (answer_type report)."""
    files = source_files("mmed_rag_report", path, ["*.json"], split=split, domain=domain)
    ctx = ReadContext(
        "mmed_rag_report", stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=check_images, embed_images=embed_images, limit=limit,
    )  # fmt: skip
    convert = partial(_convert_report, image_root=image_root, domain=domain, split=split, ctx=ctx)
    return ctx.read_files(files, iter_json_array, convert)
