"""Embed a document corpus with Ray Data and build (or extend) the per-domain FAISS indexes R_d.

    python jobs/build_index.py [--config jobs/configs/build_index.yaml] [corpus_path=FILE|DIR] [out_dir=DIR] \
        [retrievers_dir=DIR | encoder_dir=DIR] [mode=build|add] [overwrite=true] [index.kind=hnsw] \
        [num_actors=4] [batch_size=256]

Pipeline per domain (one retriever R_d each, or one ``encoder_dir`` for all):
``ray.data.read_parquet(corpus)`` -> filter the domain -> blocks of ``batch_size`` rows ->
``map_batches(CorpusEmbedder, actor pool)`` (one GPU per actor when the cluster has GPUs, fractional CPUs
otherwise) -> rejected rows to ``rejects.jsonl`` -> ``write_parquet`` of the embeddings and of the
documents -> on the driver: one text and one image FAISS index per domain built from the embeddings on
disk, saved with their metadata, and ``manifest.json`` (layout: :mod:`medrag_ray.retrieval.embed`).

``mode=build`` writes a new store through :func:`~medrag_ray.utils.atomic_output_dir` (a failed run leaves
the previous store untouched). ``mode=add`` embeds the documents in ``corpus_path`` into a staging folder
and appends them with :func:`~medrag_ray.retrieval.embed.add_documents` (no rebuild, atomic). Everything
that would fail later -- a missing retriever directory, a corpus with repeated ids, an existing store
without ``overwrite``, adding ids that are indexed already or with another model -- fails before Ray starts.
Paths are local (or shared-filesystem) paths, made absolute on the driver: on a multi-node cluster the
corpus, the encoder directories and ``out_dir`` must be on storage every node reaches (workers read the
corpus and encoders and write the docs Parquet).
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import ray
from ray.data import Dataset
from ray.data.datasource import FilenameProvider
from ray.data.expressions import col

from jobs.runtime import actor_pool_kwargs, init_ray
from medrag_ray.config import BuildIndexConfig, parse_job_args
from medrag_ray.data.schema import CORPUS_SCHEMA
from medrag_ray.retrieval.embed import (
    CorpusEmbedder,
    DomainEmbeddings,
    IndexInputError,
    IndexJobPlan,
    IndexJobResult,
    add_documents,
    concat_embeddings,
    docs_dir,
    finalize_store,
    group_by_domain,
    iter_reject_summary,
    part_filename,
    plan_index_job,
    read_all_embeddings,
    read_docs_table,
    split_rejects,
    write_embeddings_part,
)
from medrag_ray.utils import atomic_output_dir, setup_logging

logger = logging.getLogger("jobs.build_index")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "build_index.yaml"


class PartFilenames(FilenameProvider):
    """``part-<generation>-<tag>-<write uuid>-<task>`` (Ray appends ``-<i>.parquet``): sorted = row order."""

    def __init__(self, generation: int, tag: str) -> None:
        super().__init__(file_format="parquet")
        self.prefix = f"part-{generation:06d}-{tag}"

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.prefix}-{write_uuid}-{task_index:05d}"


def parse_args(argv: Sequence[str] | None) -> BuildIndexConfig:
    return parse_job_args(BuildIndexConfig, argv, DEFAULT_CONFIG)


def _use_gpu(cfg: BuildIndexConfig) -> bool | None:
    """GPU actors: detected from the cluster with ``device=auto``, never with ``cpu``, always with ``cuda``."""
    return None if cfg.device == "auto" else cfg.device == "cuda"


def embed_group(
    corpus: Dataset, domains: Sequence[str], encoder_dir: str, cfg: BuildIndexConfig, store_dir: Path
) -> tuple[dict[str, int], list[dict[str, str]]]:
    """Embed the documents of ``domains`` (which share ``encoder_dir``) with one actor pool.

    The actors stream embedded blocks to the driver, which splits off the rejects and writes one embeddings
    part per domain (the driver needs every vector for the FAISS build anyway; they are small). The
    documents themselves never pass through the driver: Ray Data workers write ``docs/<domain>/`` straight
    from the corpus, without the rejected ids. Returns the accepted count per domain and the rejects.
    """
    start = time.perf_counter()
    docs = corpus.filter(expr=col("domain").is_in(list(domains)))
    embedded = docs.repartition(target_num_rows_per_block=cfg.batch_size).map_batches(
        CorpusEmbedder,
        fn_constructor_kwargs={"encoder_dir": encoder_dir, "device": cfg.device, "image_root": cfg.image_root},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        **actor_pool_kwargs(cfg.ray, cfg.actor_pool_size(), use_gpu=_use_gpu(cfg)),
    )
    parts: dict[str, list[DomainEmbeddings]] = {d: [] for d in domains}
    rejects: list[dict[str, str]] = []
    for batch in embedded.iter_batches(batch_format="numpy", batch_size=None):
        accepted_rows, batch_rejects = split_rejects(batch)
        rejects.extend(batch_rejects)
        for domain, emb in group_by_domain(accepted_rows).items():
            parts[domain].append(emb)
    for line in iter_reject_summary(rejects):
        logger.warning("reject %s", line)
    accepted: dict[str, int] = {}
    for domain in domains:
        accepted[domain] = sum(len(e) for e in parts[domain])
        if not accepted[domain]:
            continue
        write_embeddings_part(store_dir, concat_embeddings(parts[domain]), part_filename(0, "build"))
        kept = docs.filter(expr=col("domain") == domain)
        reject_ids = [r["id"] for r in rejects if r["domain"] == domain]
        if reject_ids:
            kept = kept.filter(expr=col("id").not_in(reject_ids))
        kept.select_columns(CORPUS_SCHEMA.names).write_parquet(
            str(docs_dir(store_dir, domain)), filename_provider=PartFilenames(0, "build")
        )
    logger.info(
        "%s: embedded %s, rejected %d, in %.1fs (encoder %s)", list(domains), accepted, len(rejects),
        time.perf_counter() - start, encoder_dir,
    )
    return accepted, rejects


def embed_all(cfg: BuildIndexConfig, plan: IndexJobPlan, store_dir: Path) -> tuple[dict[str, int], list[dict]]:
    """Embed every planned domain into ``store_dir`` (one actor pool per distinct encoder).

    Returns accepted counts per domain and all reject records; raises when a domain of a build (or the
    whole addition) has nothing left to index.
    """
    corpus = ray.data.read_parquet(str(Path(cfg.corpus_path).resolve()))
    groups: dict[str, list[str]] = {}
    for domain in plan.domains:
        groups.setdefault(plan.encoders[domain].encoder_dir, []).append(domain)
    added: dict[str, int] = {}
    rejects: list[dict[str, str]] = []
    for encoder_dir, domains in groups.items():
        group_added, group_rejects = embed_group(corpus, domains, encoder_dir, cfg, store_dir)
        added.update(group_added)
        rejects.extend(group_rejects)
    if cfg.mode == "build":
        empty = [d for d, n in added.items() if n == 0]
        if empty:
            raise IndexInputError(
                f"every document of domain(s) {empty} was rejected, so there is nothing to index; first rejects: "
                f"{list(iter_reject_summary(rejects))}"
            )
    elif not any(added.values()):
        raise IndexInputError(
            f"every one of the {len(rejects)} new documents was rejected; first rejects: "
            f"{list(iter_reject_summary(rejects))}"
        )
    return added, rejects


def _counts(rejects: list[dict], domains: Sequence[str]) -> dict[str, int]:
    return {d: sum(1 for r in rejects if r["domain"] == d) for d in domains}


def main(cfg: BuildIndexConfig) -> IndexJobResult:
    """Build (``mode=build``) or extend (``mode=add``) the index store in ``cfg.out_dir``."""
    start = time.perf_counter()
    plan = plan_index_job(cfg)  # everything that can be checked without Ray fails here
    for d in plan.domains:
        logger.info("%s: %d documents, encoder %s (%s)", d, plan.counts[d], plan.encoders[d].encoder_dir,
                    plan.encoders[d].model_id)
    if plan.manifest is not None:
        kinds = {e.index_kind for e in plan.manifest.domains.values()}
        if cfg.index is not None and {cfg.index_config().kind} != kinds:
            logger.warning("mode=add keeps the store's %s indexes; index.kind=%s is ignored", kinds, cfg.index.kind)
    init_ray(cfg.ray)
    out = Path(cfg.out_dir).resolve()
    if cfg.mode == "build":
        with atomic_output_dir(out, overwrite=cfg.overwrite) as tmp:
            added, rejects = embed_all(cfg, plan, tmp)
            manifest = finalize_store(tmp, plan.encoders, cfg.index_config(), rejects)
    else:
        staging = out.parent / f".{out.name}.add-staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            added, rejects = embed_all(cfg, plan, staging)
            new = read_all_embeddings(staging)
            docs = pa.concat_tables([read_docs_table(staging, d) for d in new])
            manifest = add_documents(out, new, docs, plan.encoders, rejects)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    result = IndexJobResult(
        out_dir=out,
        mode=cfg.mode,
        manifest=manifest,
        added=added,
        rejected=_counts(rejects, plan.domains),
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "%s %s in %.1fs: added %s, rejected %s, index sizes %s",
        "built" if cfg.mode == "build" else "extended", out, result.seconds, result.added, result.rejected,
        {d: e.n_docs for d, e in manifest.domains.items()},
    )
    return result


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
