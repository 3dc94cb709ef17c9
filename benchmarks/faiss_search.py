"""FAISS (flat / IVF / HNSW via ``DomainIndex``) vs brute-force NumPy top-k, measured in one run.

    python benchmarks/faiss_search.py --n-docs 100000 --dim 64 --n-queries 1000 --k 10

Data: unit-norm vectors around random cluster centres (a stand-in for a domain's report embeddings).
Brute force = ``queries @ docs.T`` + ``argpartition`` + sort of the k best. Each method's search time is
the best of ``--repeats`` runs; ratios are brute-force time / method time (> 1: faster than NumPy).
Recall@k is measured against the exact (brute-force) top-k ids.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import faiss
import numpy as np

from medrag_ray.retrieval.index import DomainIndex, IndexConfig, IndexMeta


def clustered_unit_vectors(n: int, dim: int, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    centers = rng.standard_normal((n_clusters, dim))
    x = centers[rng.integers(0, n_clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_topk(docs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ docs.T
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-part_scores, axis=1)
    return np.take_along_axis(part_scores, order, axis=1), np.take_along_axis(part, order, axis=1)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-docs", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--ef-construction", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    data = clustered_unit_vectors(args.n_docs + args.n_queries, args.dim, args.clusters, rng)
    docs, queries = data[: args.n_docs], data[args.n_docs :]  # queries drawn from the documents' clusters
    ids = [f"doc-{i}" for i in range(args.n_docs)]
    meta = IndexMeta(domain="radiology", model_id="benchmark")

    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; corpus {args.n_docs} x "
        f"{args.dim}, {args.n_queries} queries, k={args.k}, best of {args.repeats}"
    )
    numpy_time = best_time(lambda: numpy_topk(docs, queries, args.k), args.repeats)
    _, exact_rows = numpy_topk(docs, queries, args.k)
    exact = [{ids[r] for r in row} for row in exact_rows]

    configs = {
        "flat": IndexConfig(kind="flat", use_gpu="never"),
        f"ivf (nlist={args.nlist}, nprobe={args.nprobe})": IndexConfig(
            kind="ivf", nlist=args.nlist, nprobe=args.nprobe, use_gpu="never"
        ),
        f"hnsw (M={args.hnsw_m}, efSearch={args.ef_search})": IndexConfig(
            kind="hnsw", hnsw_m=args.hnsw_m, ef_search=args.ef_search,
            ef_construction=args.ef_construction, use_gpu="never",
        ),
    }
    header = f"{'method':<34}{'build s':>9}{'search s':>10}{'q/s':>11}{'numpy/method':>14}{'recall@k':>10}"
    rows = [f"{'numpy matmul+argpartition':<34}{'-':>9}{numpy_time:>10.4f}"
            f"{args.n_queries / numpy_time:>11.0f}{1.0:>14.2f}{1.0:>10.3f}"]
    for name, cfg in configs.items():
        start = time.perf_counter()
        index = DomainIndex.build(docs, ids, meta, cfg)
        build_time = time.perf_counter() - start
        search_time = best_time(lambda index=index: index.search(queries, args.k), args.repeats)
        _, found = index.search(queries, args.k)
        recall = sum(len(set(f) & e) for f, e in zip(found, exact, strict=True)) / (args.n_queries * args.k)
        rows.append(
            f"{name:<34}{build_time:>9.2f}{search_time:>10.4f}{args.n_queries / search_time:>11.0f}"
            f"{numpy_time / search_time:>14.2f}{recall:>10.3f}"
        )
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
