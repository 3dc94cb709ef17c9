"""RAG-PT: DPO of the reader with LoRA in stages (MMed-RAG §2.3, Eq. 3/4) on Ray Train with DeepSpeed.

    python jobs/train_dpo.py [--config jobs/configs/train_dpo.yaml] [beta=0.1] [train.epochs=3] [overwrite=true]
    python jobs/train_dpo.py pairs_path=/data/alignment.parquet reader_dir=/models/llava-med-v1.5-hf \
        train.zero_stage=3 ray_train.num_workers=8
    ray job submit --working-dir . -- python jobs/train_dpo.py ray_train.storage_path=/shared/ray_train \
        work_dir=/shared/dpo out_dir=/shared/models/reader_dpo

For each stage (default: stage 1 on D_cm, stage 2 on D_oa) the driver selects the stage's pairs, splits them
into train/val by sample id and writes them to ``work_dir/stage<i>/``; the Ray Train run ``<run_name>-stage<i>``
then trains fresh LoRA adapters on the previous stage's reader (whose weights are also the frozen reference) and
exports the merged reader to ``work_dir/stage<i>/reader``; a stage without training pairs is skipped with a
warning (and recorded as skipped), none at all is an error. ``out_dir`` receives the last stage's reader and
``metrics.json`` with every stage's history. Re-running the same command resumes each run from its last
checkpoint (a finished stage is re-exported, not retrained).
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import functools
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobs.runtime import init_ray
from jobs.train_common import export_result, fit
from medrag_ray.config import TrainDPOConfig, parse_job_args, to_dict
from medrag_ray.data.schema import PreferencePair, write_parquet
from medrag_ray.reader.dpo import NoiseSettings, make_reader_dpo_task, read_pairs, split_pairs
from medrag_ray.utils import atomic_output_dir, check_writable, setup_logging

logger = logging.getLogger("jobs.train_dpo")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "train_dpo.yaml"


def parse_args(argv: Sequence[str] | None) -> TrainDPOConfig:
    return parse_job_args(TrainDPOConfig, argv, DEFAULT_CONFIG)


def write_stage_pairs(cfg: TrainDPOConfig, kinds: Sequence[str], directory: Path) -> dict[str, int]:
    """Select ``kinds`` from ``cfg.pairs_path``, split them, write ``train.parquet``/``val.parquet``; counts
    (``train`` 0: the stage has nothing to train on and nothing is written)."""
    pairs = read_pairs(cfg.pairs_path, kinds)
    train, val = split_pairs(pairs, cfg.val_fraction, cfg.train.seed)
    if not train:
        return {"train": 0, "val": len(val)}
    directory.mkdir(parents=True, exist_ok=True)
    write_parquet(train, PreferencePair, directory / "train.parquet")
    write_parquet(val, PreferencePair, directory / "val.parquet")
    return {"train": len(train), "val": len(val)}


def main(cfg: TrainDPOConfig) -> Path:
    """Run every stage of ``cfg``; returns ``cfg.out_dir`` (the last stage's reader)."""
    check_writable(cfg.out_dir, cfg.overwrite)
    if not Path(cfg.pairs_path).exists():
        raise FileNotFoundError(
            f"pairs_path {cfg.pairs_path} does not exist; mine pairs with `python jobs/mine_prefs.py`"
        )
    if not Path(cfg.reader_dir).is_dir():
        raise FileNotFoundError(
            f"reader_dir {cfg.reader_dir} does not exist; train it with `python jobs/pipeline.py` (train_reader) or "
            "point it at a reader / real local VLM directory"
        )
    work = Path(cfg.work_dir).resolve()
    counts = [write_stage_pairs(cfg, kinds, work / f"stage{i}") for i, kinds in enumerate(cfg.stages, start=1)]
    if not any(n["train"] for n in counts):
        raise ValueError(
            f"{cfg.pairs_path} has no training pair of the kinds {[list(k) for k in cfg.stages]} (counts {counts}); "
            "mine more samples (jobs/mine_prefs.py limit=0), lower val_fraction or change stages=[...]"
        )
    init_ray(cfg.ray)
    noise = NoiseSettings(kind=cfg.noise_kind, step=cfg.noise_step, seed=cfg.train.seed)
    reader_dir, stages = str(Path(cfg.reader_dir).resolve()), []
    for i, (kinds, n) in enumerate(zip(cfg.stages, counts, strict=True), start=1):
        name, stage_dir = f"{cfg.run_name}-stage{i}", work / f"stage{i}"
        if not n["train"]:
            logger.warning("%s: no training pair of kinds %s in %s; skipping it", name, list(kinds), cfg.pairs_path)
            stages.append({"stage": i, "kinds": list(kinds), "pairs": n, "skipped": "no training pairs"})
            continue
        logger.info("%s: %s pairs %s, starting from %s", name, list(kinds), n, reader_dir)
        factory = functools.partial(
            make_reader_dpo_task, name, reader_dir, str(stage_dir), cfg.lora, cfg.beta, noise
        )
        result = fit(name, factory, cfg.train, cfg.ray_train)
        shutil.rmtree(stage_dir / "reader", ignore_errors=True)
        state = export_result(result, stage_dir / "reader")
        stages.append({"stage": i, "kinds": list(kinds), "pairs": n, "reader_dir": reader_dir, **_final(state)})
        reader_dir = str(stage_dir / "reader")
    with atomic_output_dir(cfg.out_dir, cfg.overwrite) as tmp:
        shutil.copytree(reader_dir, tmp, dirs_exist_ok=True)
        metrics = {"config": to_dict(cfg), "stages": stages}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    logger.info("RAG-PT done: %s; reader written to %s", json.dumps([s.get("final") for s in stages]), cfg.out_dir)
    return Path(cfg.out_dir)


def _final(state: dict[str, Any]) -> dict[str, Any]:
    return {"final": state["history"][-1], "history": state["history"]}


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
