"""Generate the embedded synthetic multi-domain dataset (images, reports, yes/no VQA, retrieval corpus).

    python jobs/make_data.py [--config jobs/configs/make_data.yaml] [out_dir=DIR] [overwrite=true] \
        [data.n_per_domain=1000] [data.image_size=128] [data.domains=[radiology,pathology]]

Writes ``samples_{train,val,test}.parquet``, ``corpus.parquet`` and ``manifest.json`` into ``out_dir``
(see :mod:`medrag_ray.data.synthetic`). The generation is single-process and vectorised (seconds for the
default size), so this job needs no Ray; under ``ray job submit`` give an absolute ``out_dir``.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from medrag_ray.config import MakeDataConfig, parse_job_args
from medrag_ray.data.synthetic import generate, write_dataset
from medrag_ray.utils import check_writable, setup_logging

logger = logging.getLogger("jobs.make_data")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "make_data.yaml"


def parse_args(argv: Sequence[str] | None) -> MakeDataConfig:
    return parse_job_args(MakeDataConfig, argv, DEFAULT_CONFIG)


def main(cfg: MakeDataConfig) -> Path:
    """Generate the dataset described by ``cfg.data`` and write it to ``cfg.out_dir``; returns that dir."""
    check_writable(cfg.out_dir, cfg.overwrite)  # fail before generating, not after
    start = time.perf_counter()
    ds = generate(cfg.data)
    out = write_dataset(ds, cfg.out_dir, overwrite=cfg.overwrite)
    counts = ds.counts()
    for domain, by_split in counts["samples"].items():
        logger.info("%s: cases %s, samples %s", domain, counts["cases"][domain], by_split)
    logger.info(
        "wrote %s in %.1fs: %s samples per split, %d corpus documents",
        out,
        time.perf_counter() - start,
        counts["samples_per_split"],
        len(ds.corpus),
    )
    return out


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
