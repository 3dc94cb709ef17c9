"""Evaluate RAG-PT and JOMED on closed (yes/no) questions (plain Python, no Ray; a test split is small).

    python jobs/evaluate.py [--config jobs/configs/evaluate.yaml] [name=synthetic-test] [limit=400]
    python jobs/evaluate.py samples_path=/data/vqa_rad_test.parquet route=false name=vqa_rad-test
    ray job submit --working-dir . -- python jobs/evaluate.py out_dir=/abs/eval

Writes ``<out_dir>/rag_pt.json/.md`` -- the ablation rows (the SFT reader without retrieval, with a fixed k,
with adaptive-k, then each RAG-PT stage's reader with adaptive-k: accuracy, macro F1 and AUROC overall, per domain
and per finding kind, each with the paired bootstrap CI of its difference to the row above), the diagnostics
(the reference code's ratio rule; with ``ground_truth_dir``'s synthetic manifest, the reader with oracle context
and the retrieval's phenotype precision and majority-of-reports accuracy per head), the kept-k distribution and
the CR / OR rates of the SFT and the last RAG-PT reader -- and, when the distilled retriever exists,
``jomed.json/.md``: FT RAG vs JOMED's logit fusion vs the oracle on all, consistent and inconsistent questions;
then ``report.md`` with the plots in ``plots/`` (:mod:`medrag_ray.eval.report`).
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrag_ray.config import EvaluateConfig, parse_job_args, to_dict
from medrag_ray.data.schema import CorpusDoc, Sample, read_parquet
from medrag_ray.data.subset import take_spread
from medrag_ray.data.synthetic import CORPUS_NAME, MANIFEST_NAME
from medrag_ray.eval.diagnostics import case_id, load_case_truths
from medrag_ray.eval.outputs import write_json_and_markdown
from medrag_ray.eval.rag_pt_eval import (
    GroundTruth,
    ablation_markdown,
    alignment_rates,
    closed_ablation,
    distillation_kl,
    jomed_comparison,
    jomed_markdown,
    retrieval_markdown,
)
from medrag_ray.eval.report import write_report
from medrag_ray.mining.miner import MiningSettings
from medrag_ray.reader.answers import YES_NO, normalize_closed
from medrag_ray.reader.context import decodable_samples
from medrag_ray.utils import setup_logging

logger = logging.getLogger("jobs.evaluate")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "evaluate.yaml"


def parse_args(argv: Sequence[str] | None) -> EvaluateConfig:
    return parse_job_args(EvaluateConfig, argv, DEFAULT_CONFIG)


def closed_samples(cfg: EvaluateConfig) -> tuple[list[Sample], list[Any], dict[str, int]]:
    """The closed yes/no samples with a readable image, their images, and what was skipped."""
    rows = read_parquet(cfg.samples_path, Sample)
    rows = take_spread(rows, [s.domain for s in rows], cfg.limit)
    closed = [s for s in rows if s.answer_type == "closed" and normalize_closed(s.answer, YES_NO) is not None]
    undecodable: list[str] = []
    kept, images = decodable_samples(closed, undecodable)
    skipped = {"not_closed_yes_no": len(rows) - len(closed), "undecodable_image": len(undecodable)}
    if not kept:
        raise ValueError(f"{cfg.samples_path} has no closed yes/no question with a readable image (skipped {skipped})")
    return kept, images, skipped


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate; writes and returns ``{"rag_pt": ..., "jomed": ... or None}``."""
    for path, what in ((cfg.reader_dir, "reader_dir"), (cfg.context.router_dir, "context.router_dir"),
                       (cfg.context.index_dir, "context.index_dir"), (cfg.samples_path, "samples_path")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{what}: {path} does not exist; build it with `python jobs/pipeline.py`")
    from medrag_ray.models.reader import load_reader
    from medrag_ray.reader.engine import ReaderEngine
    from medrag_ray.retrieval.retriever import MultimodalRetriever

    samples, images, skipped = closed_samples(cfg)
    retriever = MultimodalRetriever.from_artifacts(
        cfg.context.router_dir, cfg.context.index_dir, device=cfg.device, with_images=True
    )

    def engine_for(reader_dir: str) -> ReaderEngine:
        model, processor = load_reader(reader_dir, device=cfg.device)
        return ReaderEngine(model, processor, cfg.batch_size)

    stage_dirs = [d for d in cfg.rag_pt_reader_dirs if Path(d).is_dir()]
    for missing in sorted(set(cfg.rag_pt_reader_dirs) - set(stage_dirs)):
        logger.warning("RAG-PT reader %s does not exist; its row is skipped (run jobs/train_dpo.py)", missing)
    sft = engine_for(cfg.reader_dir)
    stage_engines = [engine_for(d) for d in stage_dirs]
    adaptive = cfg.context.retrieval
    truth = ground_truth(cfg, samples)
    ablation = closed_ablation(sft, stage_engines, retriever, samples, images, adaptive, cfg.fixed_k,
                               cfg.context.style, cfg.route, truth)
    alignment: dict[str, Any] = {}
    if cfg.alignment:
        settings = MiningSettings(retrieval=adaptive, style=cfg.context.style, noise_step=cfg.noise_step,
                                  route=cfg.route)
        alignment["rag_sft"] = alignment_rates(sft, retriever, samples, settings)
        if stage_engines:
            alignment["rag_pt"] = alignment_rates(stage_engines[-1], retriever, samples, settings)
    suffix = f" ({cfg.name})" if cfg.name else ""
    markdown = (ablation_markdown(ablation["rows"], "RAG-PT ablation, closed questions" + suffix)
                + _alignment_markdown(alignment))
    if ablation["diagnostics"]:
        markdown += "\n" + ablation_markdown(ablation["diagnostics"], "Diagnostics" + suffix, level=2)
    markdown += retrieval_markdown(ablation["retrieval"])
    if ablation["routed_unknown"]:
        markdown += (f"\n{ablation['routed_unknown']} of {len(samples)} questions were routed to no indexed domain "
                     "('unknown') and are asked without retrieval in the retrieval rows.\n")
    rag_pt = {"name": cfg.name, **ablation, "alignment": alignment, "skipped": skipped,
              "rag_pt_readers": stage_dirs, "config": to_dict(cfg)}
    path = write_json_and_markdown(cfg.out_dir, "rag_pt", rag_pt, markdown)
    logger.info("RAG-PT ablation:\n%s\nwrote %s", markdown, path)
    jomed = None
    if cfg.jomed_retriever_dir and Path(cfg.jomed_retriever_dir).is_dir():
        domains = [d for d in retriever.domains if (Path(cfg.jomed_retriever_dir) / d).is_dir()]
        distilled = MultimodalRetriever.from_artifacts(
            cfg.context.router_dir, cfg.context.index_dir, device=cfg.device, with_images=True,
            retriever_dirs={d: Path(cfg.jomed_retriever_dir) / d for d in domains},
        )
        out = jomed_comparison(sft, retriever, distilled, samples, images, cfg.jomed_k, cfg.jomed_temperature,
                               route=cfg.route)
        distill_metrics = Path(cfg.jomed_retriever_dir) / "metrics.json"
        if distill_metrics.is_file():
            out.analysis["distillation"] = distillation_kl(json.loads(distill_metrics.read_text(encoding="utf-8")))
        jomed = {"name": cfg.name, **out.analysis, "config": to_dict(cfg)}
        jmd = jomed_markdown(out.analysis, "FT RAG vs JOMED vs oracle" + (f" ({cfg.name})" if cfg.name else ""))
        path = write_json_and_markdown(cfg.out_dir, "jomed", jomed, jmd)
        logger.info("JOMED comparison:\n%s\nwrote %s", jmd, path)
    else:
        jmd = ""
        logger.warning("no distilled retriever at %r; the JOMED table is skipped (run jobs/distill_retriever.py)",
                       cfg.jomed_retriever_dir)
    report = write_report(cfg.out_dir, rag_pt, markdown, jomed, jmd)
    logger.info("wrote %s with its plots", report)
    return {"rag_pt": rag_pt, "jomed": jomed}


def ground_truth(cfg: EvaluateConfig, samples: Sequence[Sample]) -> GroundTruth | None:
    """The synthetic dataset's per-case truth and corpus from ``ground_truth_dir`` when ``samples`` are its cases;
    None (no diagnostics) for real data or samples of another dataset."""
    root = Path(cfg.ground_truth_dir) if cfg.ground_truth_dir else None
    if root is None or not (root / MANIFEST_NAME).is_file():
        logger.info("no %s in ground_truth_dir=%r: the diagnostics rows are skipped", MANIFEST_NAME,
                    cfg.ground_truth_dir)
        return None
    cases = load_case_truths(root / MANIFEST_NAME)
    if not all(case_id(s) in cases for s in samples):
        logger.info("the samples of %s are not the cases of %s: the diagnostics rows are skipped", cfg.samples_path,
                    root / MANIFEST_NAME)
        return None
    return GroundTruth(cases, read_parquet(root / CORPUS_NAME, CorpusDoc))


def _alignment_markdown(alignment: dict[str, Any]) -> str:
    if not alignment:
        return ""
    lines = ["", "| reader | CR rate | OR rate | n |", "|---|---|---|---|"]
    for name, a in alignment.items():
        lines.append(f"| {name} | {a['cr_rate']:.3f} ({a['cr_numerator']}/{a['cr_denominator']}) | "
                     f"{a['or_rate']:.3f} ({a['or_numerator']}/{a['or_denominator']}) | {a['n']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
