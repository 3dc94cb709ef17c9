"""VQA-RAD reader: ``trainset.json`` / ``testset.json`` + ``images/*.jpg`` -> :class:`Sample` (radiology).

* split from the file name (``trainset`` -> train, ``testset`` -> test; ``split=`` overrides);
* id ``vqa_rad/<qid>``; answers normalized with :func:`normalize_yes_no` in ``exact`` mode: a yes/no
  answer (any case) becomes ``"yes"``/``"no"`` with ``answer_type="closed"``; every other answer is
  ``"open"`` and kept verbatim (stripped). VQA-RAD's own ``answer_type`` also marks choice questions
  ("heterogeneous or homogeneous?") CLOSED; it is kept in ``meta["source_answer_type"]``;
* meta: ``organ`` (HEAD/CHEST/ABD), ``question_type``, ``phrase_type``, ``answer_raw``, ``image_name``;
* images resolve against ``image_root`` (default: the ``images/`` folder beside the JSON file).
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
    check_split,
    clean_vqa_fields,
    collect_files,
    images_beside,
    iter_json_array,
    optional_text,
    require_id,
    require_mapping,
    require_text,
    split_from_name,
)
from medrag_ray.data.schema import ReadStats, RecordError, Sample, dumps_meta

SOURCE = "vqa_rad"
DOMAIN = "radiology"


def _convert(raw: RawRecord, *, image_root: PathLike | None, split: str | None, ctx: ReadContext) -> Sample:
    data = require_mapping(raw)
    sp = split or split_from_name(raw.file.stem)
    if sp is None:
        raise RecordError("split", f"cannot tell train/test from the file name {raw.file.name}; pass split=...")
    qid = require_id(data, ("qid",))
    qa = clean_vqa_fields(data)
    image_name = require_text(data, "image_name")
    ref = ctx.image(image_name, [images_beside(raw.file, image_root)], field_name="image_name")
    meta = {
        "qid": qid,
        "organ": optional_text(data, "image_organ"),
        "question_type": optional_text(data, "question_type"),
        "phrase_type": optional_text(data, "phrase_type"),
        "source_answer_type": optional_text(data, "answer_type").upper(),
        "answer_raw": data.get("answer"),
        "image_name": image_name,
    }
    return Sample(
        id=f"{SOURCE}/{qid}",
        domain=DOMAIN,
        split=sp,
        source=SOURCE,
        meta=dumps_meta(meta),
        **qa,
        **ref.fields(),
    )


def iter_vqa_rad(
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
    """VQA-RAD QA pairs from a folder (``trainset.json`` then ``testset.json``) or one of those files."""
    check_split(split, SOURCE)
    path = Path(path)
    if path.is_dir():
        files = [path / name for name in ("trainset.json", "testset.json") if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"{SOURCE}: no trainset.json / testset.json in {path}; check the input path")
    else:
        files = collect_files(path, ["*.json"], SOURCE)
    ctx = ReadContext(
        SOURCE, stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=check_images, embed_images=embed_images, limit=limit,
    )  # fmt: skip
    return ctx.read_files(files, iter_json_array, partial(_convert, image_root=image_root, split=split, ctx=ctx))
