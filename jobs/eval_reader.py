"""Closed-question (yes/no) accuracy of a reader with and without retrieval, per domain (plain Python, no Ray).

    python jobs/eval_reader.py [--config jobs/configs/eval_reader.yaml] [name=synthetic-test] [limit=200]
    python jobs/eval_reader.py samples_path=/data/vqa_rad_test.parquet name=vqa_rad-test
    ray job submit --working-dir . -- python jobs/eval_reader.py out_dir=/abs/eval

Loads the reader, the router and the per-domain indexes once, scores every closed yes/no sample of
``samples_path`` as M(x_v, x_t) and as M(x_v, x_t + x_r) (the routed domain's retrieved reports), and writes
``<out_dir>/reader.json`` and ``reader.md`` (see :mod:`medrag_ray.eval.reader_eval`). A test split is a few
hundred questions, so one process is enough; a cluster run uses the GPU of the node it lands on.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrag_ray.config import EvalReaderConfig, parse_job_args, to_dict
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.data.subset import take_spread
from medrag_ray.eval.outputs import write_json_and_markdown
from medrag_ray.eval.reader_eval import evaluate_reader, reader_markdown
from medrag_ray.reader.context import missing_reader_inputs
from medrag_ray.utils import setup_logging

logger = logging.getLogger("jobs.eval_reader")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "eval_reader.yaml"
RESULT_STEM = "reader"


def parse_args(argv: Sequence[str] | None) -> EvalReaderConfig:
    return parse_job_args(EvalReaderConfig, argv, DEFAULT_CONFIG)


def check_inputs(cfg: EvalReaderConfig) -> None:
    """FileNotFoundError naming every missing input's config field and how to build the defaults."""
    missing = missing_reader_inputs(cfg)
    if missing:
        raise FileNotFoundError(
            f"missing inputs {missing}; build the default artifacts with `python jobs/pipeline.py` "
            "or point those fields at existing ones"
        )


def main(cfg: EvalReaderConfig) -> dict[str, Any]:
    """Evaluate the reader of ``cfg`` on its samples; writes and returns the result."""
    check_inputs(cfg)
    from medrag_ray.models.reader import load_reader
    from medrag_ray.reader.engine import ReaderEngine
    from medrag_ray.retrieval.retriever import MultimodalRetriever

    samples = read_parquet(cfg.samples_path, Sample)
    samples = take_spread(samples, [s.domain for s in samples], cfg.limit)
    retriever = MultimodalRetriever.from_artifacts(
        cfg.context.router_dir, cfg.context.index_dir, device=cfg.device, with_images=cfg.context.style == "jomed"
    )
    model, processor = load_reader(cfg.reader_dir, device=cfg.device)
    engine = ReaderEngine(model, processor, cfg.batch_size)
    report = evaluate_reader(engine, retriever, samples, cfg.context, route=cfg.route, batch_size=cfg.batch_size)
    result = {"name": cfg.name, **report.to_dict(), "config": to_dict(cfg)}
    title = "Reader closed-question accuracy without / with retrieval" + (f" ({cfg.name})" if cfg.name else "")
    markdown = reader_markdown(report, title)
    path = write_json_and_markdown(cfg.out_dir, RESULT_STEM, result, markdown)
    logger.info("reader evaluation:\n%s", markdown)
    logger.info("wrote %s and %s", path, path.with_suffix(".md"))
    return result


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
