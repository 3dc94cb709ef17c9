"""Convert one source into a Parquet file of schema records, with side files and a JSON summary.

This is the logic of ``jobs/convert_data.py`` (plain Python, no Ray): read a source with
:func:`~medrag_ray.data.readers.registry.read_source`, write the kept records with
:func:`~medrag_ray.data.schema.write_parquet`, and write next to the output:

* ``<out>.rejects.jsonl`` (``skip_bad`` only): one line per rejected record with its reason;
* ``<out>.missing_images.jsonl``: one line per kept record whose image file was not found;
* ``<out>.summary.json``: the counts (read / kept / rejected by field / missing images / reader counters).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medrag_ray.data.readers.common import MissingImageWriter, PathLike, RejectWriter
from medrag_ray.data.readers.registry import read_source, source_spec
from medrag_ray.data.schema import ReadStats, write_parquet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion did; also written as ``<out>.summary.json``."""

    source: str
    record_class: str
    input_path: str
    out_path: str
    rows_written: int
    read: int
    kept: int
    rejected: int
    missing_images: int
    rejects_by_field: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    rejects_path: str = ""
    missing_images_path: str = ""
    summary_path: str = ""
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def side_file_paths(out_path: PathLike) -> dict[str, Path]:
    """Default paths of the side files next to ``out_path`` (``x.parquet`` -> ``x.rejects.jsonl`` ...)."""
    out = Path(out_path)
    return {
        "rejects": out.with_suffix(".rejects.jsonl"),
        "missing_images": out.with_suffix(".missing_images.jsonl"),
        "summary": out.with_suffix(".summary.json"),
    }


def convert_source(
    source: str,
    input_path: PathLike,
    out_path: PathLike,
    *,
    skip_bad: bool = False,
    rejects_path: PathLike | None = None,
    missing_images_path: PathLike | None = None,
    limit: int = 0,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ConvertResult:
    """Read ``source`` from ``input_path`` and write its records to the Parquet file ``out_path``.

    ``skip_bad`` rejects bad records into ``rejects_path`` and goes on; without it the first bad record
    raises :class:`~medrag_ray.data.schema.RecordError` and nothing is written. ``limit`` > 0 stops after
    that many kept records. ``options`` go to the reader (``image_root``, ``domain``, ``split``, ...).
    """
    spec = source_spec(source)
    out = Path(out_path)
    if out.suffix != ".parquet":
        raise ValueError(f"out_path {out} must end with .parquet")
    defaults = side_file_paths(out)
    rejects_file = Path(rejects_path) if rejects_path else defaults["rejects"]
    missing_file = Path(missing_images_path) if missing_images_path else defaults["missing_images"]
    opts = dict(options or {})
    stats = ReadStats()
    start = time.perf_counter()
    rejects = RejectWriter(rejects_file) if skip_bad else None
    missing = MissingImageWriter(missing_file)
    try:
        records = read_source(
            source,
            input_path,
            stats=stats,
            on_error="skip" if skip_bad else "raise",
            rejects=rejects,
            missing_images=missing,
            limit=limit,
            **opts,
        )
        kept = list(tqdm(records, desc=f"convert {source}", unit="rec", disable=not progress))
    finally:
        missing.close()
        if rejects is not None:
            rejects.close()
    rows = write_parquet(kept, spec.record_cls, out)
    result = ConvertResult(
        source=source,
        record_class=spec.record_cls.__name__,
        input_path=str(input_path),
        out_path=str(out),
        rows_written=rows,
        read=stats.read,
        kept=stats.kept,
        rejected=stats.rejected,
        missing_images=stats.missing_images,
        rejects_by_field=dict(stats.rejects_by_field),
        counters=dict(stats.counters),
        rejects_path=str(rejects_file) if skip_bad else "",
        missing_images_path=str(missing_file),
        summary_path=str(defaults["summary"]),
        seconds=round(time.perf_counter() - start, 3),
        options={k: str(v) if isinstance(v, Path) else v for k, v in opts.items()},
    )
    defaults["summary"].write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
    logger.info(
        "%s -> %s: %d %s rows (read %d, rejected %d, missing images %d); summary %s",
        source, out, rows, result.record_class, stats.read, stats.rejected, stats.missing_images,
        defaults["summary"],
    )  # fmt: skip
    return result
