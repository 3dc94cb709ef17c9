"""Fine-tune one retriever R_d per domain (MMed-RAG §3.1, Eq. 1) on Ray Train with DeepSpeed.

    python jobs/train_retriever.py [--config jobs/configs/train_retriever.yaml] [domains=[radiology]] \
        [train.epochs=30] [train.zero_stage=2] [ray_train.num_workers=2] [overwrite=true]
    python jobs/train_retriever.py domain_agnostic=true out_dir=artifacts/models/retriever_all
    ray job submit --working-dir . -- python jobs/train_retriever.py ray_train.storage_path=s3://bucket/runs

Each domain is one Ray Train run named ``<run_name>-<domain>``: ``TorchTrainer`` workers run the loop of
:mod:`medrag_ray.train.loop` (DeepSpeed ZeRO on gloo/CPU here, NCCL/GPU with bf16 on a cluster), report a
checkpoint every epoch, resume from the last one when the command is re-run, and restart failed workers
(``ray_train.max_failures``). The final models land in ``out_dir/<domain>/`` with ``out_dir/metrics.json``.
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
from medrag_ray.config import TrainRetrieverConfig, parse_job_args, to_dict
from medrag_ray.train.tasks import check_init_encoder, dataset_file, make_retriever_task, resolve_domains
from medrag_ray.utils import atomic_output_dir, check_writable, setup_logging

logger = logging.getLogger("jobs.train_retriever")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "train_retriever.yaml"


def parse_args(argv: Sequence[str] | None) -> TrainRetrieverConfig:
    return parse_job_args(TrainRetrieverConfig, argv, DEFAULT_CONFIG)


def main(cfg: TrainRetrieverConfig) -> Path:
    """Train the retrievers of ``cfg``; returns ``cfg.out_dir``."""
    check_writable(cfg.out_dir, cfg.overwrite)
    domains = resolve_domains(dataset_file(cfg.dataset_dir, "corpus.parquet"), cfg.domains)
    init_encoder_dir = check_init_encoder(cfg.init_encoder_dir)
    init_ray(cfg.ray)
    groups = {"all": list(cfg.domains) or None} if cfg.domain_agnostic else {d: [d] for d in domains}
    metrics: dict[str, object] = {"config": to_dict(cfg), "runs": {}}
    with atomic_output_dir(cfg.out_dir, cfg.overwrite) as tmp:
        for group, group_domains in groups.items():
            name = f"{cfg.run_name}-{group}"
            factory = functools.partial(
                make_retriever_task, name, init_encoder_dir,
                str(Path(cfg.dataset_dir).resolve()), group_domains,
            )
            result = fit(name, factory, cfg.train, cfg.ray_train)
            target = tmp if cfg.domain_agnostic else tmp / group
            state = export_result(result, target)
            metrics["runs"][group] = {"run": name, "final": state["history"][-1], "history": state["history"]}
            logger.info("%s: final %s", name, json.dumps(state["history"][-1]))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    logger.info("retrievers for %s written to %s", list(groups), cfg.out_dir)
    return Path(cfg.out_dir)


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
