"""Preference-mining throughput: the Ray Data job vs the reference code's style, measured in one run.

    python benchmarks/mining_throughput.py [--n 128] [--artifacts artifacts] [--num-actors 2]

On the same reader, retriever and samples (the first ``n`` closed questions of the synthetic train split;
run ``python jobs/pipeline.py`` first):

* **sequential**: one sample at a time, each reader pass answered by greedy generation (batch 1,
  ``max_new_tokens=8``) and parsed -- how MMed-RAG's reference scripts query the model;
* **batched logits** (one process): :meth:`PreferenceMiner.mine_batch` on batches of 32, each pass scored
  from the answer-token logits in shared forward passes;
* **Ray Data job**: ``jobs/mine_prefs.py`` (actor pool), end to end including Ray and actor start-up.

Prints samples/s of each and the ratios; also checks that the batched logit answers equal the
sequential generated ones where generation produced a parseable yes/no.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from jobs import mine_prefs
from jobs.runtime import shutdown_ray
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import SAMPLE_SCHEMA, Sample, read_parquet, to_table
from medrag_ray.mining.miner import MiningSettings, PreferenceMiner, check_sample
from medrag_ray.mining.noise import noisy_image, sample_seed
from medrag_ray.models.reader import load_reader
from medrag_ray.reader.answers import normalize_closed
from medrag_ray.reader.context import reader_input, retrieve_contexts
from medrag_ray.reader.engine import ReaderEngine
from medrag_ray.retrieval.retriever import MultimodalRetriever
from medrag_ray.utils import setup_logging

logger = logging.getLogger("benchmarks.mining_throughput")


def sequential(miner: PreferenceMiner, samples: list[Sample], engine: ReaderEngine) -> tuple[float, list[list[str]]]:
    """Reference style: per sample, retrieve, noise, then three generated answers (batch 1)."""
    cfg = miner.settings
    answers = []
    start = time.perf_counter()
    for s in samples:
        image, _ = check_sample(s)
        [ctx] = retrieve_contexts(miner.retriever, [s], [image], cfg.retrieval)
        [doc] = miner.retriever.least_similar_docs([image], [ctx.domain])
        noisy = noisy_image(load_image(doc.image_bytes), cfg.noise_step, sample_seed(cfg.seed, s.id), cfg.noise_kind)
        inputs = [reader_input(s, image, ctx), reader_input(s, image, None), reader_input(s, noisy, ctx)]
        answers.append([normalize_closed(engine.generate([inp], max_new_tokens=8)[0]) or "?" for inp in inputs])
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="closed questions to mine")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--num-actors", type=int, default=2)
    args = parser.parse_args()
    setup_logging()
    root = Path(args.artifacts)
    reader_dir = root / "models" / "reader"
    if not reader_dir.is_dir():
        reader_dir = root / "models" / "init" / "reader"
    samples_path = root / "data" / "synthetic" / "samples_train.parquet"
    samples = [s for s in read_parquet(samples_path, Sample) if s.answer_type == "closed"][: args.n]
    retriever = MultimodalRetriever.from_artifacts(root / "models" / "router", root / "index")
    model, processor = load_reader(reader_dir)
    settings = MiningSettings()
    miner = PreferenceMiner(retriever, ReaderEngine(model, processor, batch_size=32), settings)

    seq_s, seq_answers = sequential(miner, samples, ReaderEngine(model, processor, batch_size=1))
    start = time.perf_counter()
    outcomes = []
    for i in range(0, len(samples), 32):
        outcomes.extend(miner.mine_batch(samples[i : i + 32]).outcomes)
    batched_s = time.perf_counter() - start
    parsed = [(o, a) for o, a in zip(outcomes, seq_answers, strict=True) if "?" not in a]
    agree = sum([o["rag"], o["no_rag"], o["noisy_rag"]] == a for o, a in parsed)

    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "samples.parquet"
        pq.write_table(to_table(samples, Sample).cast(SAMPLE_SCHEMA), subset)
        cfg = mine_prefs.parse_args(
            [
                f"samples_path={subset}",
                f"reader_dir={reader_dir}",
                f"out_dir={tmp}/prefs",
                f"context.router_dir={root / 'models' / 'router'}",
                f"context.index_dir={root / 'index'}",
                f"num_actors={args.num_actors}",
                "build_missing=false",
            ]
        )
        start = time.perf_counter()
        try:
            mine_prefs.main(cfg)
        finally:
            shutdown_ray()
        ray_s = time.perf_counter() - start
    n = len(samples)
    print(f"{n} closed questions, 3 reader passes each, reader {reader_dir}")
    print(f"sequential generate (batch 1): {n / seq_s:8.2f} samples/s  ({seq_s:.1f} s)")
    print(f"batched logit scoring:         {n / batched_s:8.2f} samples/s  ({batched_s:.1f} s)")
    print(f"Ray Data job (end to end):     {n / ray_s:8.2f} samples/s  ({ray_s:.1f} s)")
    print(f"ratio batched logits / sequential generate: {seq_s / batched_s:.2f}x")
    print(f"ratio Ray Data job / sequential generate:   {seq_s / ray_s:.2f}x")
    print(f"answers agree (logits vs parsed generation): {agree} of {len(parsed)} samples with parseable generations")


if __name__ == "__main__":
    main()
