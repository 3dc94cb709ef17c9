"""Corpus embedding: the Ray Data job vs a plain single-process loop; then FAISS vs NumPy search, in one run.

    python benchmarks/embed_throughput.py [--corpus artifacts/data/synthetic/corpus.parquet] \
        [--encoder-dir artifacts/models/init/encoder] [--n-docs 3000] [--batch-size 64] [--actors 2] \
        [--actor-cpus 0.5] [--search-docs 50000] [--k 10]

(a) Embedding. The corpus is tiled (fresh ids) to ``--n-docs`` documents and written as ``--files`` Parquet
files. Both sides embed the same rows with the same model (:class:`~medrag_ray.retrieval.embed.CorpusEmbedder`,
same ``--batch-size``):

* single process: load the encoder once, then :func:`~medrag_ray.retrieval.embed.embed_table` (torch uses
  every core of the machine);
* Ray Data: ``read_parquet -> repartition(batch_size rows/block) -> map_batches(CorpusEmbedder, actor pool of
  --actors x --actor-cpus CPUs) -> iter_batches`` on the driver, what ``jobs/build_index.py`` runs.

Both times are end to end (model loading included: the actors load it too; Ray's own start-up is not
counted); docs/s and the ratio are printed, with the single-process steady rate (after loading) and the
largest difference between the two sides' embeddings (they must agree).

(b) Search. FAISS flat / IVF / HNSW (through ``DomainIndex``) against NumPy brute force (matmul +
argpartition), with recall@k against the exact top-k, on (i) the embeddings from (a): document texts as the
index, document images as queries (MMed-RAG's image->report retrieval), and (ii) ``--search-docs`` clustered
unit vectors of the encoder's width. Helpers come from ``benchmarks/faiss_search.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from faiss_search import best_time, clustered_unit_vectors, numpy_topk  # this script's folder is on sys.path

from jobs.runtime import actor_pool_kwargs, init_ray, shutdown_ray
from medrag_ray.config import RayConfig
from medrag_ray.retrieval.embed import REJECT_COLUMN, CorpusEmbedder, concat_batches, embed_table
from medrag_ray.retrieval.index import DomainIndex, IndexConfig, IndexMeta
from medrag_ray.utils import setup_logging

logger = logging.getLogger("benchmarks.embed_throughput")


def tiled_corpus(corpus: Path, n_docs: int) -> pa.Table:
    """``n_docs`` rows cycling through the corpus, ids made unique (``<id>~<copy>``)."""
    table = pq.read_table(corpus)
    if table.num_rows == 0:
        raise ValueError(f"{corpus} has no rows")
    copies = -(-n_docs // table.num_rows)
    tiles = []
    for c in range(copies):
        ids = pc.binary_join_element_wise(table.column("id"), pa.scalar(str(c)), "~")
        tiles.append(table.set_column(table.schema.get_field_index("id"), "id", ids))
    return pa.concat_tables(tiles).slice(0, n_docs)


def write_files(table: pa.Table, directory: Path, n_files: int) -> None:
    step = -(-table.num_rows // n_files)
    for i, start in enumerate(range(0, table.num_rows, step)):
        pq.write_table(table.slice(start, step), directory / f"part-{i:03d}.parquet")


def single_process(encoder_dir: str, table: pa.Table, batch_size: int) -> tuple[float, float, dict[str, np.ndarray]]:
    """(end-to-end seconds, embedding-only seconds, output) of the plain loop."""
    start = time.perf_counter()
    embedder = CorpusEmbedder(encoder_dir, device="auto")
    loaded = time.perf_counter()
    out = embed_table(embedder, table, batch_size=batch_size, progress=False)
    end = time.perf_counter()
    return end - start, end - loaded, out


def ray_data(
    encoder_dir: str, files: Path, batch_size: int, ray_cfg: RayConfig, actors: int
) -> tuple[float, float, int, dict[str, np.ndarray]]:
    """The Ray Data pipeline of ``jobs/build_index.py`` (Ray already started).

    Returns (end-to-end seconds, seconds to the first embedded batch -- actor start-up and model loading --,
    rows in that first batch, output).
    """
    start = time.perf_counter()
    ds = (
        ray.data.read_parquet(str(files))
        .repartition(target_num_rows_per_block=batch_size)
        .map_batches(
            CorpusEmbedder,
            fn_constructor_kwargs={"encoder_dir": encoder_dir, "device": "auto"},
            batch_size=batch_size,
            batch_format="numpy",
            **actor_pool_kwargs(ray_cfg, actors),
        )
        .select_columns(["id", "text_emb", "image_emb", REJECT_COLUMN])
    )
    batches, first = [], 0.0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        first = first or time.perf_counter() - start
        batches.append(batch)
    return time.perf_counter() - start, first, len(batches[0]["id"]), concat_batches(batches)


def aligned_max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest |a - b| over both embeddings, rows matched by id (Ray does not keep the row order)."""
    pos = {doc_id: i for i, doc_id in enumerate(b["id"])}
    rows = np.array([pos[doc_id] for doc_id in a["id"]])
    return float(
        max(np.abs(a["text_emb"] - b["text_emb"][rows]).max(), np.abs(a["image_emb"] - b["image_emb"][rows]).max())
    )


def search_table(name: str, docs: np.ndarray, queries: np.ndarray, k: int, args: argparse.Namespace) -> list[str]:
    """Rows comparing FAISS indexes with NumPy brute force on one corpus."""
    ids = [f"doc-{i}" for i in range(docs.shape[0])]
    meta = IndexMeta(domain="radiology", model_id="benchmark")
    numpy_time = best_time(lambda: numpy_topk(docs, queries, k), args.repeats)
    _, exact_rows = numpy_topk(docs, queries, k)
    exact = [{ids[r] for r in row} for row in exact_rows]
    nlist = max(1, min(args.nlist, docs.shape[0] // 39))
    configs = {
        "flat": IndexConfig(kind="flat", use_gpu="never"),
        f"ivf (nlist={nlist}, nprobe={min(args.nprobe, nlist)})": IndexConfig(
            kind="ivf", nlist=nlist, nprobe=min(args.nprobe, nlist), use_gpu="never"
        ),
        f"hnsw (M={args.hnsw_m}, efSearch={args.ef_search})": IndexConfig(
            kind="hnsw", hnsw_m=args.hnsw_m, ef_search=args.ef_search, ef_construction=args.ef_construction,
            use_gpu="never",
        ),
    }
    rows = [
        f"{name}: {docs.shape[0]} docs x {docs.shape[1]}, {queries.shape[0]} queries, k={k}",
        f"  {'method':<32}{'build s':>9}{'search s':>10}{'q/s':>11}{'numpy/method':>14}{'recall@' + str(k):>11}",
        f"  {'numpy matmul+argpartition':<32}{'-':>9}{numpy_time:>10.4f}{queries.shape[0] / numpy_time:>11.0f}"
        f"{1.0:>14.2f}{1.0:>11.3f}",
    ]
    for label, cfg in configs.items():
        start = time.perf_counter()
        index = DomainIndex.build(docs, ids, meta, cfg)
        build = time.perf_counter() - start
        search = best_time(lambda index=index: index.search(queries, k), args.repeats)
        _, found = index.search(queries, k)
        recall = sum(len(set(f) & e) for f, e in zip(found, exact, strict=True)) / (queries.shape[0] * k)
        rows.append(
            f"  {label:<32}{build:>9.2f}{search:>10.4f}{queries.shape[0] / search:>11.0f}"
            f"{numpy_time / search:>14.2f}{recall:>11.3f}"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="artifacts/data/synthetic/corpus.parquet")
    parser.add_argument("--encoder-dir", default="artifacts/models/init/encoder")
    parser.add_argument("--n-docs", type=int, default=3000)
    parser.add_argument("--files", type=int, default=8, help="Parquet files the tiled corpus is written as")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--actor-cpus", type=float, default=0.5)
    parser.add_argument("--ray-cpus", type=int, default=0, help="CPUs of the local Ray (0 = all cores)")
    parser.add_argument("--search-docs", type=int, default=50_000)
    parser.add_argument("--search-queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--ef-construction", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in (Path(args.corpus), Path(args.encoder_dir)):
        if not path.exists():
            sys.exit(f"{path} does not exist; build the default artifacts with `python jobs/pipeline.py`")

    table = tiled_corpus(Path(args.corpus), args.n_docs)
    ray_cfg = RayConfig(num_cpus=args.ray_cpus, actor_num_cpus=args.actor_cpus)
    lines = [
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} driver threads), "
        f"CUDA: {torch.cuda.is_available()}",
        f"(a) embedding {table.num_rows} documents with {args.encoder_dir}, batch {args.batch_size}",
    ]
    logger.info("single-process loop over %d documents", table.num_rows)
    single_total, single_embed, single_out = single_process(args.encoder_dir, table, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="embed_bench_") as tmp:
        write_files(table, Path(tmp), args.files)
        init_ray(ray_cfg)
        try:
            cpus = ray.cluster_resources().get("CPU", 0.0)
            gpus = ray.cluster_resources().get("GPU", 0.0)
            logger.info("Ray Data pipeline: %d actors", args.actors)
            ray_total, ray_first, first_rows, ray_out = ray_data(
                args.encoder_dir, Path(tmp), args.batch_size, ray_cfg, args.actors
            )
        finally:
            shutdown_ray()
    n = table.num_rows
    per_actor = "1 GPU" if gpus >= 1 else f"{args.actor_cpus} CPU"
    lines += [
        f"  {'method':<68}{'seconds':>9}{'docs/s':>10}",
        f"  {'single process, end to end (load + embed)':<68}{single_total:>9.2f}{n / single_total:>10.0f}",
        f"  {'single process, embedding only (steady rate)':<68}{single_embed:>9.2f}{n / single_embed:>10.0f}",
        f"  {f'Ray Data, {args.actors} actors x {per_actor} on a {cpus:.0f}-CPU local Ray, end to end':<68}"
        f"{ray_total:>9.2f}{n / ray_total:>10.0f}",
        f"  {'Ray Data, after the first batch (start-up excluded, steady rate)':<68}{ray_total - ray_first:>9.2f}"
        f"{(n - first_rows) / max(ray_total - ray_first, 1e-9):>10.0f}",
        f"  Ray Data start-up (actors + model load) to the first batch: {ray_first:.2f} s",
        f"  Ray Data / single process (end to end) docs/s ratio: {single_total / ray_total:.2f}",
        f"  rows: {len(ray_out['id'])} from Ray, {len(single_out['id'])} single; rejected "
        f"{sum(bool(r) for r in ray_out[REJECT_COLUMN])}; max |Ray - single| embedding difference "
        f"{aligned_max_diff(single_out, ray_out):.2e}",
    ]

    rng = np.random.default_rng(args.seed)
    unique = np.array([str(i).endswith("~0") for i in single_out["id"]])  # first copy of each document
    lines.append(f"(b) search (faiss, {args.repeats} repeats, best time)")
    lines += search_table(
        "embedded corpus (text index, image queries)", single_out["text_emb"][unique],
        single_out["image_emb"][unique][: args.search_queries], args.k, args,
    )
    dim = single_out["text_emb"].shape[1]
    data = clustered_unit_vectors(args.search_docs + args.search_queries, dim, 200, rng)
    lines += search_table(
        "clustered unit vectors", data[: args.search_docs], data[args.search_docs :], args.k, args
    )
    print("\n".join(lines))


if __name__ == "__main__":
    setup_logging()
    main()
