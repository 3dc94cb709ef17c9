"""The whole pipeline on the embedded default: every step, building what is missing and saying so.

    python jobs/pipeline.py [--config jobs/configs/pipeline.yaml] [artifacts_dir=DIR] [rebuild=true] \
        [steps=[make_data]] [data.n_per_domain=1000]
    ray job submit --working-dir . -- python jobs/pipeline.py artifacts_dir=/abs/artifacts

Steps (in order; each is also its own job under ``jobs/``): ``make_data`` -> ``prepare_models`` ->
``train_router`` -> ``train_retriever`` (one Ray Train run per domain) -> ``build_index`` (Ray Data) ->
``pretrain_vision`` (the tiny reader's vision tower learns the visible findings of a separate synthetic set: the
stand-in for a pretrained CLIP tower) -> ``pretrain_reader`` (the tiny reader, vision tower frozen, learns that
set's questions without retrieval: the stand-in for a pretrained medical VLM) -> ``train_reader`` (RAG-SFT with
LoRA, Ray Train) -> ``mine_prefs`` (preference pairs, Ray Data) -> ``train_dpo`` (RAG-PT: DPO on D_cm, then
D_oa, Ray Train) -> ``distill_retriever`` (JOMED's heads and MR-RAG's fusion weights from the frozen reader: Ray
Data scoring, Ray Train) -> ``evaluate`` (the RAG-PT ablation and FT RAG vs JOMED on the synthetic test split)
-> ``find_ifa_layers`` (MR-RAG's attention blocking on the validation split: the RAG-PT reader's critical layers
for IFA).
Ray starts once (locally, or joins the cluster under ``ray job submit``) and is shared by the Ray steps.
A step whose outputs already exist under ``artifacts_dir`` is skipped with a log line naming them;
``rebuild=true`` runs the selected steps again.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs import (
    build_index,
    distill_retriever,
    evaluate,
    find_ifa_layers,
    make_data,
    mine_prefs,
    prepare_models,
    pretrain_vision,
    train_dpo,
    train_reader,
    train_retriever,
    train_router,
)
from medrag_ray.config import (
    BuildIndexConfig,
    DistillRetrieverConfig,
    EvaluateConfig,
    FindIFALayersConfig,
    MakeDataConfig,
    MinePrefsConfig,
    PipelineConfig,
    PrepareModelsConfig,
    PretrainVisionConfig,
    RayTrainConfig,
    ReaderContextConfig,
    TrainDPOConfig,
    TrainReaderConfig,
    TrainRetrieverConfig,
    TrainRouterConfig,
    parse_job_args,
)
from medrag_ray.utils import setup_logging

logger = logging.getLogger("jobs.pipeline")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "pipeline.yaml"


@dataclass(frozen=True)
class Step:
    name: str
    output: Path
    """The file whose presence means the step is done."""
    run: Callable[[], Path]


def steps(cfg: PipelineConfig) -> list[Step]:
    """The pipeline's steps wired to paths under ``cfg.artifacts_dir``."""
    root = Path(cfg.artifacts_dir)
    data_dir, models_dir = root / "data" / "synthetic", root / "models" / "init"
    router_dir, retriever_dir, index_dir = root / "models" / "router", root / "models" / "retriever", root / "index"
    reader_dir, prefs_dir = root / "models" / "reader", root / "prefs"
    base_reader_dir, pretrain_data_dir = root / "models" / "reader_base", root / "data" / "reader_pretrain"
    vision_reader_dir, dpo_reader_dir = root / "models" / "reader_vision", root / "models" / "reader_dpo"
    jomed_dir, eval_dir = root / "models" / "retriever_jomed", root / "eval"
    context = ReaderContextConfig(router_dir=str(router_dir), index_dir=str(index_dir))
    storage = cfg.ray_train.storage_path
    if "://" not in storage and not Path(storage).is_absolute():
        storage = str(root / storage)  # relative to artifacts_dir, so the runs live beside the models
    resume = cfg.ray_train.resume and not cfg.rebuild
    ray_train = dataclasses.replace(cfg.ray_train, storage_path=storage, resume=resume)
    all_steps = [
        Step(
            "make_data",
            data_dir / "manifest.json",
            lambda: make_data.main(MakeDataConfig(out_dir=str(data_dir), overwrite=cfg.rebuild, data=cfg.data)),
        ),
        Step(
            "prepare_models",
            models_dir / "prepared.json",
            lambda: prepare_models.main(
                PrepareModelsConfig(
                    dataset_dir=str(data_dir), out_dir=str(models_dir), overwrite=cfg.rebuild, models=cfg.models
                )
            ),
        ),
        Step(
            "train_router",
            router_dir / "metrics.json",
            lambda: train_router.main(
                TrainRouterConfig(
                    dataset_dir=str(data_dir), init_encoder_dir=str(models_dir / "encoder"), out_dir=str(router_dir),
                    overwrite=cfg.rebuild, train=cfg.router_train, ray_train=ray_train, ray=cfg.ray,
                )
            ),
        ),
        Step(
            "train_retriever",
            retriever_dir / "metrics.json",
            lambda: train_retriever.main(
                TrainRetrieverConfig(
                    dataset_dir=str(data_dir), init_encoder_dir=str(models_dir / "encoder"),
                    out_dir=str(retriever_dir), overwrite=cfg.rebuild, train=cfg.retriever_train,
                    ray_train=ray_train, ray=cfg.ray,
                )
            ),
        ),
        Step(
            "build_index",
            index_dir / "manifest.json",
            lambda: build_index.main(
                BuildIndexConfig(
                    corpus_path=str(data_dir / "corpus.parquet"), out_dir=str(index_dir),
                    retrievers_dir=str(retriever_dir), overwrite=cfg.rebuild, ray=cfg.ray,
                )
            ),
        ),
        Step(
            "pretrain_vision",
            vision_reader_dir / "metrics.json",
            lambda: pretrain_vision.main(
                PretrainVisionConfig(
                    dataset_dir=str(reader_pretrain_data(cfg, pretrain_data_dir)),
                    reader_dir=str(models_dir / "reader"), out_dir=str(vision_reader_dir), overwrite=cfg.rebuild,
                    train=cfg.reader_vision, ray_train=ray_train, ray=cfg.ray,
                )
            ),
        ),
        Step(
            "pretrain_reader",
            base_reader_dir / "metrics.json",
            lambda: pretrain_reader(cfg, pretrain_data_dir, vision_reader_dir, base_reader_dir, ray_train),
        ),
        Step(
            "train_reader",
            reader_dir / "metrics.json",
            lambda: train_reader.main(
                TrainReaderConfig(
                    dataset_dir=str(data_dir), reader_dir=str(base_reader_dir), out_dir=str(reader_dir),
                    data_dir=str(root / "data" / "reader_sft"), context=context, overwrite=cfg.rebuild,
                    train=cfg.reader_train, ray_train=ray_train, ray=cfg.ray,
                )
            ),
        ),
        Step(
            "mine_prefs",
            prefs_dir / "summary.json",
            lambda: mine_prefs.main(
                MinePrefsConfig(
                    samples_path=str(data_dir / "samples_train.parquet"), reader_dir=str(reader_dir),
                    context=context, out_dir=str(prefs_dir), limit=cfg.mining_limit, build_missing=False, ray=cfg.ray,
                )
            ),
        ),
        Step(
            "train_dpo",
            dpo_reader_dir / "metrics.json",
            lambda: train_dpo.main(
                TrainDPOConfig(
                    pairs_path=str(prefs_dir / "pairs"), reader_dir=str(reader_dir), out_dir=str(dpo_reader_dir),
                    work_dir=str(root / "data" / "dpo"), overwrite=cfg.rebuild, train=cfg.dpo_train,
                    ray_train=ray_train, ray=cfg.ray,
                )
            ),
        ),
        Step(
            "distill_retriever",
            jomed_dir / "metrics.json",
            lambda: distill_retriever.main(
                DistillRetrieverConfig(
                    dataset_dir=str(data_dir), reader_dir=str(reader_dir), context=context, out_dir=str(jomed_dir),
                    work_dir=str(root / "data" / "distill"), limit=cfg.distill_limit, overwrite=cfg.rebuild,
                    head_train=cfg.distill_head_train, fusion_train=cfg.distill_fusion_train, ray_train=ray_train,
                    ray=cfg.ray,
                )
            ),
        ),
        Step(
            "evaluate",
            eval_dir / "rag_pt.json",
            lambda: evaluate.main(
                EvaluateConfig(
                    samples_path=str(data_dir / "samples_test.parquet"), ground_truth_dir=str(data_dir),
                    reader_dir=str(reader_dir),
                    rag_pt_reader_dirs=(str(root / "data" / "dpo" / "stage1" / "reader"), str(dpo_reader_dir)),
                    context=context, jomed_retriever_dir=str(jomed_dir), limit=cfg.eval_limit,
                    out_dir=str(eval_dir), name="synthetic-test",
                )
            ),
        ),
        Step(
            "find_ifa_layers",
            eval_dir / "critical_layers.json",
            lambda: find_ifa_layers.main(
                FindIFALayersConfig(
                    samples_path=str(data_dir / "samples_val.parquet"), reader_dir=str(dpo_reader_dir),
                    context=context, limit=cfg.ifa_layers_limit, out_dir=str(eval_dir), name="synthetic-val",
                )
            ),
        ),
    ]
    return [s for s in all_steps if s.name in cfg.steps]


def reader_pretrain_data(cfg: PipelineConfig, data_dir: Path) -> Path:
    """The reader's pretraining set in ``data_dir``, generated first when it is missing or on ``rebuild`` (the
    vision and the reader pretraining steps share it; the same config gives byte-identical files)."""
    if cfg.rebuild or not (data_dir / "manifest.json").is_file():
        logger.info("generating the reader's pretraining set in %s", data_dir)
        make_data.main(MakeDataConfig(out_dir=str(data_dir), overwrite=True, data=cfg.reader_pretrain_data))
    return data_dir


def pretrain_reader(
    cfg: PipelineConfig, data_dir: Path, init_reader_dir: Path, out_dir: Path, ray_train: RayTrainConfig
) -> Path:
    """``jobs/configs/train_reader_pretrain.yaml``'s job on the reader's pretraining set (generated if missing),
    starting from ``init_reader_dir`` (the reader with the pretrained vision tower)."""
    base = train_reader.parse_args(["--config", str(train_reader.PRETRAIN_CONFIG)])
    return train_reader.main(
        dataclasses.replace(
            base, dataset_dir=str(reader_pretrain_data(cfg, data_dir)), reader_dir=str(init_reader_dir),
            out_dir=str(out_dir),
            data_dir=str(data_dir.parent / "reader_pretrain_sft"), overwrite=cfg.rebuild, train=cfg.reader_pretrain,
            ray_train=ray_train, ray=cfg.ray,
        )
    )


def parse_args(argv: Sequence[str] | None) -> PipelineConfig:
    return parse_job_args(PipelineConfig, argv, DEFAULT_CONFIG)


def main(cfg: PipelineConfig) -> dict[str, Path]:
    """Run the selected steps in order; returns each step's output."""
    outputs: dict[str, Path] = {}
    for step in steps(cfg):
        if step.output.exists() and not cfg.rebuild:
            logger.info("step %s: found %s, skipping (pass rebuild=true to run it again)", step.name, step.output)
        else:
            logger.info("step %s: building (no %s yet)", step.name, step.output)
            start = time.perf_counter()
            step.run()
            logger.info("step %s: done in %.1fs", step.name, time.perf_counter() - start)
        outputs[step.name] = step.output
    logger.info("pipeline finished; artifacts under %s", Path(cfg.artifacts_dir).resolve())
    return outputs


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
