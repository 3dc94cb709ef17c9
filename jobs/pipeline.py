"""The whole pipeline on the embedded default: every step, building what is missing and saying so.

    python jobs/pipeline.py [--config jobs/configs/pipeline.yaml] [artifacts_dir=DIR] [rebuild=true] \
        [steps=[make_data]] [data.n_per_domain=1000]
    ray job submit --working-dir . -- python jobs/pipeline.py artifacts_dir=/abs/artifacts

Steps (in order; each is also its own job under ``jobs/``): ``make_data`` -> ``prepare_models``.
A step whose outputs already exist under ``artifacts_dir`` is skipped with a log line naming them;
``rebuild=true`` runs the selected steps again.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs import make_data, prepare_models
from medrag_ray.config import MakeDataConfig, PipelineConfig, PrepareModelsConfig, parse_job_args
from medrag_ray.utils import setup_logging

logger = logging.getLogger("jobs.pipeline")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "pipeline.yaml"


@dataclass(frozen=True)
class Step:
    name: str
    output: Path
    """The file whose presence means the step is done."""
    run: Callable[[], Path]


def steps(cfg: PipelineConfig) -> list[Step]:
    """The pipeline's steps wired to paths under ``cfg.artifacts_dir``."""
    root = Path(cfg.artifacts_dir)
    data_dir, models_dir = root / "data" / "synthetic", root / "models" / "init"
    all_steps = [
        Step(
            "make_data",
            data_dir / "manifest.json",
            lambda: make_data.main(MakeDataConfig(out_dir=str(data_dir), overwrite=cfg.rebuild, data=cfg.data)),
        ),
        Step(
            "prepare_models",
            models_dir / "prepared.json",
            lambda: prepare_models.main(
                PrepareModelsConfig(
                    dataset_dir=str(data_dir), out_dir=str(models_dir), overwrite=cfg.rebuild, models=cfg.models
                )
            ),
        ),
    ]
    return [s for s in all_steps if s.name in cfg.steps]


def parse_args(argv: Sequence[str] | None) -> PipelineConfig:
    return parse_job_args(PipelineConfig, argv, DEFAULT_CONFIG)


def main(cfg: PipelineConfig) -> dict[str, Path]:
    """Run the selected steps in order; returns each step's output."""
    outputs: dict[str, Path] = {}
    for step in steps(cfg):
        if step.output.exists() and not cfg.rebuild:
            logger.info("step %s: found %s, skipping (pass rebuild=true to run it again)", step.name, step.output)
        else:
            logger.info("step %s: building (no %s yet)", step.name, step.output)
            start = time.perf_counter()
            step.run()
            logger.info("step %s: done in %.1fs", step.name, time.perf_counter() - start)
        outputs[step.name] = step.output
    logger.info("pipeline finished; artifacts under %s", Path(cfg.artifacts_dir).resolve())
    return outputs


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
