"""JOMED retriever distillation (text head, then image head) and MR-RAG fusion weights, taught by the reader.

    python jobs/distill_retriever.py [--config jobs/configs/distill_retriever.yaml] [k=4] [limit=500]
    ray job submit --working-dir . -- python jobs/distill_retriever.py work_dir=/shared/distill \
        out_dir=/shared/models/retriever_jomed ray_train.storage_path=/shared/ray_train

1. One Ray Data pass over the train and val questions (``map_batches(CandidateScorer)``, GPU actors on a GPU
   cluster; the reader and retriever load once per actor): route -> each head's top-k candidates (a sample's own
   case excluded) -> the frozen reader answers once per candidate with that (image, text) pair prepended ->
   ``work_dir/scores/`` (rows tagged with head and split; skipped when complete).
2. Ray Train runs ``<run_name>-text`` then ``<run_name>-image`` (JOMED's Sharp Perplexity KL, each head alone)
   and ``<run_name>-fusion`` (MR-RAG Eq. 2 on reader-confidence labels), each from the previous one's export.
3. ``out_dir/<domain>/``: the distilled dual-head retrievers, and ``metrics.json`` with every run's history.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import dataclasses
import functools
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from jobs.runtime import actor_pool_kwargs, cluster_has_gpu, init_ray
from jobs.train_common import export_result, fit
from medrag_ray.config import DistillRetrieverConfig, parse_job_args, to_dict
from medrag_ray.data.schema import RecordError, Sample
from medrag_ray.data.subset import take_spread
from medrag_ray.reader.answers import YES_NO, normalize_closed
from medrag_ray.reader.context import sample_image
from medrag_ray.retrieval.distill import (
    DISTILL_HEADS,
    SCORES_SCHEMA,
    count_scores,
    make_fusion_task,
    make_head_task,
    score_candidates,
    scores_rows,
)
from medrag_ray.retrieval.embed import read_manifest
from medrag_ray.utils import atomic_output_dir, check_writable, setup_logging

logger = logging.getLogger("jobs.distill_retriever")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "distill_retriever.yaml"
DONE_FILE = "_SUCCESS"


def parse_args(argv: Sequence[str] | None) -> DistillRetrieverConfig:
    return parse_job_args(DistillRetrieverConfig, argv, DEFAULT_CONFIG)


class CandidateScorer:
    """One Ray Data actor: loads the retriever (with document images) and the reader once, scores batches with
    every head."""

    def __init__(self, cfg: DistillRetrieverConfig, splits: dict[str, str]) -> None:
        import torch

        from medrag_ray.models.reader import load_reader
        from medrag_ray.reader.engine import ReaderEngine
        from medrag_ray.retrieval.retriever import MultimodalRetriever

        setup_logging()
        torch.set_num_threads(max(1, int(cfg.ray.actor_num_cpus)))
        device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
        device = "cpu" if device == "auto" else device
        self.retriever = MultimodalRetriever.from_artifacts(
            cfg.context.router_dir, cfg.context.index_dir, device=device, with_images=True
        )
        model, processor = load_reader(cfg.reader_dir, device=device)
        self.engine = ReaderEngine(model, processor, cfg.reader_batch_size)
        self.cfg, self.splits = cfg, splits

    def __call__(self, batch: pa.Table) -> pa.Table:
        by_split: dict[str, tuple[list[Sample], list[Any]]] = {}
        for row in batch.to_pylist():
            split = self.splits[Path(row.pop("path")).name]
            try:
                sample = Sample(**row)
                image = sample_image(sample)
            except (RecordError, TypeError) as exc:
                logger.warning("skipping sample %s: %s", row.get("id"), exc)
                continue
            samples, images = by_split.setdefault(split, ([], []))
            samples.append(sample)
            images.append(image)
        rows = []
        for split, (samples, images) in by_split.items():
            for head in DISTILL_HEADS:
                scored = score_candidates(self.retriever, self.engine, samples, images, head, self.cfg.k,
                                          route=self.cfg.route)
                rows.extend(scores_rows(scored, split))
        return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def _scorable(answer_type: str, answer: str) -> bool:
    return answer_type == "closed" and normalize_closed(answer, YES_NO) is not None


def selected_ids(path: Path, limit: int) -> set[str]:
    """The closed yes/no rows of a samples file, or ``limit`` of them spread evenly over the domains."""
    table = pq.read_table(path, columns=["id", "domain", "answer_type", "answer"]).to_pydict()
    rows = [(i, d) for i, d, t, a in zip(table["id"], table["domain"], table["answer_type"], table["answer"],
                                         strict=True) if _scorable(t, a)]
    return set(take_spread([i for i, _ in rows], [d for _, d in rows], limit))


def scores_dir(cfg: DistillRetrieverConfig) -> Path:
    return Path(cfg.work_dir) / "scores"


def score(cfg: DistillRetrieverConfig, splits: Sequence[str]) -> Path:
    """The Ray Data scoring pass of every head over ``splits`` (skipped when its output is complete)."""
    out = scores_dir(cfg)
    if (out / DONE_FILE).is_file():
        logger.info("scored candidates exist in %s; reusing them (%s)", out, count_scores(out))
        return out
    shutil.rmtree(out, ignore_errors=True)
    files = {f"samples_{split}.parquet": split for split in splits}
    keep = {name: selected_ids(Path(cfg.dataset_dir) / name, cfg.limit) for name in files}
    ds = ray.data.read_parquet([str(Path(cfg.dataset_dir) / name) for name in files], include_paths=True)
    ds = ds.filter(lambda row: row["id"] in keep[Path(row["path"]).name])
    gpu = cluster_has_gpu() if cfg.device != "cpu" else False
    scored = ds.repartition(target_num_rows_per_block=cfg.batch_size).map_batches(
        CandidateScorer,
        fn_constructor_kwargs={"cfg": cfg, "splits": files},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        **actor_pool_kwargs(cfg.ray, cfg.num_actors, use_gpu=gpu),
    )
    scored.write_parquet(str(out))
    (out / DONE_FILE).write_text("", encoding="utf-8")
    logger.info("scored the candidates of %s with heads %s -> %s: %s", list(splits), list(DISTILL_HEADS), out,
                count_scores(out))
    return out


def initial_retriever_dirs(cfg: DistillRetrieverConfig) -> dict[str, str]:
    """Each indexed domain's retriever (the encoder that built its index)."""
    root = Path(cfg.context.index_dir).resolve()
    out = {}
    for domain, entry in read_manifest(root).domains.items():
        path = Path(entry.encoder_dir)
        out[domain] = str(path if path.is_absolute() else (root / path).resolve())
    return out


def absolute(cfg: DistillRetrieverConfig) -> DistillRetrieverConfig:
    ctx = dataclasses.replace(cfg.context, router_dir=str(Path(cfg.context.router_dir).resolve()),
                              index_dir=str(Path(cfg.context.index_dir).resolve()))
    return dataclasses.replace(
        cfg, context=ctx, dataset_dir=str(Path(cfg.dataset_dir).resolve()),
        reader_dir=str(Path(cfg.reader_dir).resolve()), work_dir=str(Path(cfg.work_dir).resolve()),
    )


def main(cfg: DistillRetrieverConfig) -> Path:
    """Score, then distil the text head, the image head and the fusion weights; returns ``cfg.out_dir``."""
    check_writable(cfg.out_dir, cfg.overwrite)
    for path, what in ((Path(cfg.dataset_dir) / "samples_train.parquet", "dataset_dir"),
                       (Path(cfg.reader_dir), "reader_dir"), (Path(cfg.context.index_dir), "context.index_dir"),
                       (Path(cfg.context.router_dir), "context.router_dir")):
        if not path.exists():
            raise FileNotFoundError(f"{what}: {path} does not exist; build it with `python jobs/pipeline.py`")
    cfg = absolute(cfg)
    retriever_dirs = initial_retriever_dirs(cfg)
    init_ray(cfg.ray)
    splits = ["train"] + (["val"] if (Path(cfg.dataset_dir) / "samples_val.parquet").is_file() else [])
    scores = str(score(cfg, splits))
    runs: dict[str, Any] = {}
    parts: list[tuple[str, Any, Any]] = [
        (head, functools.partial(make_head_task, head=head, scores_dir=scores, temperature=cfg.temperature),
         cfg.head_train) for head in DISTILL_HEADS
    ]
    parts.append(("fusion", functools.partial(make_fusion_task, scores_dir=scores,
                                              temperature=cfg.fusion_temperature, n_negatives=cfg.n_negatives),
                  cfg.fusion_train))
    for part, make_task, train_cfg in parts:
        name = f"{cfg.run_name}-{part}"
        factory = functools.partial(make_task, name, retriever_dirs=dict(retriever_dirs))
        export_dir = Path(cfg.work_dir) / "heads" / part
        shutil.rmtree(export_dir, ignore_errors=True)
        task = factory()
        initial = task.evaluate(task.build_model().eval())  # the same validation metrics before training
        state = export_result(fit(name, factory, train_cfg, cfg.ray_train), export_dir)
        runs[part] = {"from": dict(retriever_dirs), "initial": initial, "final": state["history"][-1],
                      "history": state["history"]}
        retriever_dirs = {d: str(export_dir / d) for d in retriever_dirs}
        logger.info("%s: %s", name, json.dumps(state["history"][-1]))
    with atomic_output_dir(cfg.out_dir, cfg.overwrite) as tmp:
        for domain, path in retriever_dirs.items():
            shutil.copytree(path, tmp / domain)
        metrics = {"config": to_dict(cfg), "scored_queries": count_scores(scores), "runs": runs}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    return Path(cfg.out_dir)


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
