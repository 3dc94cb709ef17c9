"""Build the real-data domain-routing dataset from the shared data folder (no Ray needed).

    python jobs/make_routing_data.py [--config jobs/configs/make_routing_data.yaml] [shared_dir=DIR] \
        [out_dir=DIR] [overwrite=true] [data.max_per_source_split=400] [data.sources=[vqa_rad,pathvqa]]

One labelled Sample (``answer`` = domain) per distinct real image, official splits kept, no image in two
splits, capped per source and split; writes ``samples_{train,val,test}.parquet`` + ``summary.json`` into
``out_dir`` (rules in :mod:`medrag_ray.data.routing`). About 30 s on 2 cores, mostly decoding the images
once to hash their pixels.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from medrag_ray.config import ConfigError, MakeRoutingDataConfig, parse_job_args
from medrag_ray.data.routing import build_routing_dataset, format_counts, write_routing_dataset
from medrag_ray.utils import check_writable, setup_logging, shared_data_dir

logger = logging.getLogger("jobs.make_routing_data")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "make_routing_data.yaml"


def parse_args(argv: Sequence[str] | None) -> MakeRoutingDataConfig:
    return parse_job_args(MakeRoutingDataConfig, argv, DEFAULT_CONFIG)


def resolve_shared_dir(cfg: MakeRoutingDataConfig) -> Path:
    """``cfg.shared_dir`` or the default real-data folder; neither present is an error naming the remedy."""
    if cfg.shared_dir:
        path = Path(cfg.shared_dir)
        if not path.is_dir():
            raise ConfigError(f"shared_dir={cfg.shared_dir!r} is not a directory; pass the real-data folder")
        return path
    found = shared_data_dir()
    if found is None:
        raise ConfigError(
            "the real-data folder was not found: set MEDRAG_SHARED_DATA=<folder> or put it at ../shared/data "
            "beside the checkout (or pass shared_dir=<folder>)"
        )
    return found


def main(cfg: MakeRoutingDataConfig) -> Path:
    """Build the dataset of ``cfg.data`` from the shared folder and write it to ``cfg.out_dir``; returns it."""
    shared = resolve_shared_dir(cfg)
    check_writable(cfg.out_dir, cfg.overwrite)  # fail before decoding thousands of images, not after
    start = time.perf_counter()
    ds = build_routing_dataset(cfg.data, shared)
    out = write_routing_dataset(ds, cfg.out_dir, overwrite=cfg.overwrite)
    for line in format_counts(ds.summary):
        logger.info("%s", line)
    logger.info("wrote %s in %.1fs", out, time.perf_counter() - start)
    return out


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
