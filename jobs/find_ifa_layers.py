"""MR-RAG's critical layers for IFA by attention blocking, on validation closed questions (plain Python, no Ray).

    python jobs/find_ifa_layers.py [--config jobs/configs/find_ifa_layers.yaml] [limit=64] [top_n=1]
    python jobs/find_ifa_layers.py reader_dir=/models/llava-med-hf samples_path=/data/val.parquet criterion=kl
    ray job submit --working-dir . -- python jobs/find_ifa_layers.py out_dir=/abs/eval

Loads the reader, the router and the per-domain indexes once; takes the closed yes/no questions of the
validation split (``limit`` of them, spread evenly over the domains), retrieves with adaptive-k, keeps
the questions with at least one kept document, and scores them unblocked and with the question -> document
attention blocked in each decoder layer in turn (:mod:`medrag_ray.eval.ifa_layers`). Writes
``<out_dir>/critical_layers.json`` (``layers``: the ``top_n`` critical layers, ``per_layer``, ``baseline``,
``n``, ``skipped``, ``config``) and ``critical_layers.md``; pass ``layers`` to ``IFASettings`` at inference.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from medrag_ray.config import FindIFALayersConfig, parse_job_args, to_dict
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.data.subset import take_spread
from medrag_ray.eval.outputs import write_json_and_markdown
from medrag_ray.reader.answers import YES_NO, normalize_closed
from medrag_ray.reader.context import SampleContext, decodable_samples, missing_reader_inputs
from medrag_ray.utils import setup_logging

logger = logging.getLogger("jobs.find_ifa_layers")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "find_ifa_layers.yaml"
RESULT_STEM = "critical_layers"


def parse_args(argv: Sequence[str] | None) -> FindIFALayersConfig:
    return parse_job_args(FindIFALayersConfig, argv, DEFAULT_CONFIG)


def check_inputs(cfg: FindIFALayersConfig) -> None:
    """FileNotFoundError naming every missing input's config field and how to build the defaults."""
    missing = missing_reader_inputs(cfg)
    if missing:
        raise FileNotFoundError(
            f"missing inputs {missing}; build the default artifacts with `python jobs/pipeline.py` "
            "or point those fields at existing ones"
        )


def closed_questions(cfg: FindIFALayersConfig) -> tuple[list[Sample], list[Image.Image], dict[str, int]]:
    """The closed yes/no samples with a readable image (``limit`` of them spread over the domains), and what was
    skipped."""
    rows = read_parquet(cfg.samples_path, Sample)
    closed = [s for s in rows if s.answer_type == "closed" and normalize_closed(s.answer, YES_NO) is not None]
    undecodable: list[str] = []
    kept, images = decodable_samples(take_spread(closed, [s.domain for s in closed], cfg.limit), undecodable)
    skipped = {"not_closed_yes_no": len(rows) - len(closed), "undecodable_image": len(undecodable)}
    if not kept:
        raise ValueError(f"{cfg.samples_path} has no closed yes/no question with a readable image (skipped {skipped})")
    return kept, images, skipped


def with_documents(
    samples: Sequence[Sample], images: Sequence[Image.Image], contexts: Sequence[SampleContext]
) -> list[tuple[Sample, Image.Image, SampleContext]]:
    """The samples whose adaptive-k kept at least one document (blocking changes nothing without one)."""
    return [(s, im, c) for s, im, c in zip(samples, images, contexts, strict=True) if c.texts]


def main(cfg: FindIFALayersConfig) -> dict[str, Any]:
    """Run the blocking experiment of ``cfg``; writes and returns the result."""
    check_inputs(cfg)
    from medrag_ray.eval.ifa_layers import blocking_markdown, critical_layers, layer_blocking_effects
    from medrag_ray.models.reader import load_reader
    from medrag_ray.reader.context import reader_input, retrieve_contexts
    from medrag_ray.reader.engine import ReaderEngine
    from medrag_ray.reader.ifa import IFASpec
    from medrag_ray.retrieval.retriever import MultimodalRetriever

    samples, images, skipped = closed_questions(cfg)
    style = cfg.context.style
    retriever = MultimodalRetriever.from_artifacts(
        cfg.context.router_dir, cfg.context.index_dir, device=cfg.device, with_images=style == "jomed"
    )
    contexts = retrieve_contexts(retriever, samples, images, cfg.context.retrieval, route=cfg.route,
                                 with_images=style == "jomed")
    usable = with_documents(samples, images, contexts)
    skipped["no_retrieved_document"] = len(samples) - len(usable)
    if not usable:
        raise ValueError(f"adaptive-k kept no document for any of the {len(samples)} questions; nothing to block "
                         "(lower context.retrieval.gamma or use adaptive=none)")
    inputs = [reader_input(s, im, c, style) for s, im, c in usable]
    specs = [IFASpec(s.question, c.texts, c.scores) for s, _, c in usable]
    labels = [str(normalize_closed(s.answer, YES_NO)) for s, _, _ in usable]
    model, processor = load_reader(cfg.reader_dir, device=cfg.device)
    engine = ReaderEngine(model, processor, cfg.batch_size)
    effects = layer_blocking_effects(engine, inputs, specs, labels, YES_NO)
    chosen = critical_layers(effects, min(cfg.top_n, len(effects.per_layer)), cfg.criterion)
    result = {"name": cfg.name, "layers": list(chosen), "criterion": cfg.criterion, **effects.to_dict(),
              "skipped": skipped, "config": to_dict(cfg)}
    title = "IFA critical layers by attention blocking" + (f" ({cfg.name})" if cfg.name else "")
    markdown = blocking_markdown(effects, chosen, title)
    path = write_json_and_markdown(cfg.out_dir, RESULT_STEM, result, markdown)
    logger.info("attention blocking:\n%s", markdown)
    logger.info("critical layers %s; wrote %s and %s", list(chosen), path, path.with_suffix(".md"))
    return result


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
