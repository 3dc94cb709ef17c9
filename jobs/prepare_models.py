"""Train the offline tokenizer and build the initial tiny models for a dataset.

    python jobs/prepare_models.py [--config jobs/configs/prepare_models.yaml] [dataset_dir=DIR] [out_dir=DIR] \
        [overwrite=true] [models.reader.text_layers=4]

Writes ``tokenizer/ encoder/ router/ reader/ prepared.json`` into ``out_dir`` (see
:mod:`medrag_ray.models.prepare`). Single process, seconds on CPU; no Ray needed.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medrag_ray.config import PrepareModelsConfig, parse_job_args
from medrag_ray.models.prepare import prepare_models
from medrag_ray.utils import check_writable, setup_logging

logger = logging.getLogger("jobs.prepare_models")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "prepare_models.yaml"


def parse_args(argv: Sequence[str] | None) -> PrepareModelsConfig:
    return parse_job_args(PrepareModelsConfig, argv, DEFAULT_CONFIG)


def main(cfg: PrepareModelsConfig) -> Path:
    """Build the models of ``cfg.models`` for ``cfg.dataset_dir`` into ``cfg.out_dir``; returns that dir."""
    check_writable(cfg.out_dir, cfg.overwrite)  # fail before training the tokenizer, not after
    return prepare_models(cfg.dataset_dir, cfg.out_dir, cfg.models, overwrite=cfg.overwrite)


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
