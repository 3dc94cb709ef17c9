"""Image->text retrieval recall@k per domain for several named encoders (plain Python, no Ray needed).

    python jobs/eval_retrieval.py [--config jobs/configs/eval_retrieval.yaml] \
        ['encoders={untrained: artifacts/models/init/encoder}'] [eval_sets=[synthetic]] [device=cpu]

Eval sets: ``synthetic`` (the synthetic test reports, per domain) and ``medpix`` (MedPix 2.0 test images
and captions, radiology; skipped when the shared data folder is absent and ``medpix_dir`` is unset).
Encoders: ``name: dir``, a dir being one dual encoder or a dir of ``<domain>/`` per-domain retrievers; a
missing one is skipped with the command that builds it. Writes ``<out_dir>/retrieval.json`` and
``retrieval.md`` (see :mod:`medrag_ray.eval.retrieval_suite`). The eval sets are a few hundred images, so
one process is enough; a cluster run uses the GPU of the node it lands on (``device=auto``).
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrag_ray.config import ConfigError, EvalRetrievalConfig, parse_job_args, to_dict
from medrag_ray.eval.outputs import write_json_and_markdown
from medrag_ray.eval.retrieval_suite import (
    PairSet,
    evaluate_retrieval,
    medpix_pair_set,
    retrieval_markdown,
    synthetic_pair_sets,
)
from medrag_ray.models.dual_encoder import DualEncoder, load_dual_encoder
from medrag_ray.utils import setup_logging, shared_data_dir

logger = logging.getLogger("jobs.eval_retrieval")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "eval_retrieval.yaml"
RESULT_STEM = "retrieval"


def parse_args(argv: Sequence[str] | None) -> EvalRetrievalConfig:
    return parse_job_args(EvalRetrievalConfig, argv, DEFAULT_CONFIG)


def medpix_dir(cfg: EvalRetrievalConfig) -> Path | None:
    """``cfg.medpix_dir`` (must exist) or ``<shared data>/medpix2`` (None when there is no shared data)."""
    if cfg.medpix_dir:
        path = Path(cfg.medpix_dir)
        if not path.is_dir():
            raise ConfigError(f"medpix_dir={cfg.medpix_dir!r} is not a directory; pass the MedPix 2.0 folder")
        return path
    shared = shared_data_dir()
    return shared / "medpix2" if shared is not None and (shared / "medpix2").is_dir() else None


def load_pair_sets(cfg: EvalRetrievalConfig) -> list[PairSet]:
    """The configured eval sets, restricted to ``cfg.domains``; an absent default input is skipped, logged."""
    sets: list[PairSet] = []
    if "synthetic" in cfg.eval_sets:
        if Path(cfg.synthetic_path).is_file():
            sets.extend(synthetic_pair_sets(cfg.synthetic_path))
        else:
            logger.warning(
                "skipping eval set synthetic: %s not found; generate it with `python jobs/make_data.py`",
                cfg.synthetic_path,
            )
    if "medpix" in cfg.eval_sets:
        folder = medpix_dir(cfg)
        if folder is None:
            logger.warning(
                "skipping eval set medpix: the shared data folder was not found; set MEDRAG_SHARED_DATA=<folder> "
                "or pass medpix_dir=<MedPix 2.0 folder>"
            )
        else:
            sets.append(medpix_pair_set(folder))
    if cfg.domains:
        sets = [s for s in sets if s.domain in cfg.domains]
    if not sets:
        raise ConfigError(
            f"no eval set to run (eval_sets={list(cfg.eval_sets)}, domains={list(cfg.domains)}); "
            "see the warnings above for what is missing"
        )
    return sets


def main(cfg: EvalRetrievalConfig) -> dict[str, Any]:
    """Evaluate every configured encoder on every eval set; writes and returns the result."""
    pair_sets = load_pair_sets(cfg)

    def load(directory: Path) -> DualEncoder:
        return load_dual_encoder(directory, device=cfg.device)

    result = evaluate_retrieval(cfg.encoders, pair_sets, load, ks=cfg.ks, batch_size=cfg.batch_size)
    if not result["results"]:
        raise ConfigError(
            f"none of the encoders {cfg.encoders} could be evaluated; see the skip warnings above for how to "
            "build them"
        )
    result["config"] = to_dict(cfg)
    markdown = retrieval_markdown(result)
    path = write_json_and_markdown(cfg.out_dir, RESULT_STEM, result, markdown)
    logger.info("image->text retrieval:\n%s", markdown)
    logger.info("wrote %s and %s", path, path.with_suffix(".md"))
    return result


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
