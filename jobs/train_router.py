"""Fine-tune the domain router F(x_v) (MMed-RAG §3.1) on Ray Train with DeepSpeed, and report it.

    python jobs/train_router.py [--config jobs/configs/train_router.yaml] [dataset_dir=DIR] [train.epochs=6]
    python jobs/train_router.py dataset_dir=artifacts/data/routing_real out_dir=artifacts/models/router_real
    ray job submit --working-dir . -- python jobs/train_router.py ray_train.storage_path=s3://bucket/runs

The router is the image tower of ``init_encoder_dir`` (the tiny init encoder, or a real BiomedCLIP
directory) plus a linear head over the domains, trained with cross-entropy on ``samples_train.parquet``
(one example per distinct image). After training, the exported router is calibrated on
``samples_val.parquet`` (temperature scaling, and the confidence under which an image is of an unknown domain:
``unknown_keep`` of the validation images stay above it; :mod:`medrag_ray.eval.calibration`) and evaluated there:
ECE before / after, per-domain precision/recall and the confusion matrix go to the log and to
``out_dir/metrics.json``.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import functools
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.runtime import init_ray
from jobs.train_common import export_result, fit
from medrag_ray.config import TrainRouterConfig, parse_job_args, to_dict
from medrag_ray.models.router import load_router, save_router
from medrag_ray.train.data import domain_examples
from medrag_ray.train.tasks import (
    calibrate_router,
    check_init_encoder,
    dataset_file,
    evaluate_router,
    make_router_task,
    resolve_domains,
)
from medrag_ray.utils import atomic_output_dir, check_writable, setup_logging

logger = logging.getLogger("jobs.train_router")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "train_router.yaml"


def parse_args(argv: Sequence[str] | None) -> TrainRouterConfig:
    return parse_job_args(TrainRouterConfig, argv, DEFAULT_CONFIG)


def main(cfg: TrainRouterConfig) -> Path:
    """Train, export and evaluate the router; returns ``cfg.out_dir``."""
    check_writable(cfg.out_dir, cfg.overwrite)
    domains = resolve_domains(dataset_file(cfg.dataset_dir, "samples_train.parquet"), cfg.domains, min_domains=2)
    init_encoder_dir = check_init_encoder(cfg.init_encoder_dir)
    init_ray(cfg.ray)
    factory = functools.partial(
        make_router_task, cfg.run_name, init_encoder_dir,
        str(Path(cfg.dataset_dir).resolve()), tuple(domains),
    )
    result = fit(cfg.run_name, factory, cfg.train, cfg.ray_train)
    with atomic_output_dir(cfg.out_dir, cfg.overwrite) as tmp:
        state = export_result(result, tmp)
        summary: dict[str, object] = {"config": to_dict(cfg), "domains": domains, "history": state["history"]}
        val_path = Path(cfg.dataset_dir) / "samples_val.parquet"
        if val_path.is_file():
            examples = domain_examples(val_path, domains)
            router = load_router(tmp)
            calibration = calibrate_router(router, examples, cfg.unknown_keep)
            save_router(router, tmp)
            summary["calibration"] = calibration
            logger.info("router calibrated on %s: temperature %.3f, ECE %.4f -> %.4f, unknown below %.4f", val_path,
                        calibration["temperature"], calibration["ece_before"], calibration["ece_after"],
                        calibration["unknown_threshold"])
            report = evaluate_router(router, examples)
            summary["val"] = report.to_dict()
            logger.info("router on %s (%d images):\n%s", val_path, report.n, report.format_table())
        else:
            logger.warning("no %s: the router keeps temperature 1 and never routes to 'unknown'", val_path)
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return Path(cfg.out_dir)


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
