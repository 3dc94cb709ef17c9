"""Pretrain the tiny reader's vision tower on report findings (multi-label BCE) on Ray Train with DeepSpeed.

    python jobs/pretrain_vision.py [--config jobs/configs/pretrain_vision.yaml] [train.epochs=30] [overwrite=true]
    ray job submit --working-dir . -- python jobs/pretrain_vision.py dataset_dir=/abs/reader_pretrain \
        out_dir=/abs/reader_vision ray_train.storage_path=/shared/ray_train

The stand-in for the pretrained CLIP vision tower of a real LLaVA-style reader (see
:mod:`medrag_ray.reader.vision_pretrain`): the Ray Train run ``<run_name>`` trains the vision tower of
``reader_dir`` and a linear findings head on the distinct images of ``dataset_dir``; ``out_dir`` receives the
whole reader with the trained tower (the input of ``jobs/configs/train_reader_pretrain.yaml``), the label list
and ``metrics.json`` (per-finding validation accuracy, per epoch).
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.runtime import init_ray
from jobs.train_common import fit_to_dir
from medrag_ray.config import PretrainVisionConfig, parse_job_args
from medrag_ray.reader.vision_pretrain import make_reader_vision_task
from medrag_ray.train.tasks import dataset_file
from medrag_ray.utils import check_writable, setup_logging

logger = logging.getLogger("jobs.pretrain_vision")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "pretrain_vision.yaml"


def parse_args(argv: Sequence[str] | None) -> PretrainVisionConfig:
    return parse_job_args(PretrainVisionConfig, argv, DEFAULT_CONFIG)


def main(cfg: PretrainVisionConfig) -> Path:
    """Pretrain the vision tower of ``cfg.reader_dir``; returns ``cfg.out_dir``."""
    check_writable(cfg.out_dir, cfg.overwrite)
    dataset_file(cfg.dataset_dir, "samples_train.parquet")
    if not Path(cfg.reader_dir).is_dir():
        raise FileNotFoundError(
            f"reader_dir {cfg.reader_dir} does not exist; build the tiny reader with `python jobs/prepare_models.py`"
        )
    init_ray(cfg.ray)
    factory = functools.partial(
        make_reader_vision_task,
        cfg.run_name,
        str(Path(cfg.reader_dir).resolve()),
        str(Path(cfg.dataset_dir).resolve()),
        cfg.finding_kinds,
    )
    fit_to_dir(cfg, factory, cfg.out_dir, cfg.overwrite)
    return Path(cfg.out_dir)


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
