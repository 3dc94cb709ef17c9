"""RAG-PT DPO training throughput: pairs/s of ``jobs/train_dpo.py`` with 1 vs 2 Ray Train workers, in one run.

    python benchmarks/dpo_throughput.py [--artifacts artifacts] [--pairs 256] [--pairs-dir DIR] [--epochs 2] \
        [--batch-size 4]

On the same reader (``<artifacts>/models/reader``) and the same mined pairs (the first ``--pairs`` of
``<artifacts>/prefs/pairs``, every kind in one stage; run ``python jobs/pipeline.py`` first), each run trains
``--epochs`` epochs with ``--batch-size`` pairs per worker per step. Throughput is training pairs over the
epochs' own seconds (``epoch_seconds`` in the run history: the loop, not Ray's start-up or checkpoints); the
first epoch is left out when there are several (DeepSpeed and data-loader warm-up). Prints both and the ratio.
On a GPU cluster the same script measures GPU workers (``use_gpu=auto``).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from jobs import train_dpo
from jobs.runtime import shutdown_ray
from medrag_ray.data.schema import PreferencePair, read_parquet, write_parquet
from medrag_ray.utils import setup_logging

logger = logging.getLogger("benchmarks.dpo_throughput")


def run(workers: int, pairs_path: Path, reader_dir: Path, scratch: Path, epochs: int, batch_size: int) -> float:
    """Pairs per second of one ``train_dpo`` run with ``workers`` Ray Train workers."""
    out = train_dpo.main(train_dpo.parse_args([
        f"pairs_path={pairs_path}", f"reader_dir={reader_dir}", f"out_dir={scratch / f'out{workers}'}",
        f"work_dir={scratch / f'work{workers}'}", "stages=[[cm,oa1,oa2,oa]]", "val_fraction=0",
        f"train.epochs={epochs}", f"train.batch_size={batch_size}", f"ray_train.num_workers={workers}",
        f"ray_train.storage_path={scratch / 'ray_train'}", f"run_name=bench{workers}", "ray.num_cpus=4",
    ]))
    [stage] = json.loads((out / "metrics.json").read_text())["stages"]
    history = stage["history"][1:] if len(stage["history"]) > 1 else stage["history"]
    n_train = stage["pairs"]["train"]
    steps_per_epoch = n_train // (batch_size * workers)
    trained = steps_per_epoch * batch_size * workers * len(history)  # drop_last: whole steps only
    seconds = sum(h["epoch_seconds"] for h in history)
    logger.info("%d worker(s): %d pairs in %.1fs of training", workers, trained, seconds)
    return trained / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--pairs-dir", type=Path, default=None, help="default: <artifacts>/prefs/pairs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    setup_logging()
    pairs_dir = args.pairs_dir or args.artifacts / "prefs" / "pairs"
    pairs = read_parquet(pairs_dir, PreferencePair)[: args.pairs]
    if len(pairs) < 4 * args.batch_size:
        raise SystemExit(f"only {len(pairs)} mined pairs in {pairs_dir}; mine more (mining_limit=0) or lower --pairs")
    with tempfile.TemporaryDirectory(prefix="dpo_bench_") as tmp:
        scratch = Path(tmp)
        write_parquet(pairs, PreferencePair, scratch / "pairs.parquet")
        rates = {}
        try:
            for workers in (1, 2):
                rates[workers] = run(workers, scratch / "pairs.parquet", args.artifacts / "models" / "reader",
                                     scratch, args.epochs, args.batch_size)
        finally:
            shutdown_ray()
    print(f"DPO training on {len(pairs)} pairs, batch {args.batch_size} per worker, {args.epochs} epoch(s):")
    print(f"  1 worker : {rates[1]:.2f} pairs/s")
    print(f"  2 workers: {rates[2]:.2f} pairs/s  ({rates[2] / rates[1]:.2f}x)")


if __name__ == "__main__":
    main()
