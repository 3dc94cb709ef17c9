"""PathVQA reader: ``qa.jsonl`` + ``images/*.jpg`` -> :class:`Sample` (pathology).

The file has no split, so one is assigned **by hashing the image** (:func:`pathvqa_split`): the SHA-256
of the image file name (its content hash in this release) mapped to [0, 1) falls in train / val / test
with fractions 80 / 10 / 10. Every question on one image lands in the same split, so no image leaks
across splits, and the assignment does not depend on file order or on the other records.

* id ``pathvqa/<record index>`` (0-based index of the record among the non-blank lines of ``qa.jsonl``;
  the file has no question id);
* answers normalized with :func:`normalize_yes_no` in ``exact`` mode (``"no hyperplasia"`` stays open);
* meta: ``question_type``, ``source_answer_type``, ``answer_raw``, ``image``;
* images resolve against ``image_root`` (default: the folder of ``qa.jsonl``; the file's paths start
  with ``images/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

from medrag_ray.data.readers.common import (
    MissingImageWriter,
    OnError,
    PathLike,
    RawRecord,
    ReadContext,
    RejectWriter,
    clean_vqa_fields,
    hash_fraction,
    images_beside,
    iter_jsonl,
    optional_text,
    require_mapping,
    require_text,
)
from medrag_ray.data.schema import ReadStats, Sample, dumps_meta

SOURCE = "pathvqa"
DOMAIN = "pathology"
PATHVQA_SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


def pathvqa_split(image: str, fractions: tuple[float, float, float] = PATHVQA_SPLIT_FRACTIONS) -> str:
    """The split of every question on ``image``: hash of the image file name -> train/val/test."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    u = hash_fraction(Path(image).name)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def _convert(
    raw: RawRecord, *, image_root: PathLike | None, fractions: tuple[float, float, float], ctx: ReadContext
) -> Sample:
    data = require_mapping(raw)
    image = require_text(data, "image")
    qa = clean_vqa_fields(data)
    ref = ctx.image(image, [images_beside(raw.file, image_root, folder="")], field_name="image")
    meta = {
        "question_type": optional_text(data, "question_type"),
        "source_answer_type": optional_text(data, "answer_type").upper(),
        "answer_raw": data.get("answer"),
        "image": image,
        "record_index": raw.index,
    }
    return Sample(
        id=f"{SOURCE}/{raw.index}",
        domain=DOMAIN,
        split=pathvqa_split(image, fractions),
        source=SOURCE,
        meta=dumps_meta(meta),
        **qa,
        **ref.fields(),
    )


def iter_pathvqa(
    path: PathLike,
    *,
    image_root: PathLike | None = None,
    split_fractions: tuple[float, float, float] = PATHVQA_SPLIT_FRACTIONS,
    check_images: bool = True,
    embed_images: bool = False,
    stats: ReadStats | None = None,
    on_error: OnError = "raise",
    rejects: RejectWriter | None = None,
    missing_images: MissingImageWriter | None = None,
    limit: int = 0,
) -> Iterator[Sample]:
    """PathVQA QA pairs from ``qa.jsonl`` (or the folder holding it), with a hash-of-image split."""
    pathvqa_split("x", split_fractions)  # validates the fractions now, not at the first record
    path = Path(path)
    file = path / "qa.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{SOURCE}: {file} does not exist; pass qa.jsonl or the folder holding it")
    ctx = ReadContext(
        SOURCE, stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=check_images, embed_images=embed_images, limit=limit,
    )  # fmt: skip
    convert = partial(_convert, image_root=image_root, fractions=split_fractions, ctx=ctx)
    return ctx.read_files([file], iter_jsonl, convert)
