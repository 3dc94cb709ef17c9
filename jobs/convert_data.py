"""Convert one real source, unchanged, into a Parquet file of schema records (no Ray needed).

    python jobs/convert_data.py [--config jobs/configs/convert_data.yaml] source=pathvqa limit=100

Writes ``<out>.parquet``, ``<out>.summary.json`` (counts), ``<out>.missing_images.jsonl`` and, with
``skip_bad=true``, ``<out>.rejects.jsonl``. The logic lives in :mod:`medrag_ray.data.readers.convert`.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrag_ray.config import ConfigError, ConvertDataConfig, parse_job_args
from medrag_ray.data.readers import ConvertResult, convert_source, default_source_path, source_spec
from medrag_ray.utils import setup_logging, shared_data_dir

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "convert_data.yaml"


def parse_args(argv: Sequence[str] | None) -> ConvertDataConfig:
    return parse_job_args(ConvertDataConfig, argv, DEFAULT_CONFIG)


def reader_options(cfg: ConvertDataConfig) -> dict[str, Any]:
    """The config's reader options that the source takes; an explicitly set one it lacks is an error."""
    takes = set(source_spec(cfg.source).options())
    options: dict[str, Any] = {}
    for name in ("image_root", "domain", "split"):
        value = getattr(cfg, name)
        if value:
            if name not in takes:
                raise ConfigError(f"{name}={value!r} is set but source {cfg.source!r} does not take it; unset it")
            options[name] = value
    for name in ("check_images", "embed_images"):
        if name in takes:
            options[name] = getattr(cfg, name)
    return options


def input_path(cfg: ConvertDataConfig) -> Path:
    if cfg.input_path:
        return Path(cfg.input_path)
    default = default_source_path(cfg.source, shared_data_dir())
    if default is None:
        raise ConfigError(
            "input_path is empty and the shared data folder (../shared/data or $MEDRAG_SHARED_DATA) was not "
            "found; pass input_path=<file or folder of the source>"
        )
    return default


def main(cfg: ConvertDataConfig) -> ConvertResult:
    return convert_source(
        cfg.source,
        input_path(cfg),
        cfg.output_path(),
        skip_bad=cfg.skip_bad,
        rejects_path=cfg.rejects_path or None,
        missing_images_path=cfg.missing_images_path or None,
        limit=cfg.limit,
        options=reader_options(cfg),
    )


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
