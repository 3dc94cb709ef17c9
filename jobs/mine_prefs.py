"""Mine RAG-PT preference pairs (MMed-RAG Algorithm 1: D_cm, D_oa1, D_oa2) as a Ray Data pipeline.

    python jobs/mine_prefs.py                      # the embedded default (builds missing prerequisites first)
    python jobs/mine_prefs.py samples_path=DIR/samples_train.parquet reader_dir=... out_dir=... [dcm_rule=text]
    ray job submit --working-dir . -- python jobs/mine_prefs.py out_dir=/shared/prefs

``read_parquet(samples)`` -> drop samples the ledger already lists (resume) -> blocks of ``batch_size`` ->
``map_batches(MinerActor, actor pool)`` (one GPU per actor on a GPU cluster): route -> retrieve + adaptive-k
-> x_v* -> the reader's passes scored from the answer logits -> rules -> the actor records the batch in the
ledger (exactly once; :mod:`medrag_ray.mining.store`) -> the driver consolidates ``pairs/``,
``alignment/<domain>/mined_<domain>.json`` (MMed-RAG's LLaVA-style format), ``rejects.jsonl`` and ``summary.json``
(pairs per type and domain, CR / OR rates). A crash loses at most the batches in flight: re-run the same
command and only unfinished samples are mined; a killed actor is restarted by Ray Data and its batch redone.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from jobs.runtime import actor_pool_kwargs, cluster_has_gpu, init_ray
from medrag_ray.config import MinePrefsConfig, PipelineConfig, parse_job_args, steps_before, to_dict
from medrag_ray.data.schema import RecordError, Sample
from medrag_ray.data.subset import take_spread
from medrag_ray.mining.miner import BatchResult, MiningSettings, PreferenceMiner, Reject
from medrag_ray.mining.store import MiningStore
from medrag_ray.reader.context import missing_reader_inputs
from medrag_ray.utils import setup_logging

logger = logging.getLogger("jobs.mine_prefs")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mine_prefs.yaml"


def parse_args(argv: Sequence[str] | None) -> MinePrefsConfig:
    return parse_job_args(MinePrefsConfig, argv, DEFAULT_CONFIG)


def settings(cfg: MinePrefsConfig) -> MiningSettings:
    return MiningSettings(
        retrieval=cfg.context.retrieval,
        style=cfg.context.style,
        dcm_rule=cfg.dcm_rule,
        noise_kind=cfg.noise_kind,
        noise_step=cfg.noise_step,
        seed=cfg.seed,
        route=cfg.route,
    )


class MinerActor:
    """One Ray Data actor: loads the retriever and the reader once, mines and records each batch."""

    store_cls = MiningStore

    def __init__(self, cfg: MinePrefsConfig) -> None:
        import torch

        from medrag_ray.models.reader import load_reader
        from medrag_ray.reader.engine import ReaderEngine
        from medrag_ray.retrieval.retriever import MultimodalRetriever

        setup_logging()
        torch.set_num_threads(max(1, int(cfg.ray.actor_num_cpus)))
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        retriever = MultimodalRetriever.from_artifacts(
            cfg.context.router_dir, cfg.context.index_dir, device=device, with_images=True
        )
        model, processor = load_reader(cfg.reader_dir, device=device)
        self.miner = PreferenceMiner(retriever, ReaderEngine(model, processor, cfg.reader_batch_size), settings(cfg))
        self.store = self.store_cls(cfg.out_dir)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        samples, bad = [], []
        for i, row in enumerate(batch.to_pylist()):
            try:
                samples.append(Sample(**row))
            except (RecordError, TypeError) as exc:
                sample_id = str(row.get("id") or f"<row {i}>")
                bad.append(Reject(sample_id, getattr(exc, "field_name", "row"), str(exc)))
        result = self.miner.mine_batch(samples) if samples else BatchResult()
        result.rejects.extend(bad)
        ids = [s.id for s in samples] + [r.sample_id for r in bad]
        self.store.write_batch(ids, result)
        return {"batch_samples": np.array([len(ids)]), "batch_pairs": np.array([len(result.pairs)])}


def build_prerequisites(cfg: MinePrefsConfig) -> None:
    """Run the pipeline's steps before ``mine_prefs`` when an input is missing (or explain how to get it)."""
    missing = missing_reader_inputs(cfg)
    if not missing:
        return
    if not cfg.build_missing:
        raise FileNotFoundError(
            f"missing inputs {missing}; build them with `python jobs/pipeline.py "
            f"steps=[{','.join(steps_before('mine_prefs'))}]` or pass build_missing=true"
        )
    from jobs import pipeline

    pipe = PipelineConfig(
        artifacts_dir=cfg.artifacts_dir,
        ray=cfg.ray,
        steps=steps_before("mine_prefs"),
    )
    logger.info("missing %s: building the prerequisites with the pipeline under %s first", missing, cfg.artifacts_dir)
    pipeline.main(pipe)
    still = missing_reader_inputs(cfg)
    if still:
        raise FileNotFoundError(
            f"after building the default prerequisites under {cfg.artifacts_dir}, {still} still "
            "do not exist; those paths are not the pipeline's: point them at existing inputs"
        )


def absolute(cfg: MinePrefsConfig) -> MinePrefsConfig:
    """Paths made absolute on the driver (actors may run in another working directory)."""
    ctx = dataclasses.replace(
        cfg.context,
        router_dir=str(Path(cfg.context.router_dir).resolve()),
        index_dir=str(Path(cfg.context.index_dir).resolve()),
    )
    return dataclasses.replace(
        cfg,
        context=ctx,
        samples_path=str(Path(cfg.samples_path).resolve()),
        reader_dir=str(Path(cfg.reader_dir).resolve()),
        out_dir=str(Path(cfg.out_dir).resolve()),
    )


def selected_ids(samples_path: str, limit: int) -> set[str]:
    """The ids of the ``limit`` samples a run mines, spread evenly over the domains (from the id and domain columns
    alone; a file, a directory of parquet files or a pyarrow-readable URI)."""
    table = pq.read_table(samples_path, columns=["id", "domain"]).to_pydict()
    return set(take_spread(table["id"], table["domain"], limit))


def all_mined(samples_path: str, limit: int, done: set[str]) -> bool:
    """Whether every sample a run would select (:func:`selected_ids`, 0 = all) is in ``done``; ``False`` for a
    directory or a remote path (the Ray Data pass then filters the mined ones out)."""
    if not done or not Path(samples_path).is_file():
        return False
    return selected_ids(samples_path, limit) <= done


def mine(cfg: MinePrefsConfig, done: set[str], actor_cls: type[MinerActor]) -> tuple[int, int]:
    """The Ray Data pass over the samples not in ``done``: (samples, pairs) mined."""
    init_ray(cfg.ray)
    ds = ray.data.read_parquet(cfg.samples_path)
    if cfg.limit:
        chosen = selected_ids(cfg.samples_path, cfg.limit)
        ds = ds.filter(lambda row: row["id"] in chosen)
    if done:
        logger.info("resuming: %d sample(s) of %s are mined already and are skipped", len(done), cfg.out_dir)
        ds = ds.filter(lambda row: row["id"] not in done)
    gpu = cluster_has_gpu() if cfg.device != "cpu" else False
    mined = ds.repartition(target_num_rows_per_block=cfg.batch_size).map_batches(
        actor_cls,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        **actor_pool_kwargs(cfg.ray, cfg.num_actors, use_gpu=gpu),
    )
    n_samples = n_pairs = 0
    for batch in mined.iter_batches(batch_format="numpy", batch_size=None):
        n_samples += int(batch["batch_samples"].sum())
        n_pairs += int(batch["batch_pairs"].sum())
    return n_samples, n_pairs


def main(cfg: MinePrefsConfig, actor_cls: type[MinerActor] = MinerActor) -> dict[str, Any]:
    """Mine the samples of ``cfg`` not mined yet, then consolidate ``out_dir``; returns the summary."""
    build_prerequisites(cfg)
    cfg = absolute(cfg)
    store = MiningStore(cfg.out_dir)
    done = store.done_ids()
    start = time.perf_counter()
    if all_mined(cfg.samples_path, cfg.limit, done):
        logger.info("every selected sample of %s is mined already in %s; nothing to mine", cfg.samples_path,
                    cfg.out_dir)
        n_samples = n_pairs = 0
    else:
        n_samples, n_pairs = mine(cfg, done, actor_cls)
    seconds = time.perf_counter() - start
    logger.info(
        "mined %d sample(s) this run (%d pairs) in %.1fs (%.2f samples/s)",
        n_samples,
        n_pairs,
        seconds,
        n_samples / max(seconds, 1e-9),
    )
    summary = store.consolidate(cfg.shard_size, config=to_dict(cfg))
    summary["this_run"] = {"samples": n_samples, "pairs": n_pairs, "seconds": round(seconds, 2)}
    (Path(cfg.out_dir) / "summary.json").write_text(
        json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    logger.info(
        "pairs by type %s, by domain %s; CR %.3f, OR %.3f; %d rejected -> %s",
        summary["pairs_by_type"],
        summary["pairs_by_domain"],
        _rate(summary["alignment"]["cr_rate"]),
        _rate(summary["alignment"]["or_rate"]),
        summary["samples_rejected"],
        cfg.out_dir,
    )
    return summary


def _rate(value: float | None) -> float:
    return float("nan") if value is None else value


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
