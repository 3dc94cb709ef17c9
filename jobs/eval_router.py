"""Domain-router accuracy on a labelled split: per-domain precision/recall, confusion, per-source accuracy.

    python jobs/eval_router.py [--config jobs/configs/eval_router.yaml] [router_dir=DIR] [dataset_dir=DIR] \
        [split=test] [device=cpu]

Reads ``<dataset_dir>/samples_<split>.parquet`` (the real-data routing set of
``jobs/make_routing_data.py`` by default; the synthetic dataset works too), routes every image and writes
``<out_dir>/router_<dataset dir name>.json`` / ``.md`` (``_<split>`` appended for a split other than test).
Examples of a domain the router does not know are counted separately (see
:mod:`medrag_ray.eval.router_eval`). A few thousand small images: one process, no Ray needed.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrag_ray.config import EvalRouterConfig, parse_job_args, to_dict
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.eval.outputs import write_json_and_markdown
from medrag_ray.eval.router_eval import (
    has_image,
    route_samples,
    router_markdown,
    router_report,
    unknown_domain_lines,
)
from medrag_ray.models.router import load_router
from medrag_ray.utils import setup_logging

logger = logging.getLogger("jobs.eval_router")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "eval_router.yaml"


def parse_args(argv: Sequence[str] | None) -> EvalRouterConfig:
    return parse_job_args(EvalRouterConfig, argv, DEFAULT_CONFIG)


def result_stem(cfg: EvalRouterConfig) -> str:
    """``router_<dataset dir name>`` (+ ``_<split>`` unless the split is test)."""
    name = Path(cfg.dataset_dir).resolve().name
    return f"router_{name}" if cfg.split == "test" else f"router_{name}_{cfg.split}"


def load_split(cfg: EvalRouterConfig) -> list[Sample]:
    path = Path(cfg.dataset_dir) / f"samples_{cfg.split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; build the routing dataset with `python jobs/make_routing_data.py` (or pass "
            "dataset_dir=<dir with samples_<split>.parquet>)"
        )
    return read_parquet(path, Sample)


def main(cfg: EvalRouterConfig) -> dict[str, Any]:
    """Evaluate the router of ``cfg.router_dir`` on ``cfg.split`` of ``cfg.dataset_dir``; writes and returns it."""
    router = load_router(cfg.router_dir, device=cfg.device)
    samples = load_split(cfg)
    usable = [s for s in samples if has_image(s)]
    if len(usable) < len(samples):
        logger.warning("%d of %d samples have no image and are left out", len(samples) - len(usable), len(samples))
    if not usable:
        raise ValueError(f"{cfg.dataset_dir} split {cfg.split} has no sample with an image to route")
    start = time.perf_counter()
    predictions = route_samples(router, usable, cfg.batch_size)
    seconds = time.perf_counter() - start
    result = router_report(usable, predictions, router.domains)
    calibration = (router.temperature, router.unknown_threshold)
    router.set_calibration(1.0, 0.0)  # the same router before calibration: what temperature scaling changed
    raw = router_report(usable, route_samples(router, usable, cfg.batch_size), router.domains)
    router.set_calibration(*calibration)
    result["calibration"] = {"temperature": calibration[0], "unknown_threshold": calibration[1],
                             "ece_uncalibrated": raw["ece"], "mean_confidence_uncalibrated": raw["mean_confidence"]}
    result.update(
        router_dir=str(Path(cfg.router_dir).resolve()),
        dataset_dir=str(Path(cfg.dataset_dir).resolve()),
        split=cfg.split,
        n_without_image=len(samples) - len(usable),
        images_per_second=round(len(usable) / seconds, 1) if seconds > 0 else None,
        config=to_dict(cfg),
    )
    for line in unknown_domain_lines(result):
        logger.warning("%s", line)
    logger.info("ECE %s at temperature 1 -> %s at the calibrated %.3f; routed unknown: %s", raw["ece"], result["ece"],
                calibration[0], result["routed_unknown"])
    stem = result_stem(cfg)
    markdown = router_markdown(result, f"Domain router {cfg.router_dir} on {Path(cfg.dataset_dir).name}/{cfg.split}")
    path = write_json_and_markdown(cfg.out_dir, stem, result, markdown)
    logger.info("router evaluation:\n%s", markdown)
    logger.info("wrote %s and %s", path, path.with_suffix(".md"))
    return result


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
