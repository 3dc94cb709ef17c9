"""Retrieval-augmented SFT of the reader with LoRA (JOMED stage 1) on Ray Train with DeepSpeed.

    python jobs/train_reader.py [--config jobs/configs/train_reader.yaml] [train.epochs=4] [lora.r=16] \
        [context.style=jomed] [tasks=[closed,report]] [overwrite=true]
    python jobs/train_reader.py --config jobs/configs/train_reader_pretrain.yaml   # the tiny reader's pretraining
    ray job submit --working-dir . -- python jobs/train_reader.py ray_train.storage_path=/shared/ray_train

The driver routes and retrieves once for every train/val sample (router -> domain index -> adaptive-k; a
sample's own case report is excluded) and writes the examples to ``data_dir``. The Ray Train run
``<run_name>`` then fine-tunes LoRA adapters with :mod:`medrag_ray.train.loop` (checkpoint every epoch,
resume on re-run, restart of failed workers) and ``out_dir`` receives the merged reader, ``adapter/`` and
``metrics.json`` (closed accuracy with and without retrieval on val, per epoch). With ``rag_fraction=0``
nothing is retrieved; ``context_source=phenotype`` (the tiny reader's pretraining,
``train_reader_pretrain.yaml``, ``finetune=full``: every parameter, no adapter) builds multi-turn reading
conversations from a synthetic dataset's ground truth instead of retrieving
(:func:`medrag_ray.reader.curriculum.reading_conversations`).
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
from jobs.train_common import fit_to_dir
from medrag_ray.config import TrainReaderConfig, parse_job_args
from medrag_ray.data.schema import CorpusDoc, Sample, read_parquet
from medrag_ray.data.subset import take_spread
from medrag_ray.data.synthetic import CORPUS_NAME, MANIFEST_NAME
from medrag_ray.eval.diagnostics import load_case_truths
from medrag_ray.reader.context import SampleContext, retrieve_contexts, sample_image
from medrag_ray.reader.curriculum import reading_conversations
from medrag_ray.reader.sft import SFTExample, build_sft_examples, make_reader_sft_task, write_sft_examples
from medrag_ray.retrieval.retriever import MultimodalRetriever
from medrag_ray.train.tasks import dataset_file
from medrag_ray.utils import check_writable, setup_logging

logger = logging.getLogger("jobs.train_reader")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "train_reader.yaml"
PRETRAIN_CONFIG = DEFAULT_CONFIG.with_name("train_reader_pretrain.yaml")


def parse_args(argv: Sequence[str] | None) -> TrainReaderConfig:
    return parse_job_args(TrainReaderConfig, argv, DEFAULT_CONFIG)


def selected(samples: Sequence[Sample], cfg: TrainReaderConfig) -> list[Sample]:
    """The samples of ``cfg.tasks`` whose meta matches ``cfg.meta_filter``."""
    out = []
    for s in samples:
        meta = json.loads(s.meta) if cfg.meta_filter else {}
        if s.answer_type in cfg.tasks and all(meta.get(k) == v for k, v in cfg.meta_filter.items()):
            out.append(s)
    return out


def reading_examples(cfg: TrainReaderConfig, samples: Sequence[Sample], draws: int) -> list[SFTExample]:
    """``context_source=phenotype``: the tiny reader's pretraining conversations (``draws`` per case) from the
    ground truth of ``cfg.dataset_dir``."""
    manifest, corpus = Path(cfg.dataset_dir) / MANIFEST_NAME, Path(cfg.dataset_dir) / CORPUS_NAME
    missing = [str(p) for p in (manifest, corpus) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"context_source=phenotype needs a synthetic dataset's {MANIFEST_NAME} and {CORPUS_NAME}; missing "
            f"{missing}: point dataset_dir at `python jobs/make_data.py` output or use context_source=retrieval"
        )
    retrieval = cfg.context.retrieval
    k = retrieval.k_max if retrieval.k_max is not None else retrieval.k
    return reading_conversations(
        samples, read_parquet(corpus, CorpusDoc), load_case_truths(manifest), k, cfg.rag_fraction, draws,
        cfg.train.seed,
    )


def write_examples(cfg: TrainReaderConfig) -> Path:
    """Retrieve context for the train and val samples of ``cfg.tasks`` (or build the pretraining conversations,
    ``context_source=phenotype``); write them to ``cfg.data_dir``."""
    retriever = None
    if cfg.rag_fraction > 0 and cfg.context_source == "retrieval":
        retriever = MultimodalRetriever.from_artifacts(
            cfg.context.router_dir, cfg.context.index_dir, with_images=cfg.context.style == "jomed"
        )
    out = Path(cfg.data_dir)
    for split in ("train", "val"):
        path = dataset_file(cfg.dataset_dir, f"samples_{split}.parquet")
        samples = selected(read_parquet(path, Sample), cfg)
        if not samples:
            raise ValueError(
                f"no {split} sample of {path} has answer_type in tasks={list(cfg.tasks)} and meta matching "
                f"meta_filter={cfg.meta_filter}; fix tasks / meta_filter or dataset_dir"
            )
        if cfg.context_source == "phenotype":
            examples = reading_examples(cfg, samples, cfg.draws if split == "train" else 1)
            if split == "val":  # one conversation per case; the files are grouped by domain
                examples = take_spread(examples, [e.domain for e in examples], cfg.max_val)
        else:
            if split == "val":  # the files are grouped by domain: spread the subset over them
                samples = take_spread(samples, [s.domain for s in samples], cfg.max_val)
            if retriever is None:
                contexts = [SampleContext(s.domain, None) for s in samples]
            else:
                contexts = retrieve_contexts(
                    retriever,
                    samples,
                    [sample_image(s) for s in samples],
                    cfg.context.retrieval,
                    with_images=cfg.context.style == "jomed",
                )
            examples = build_sft_examples(samples, contexts, cfg.rag_fraction, cfg.train.seed)
        write_sft_examples(examples, out / f"{split}.parquet")
        logger.info(
            "%s: %d examples (%d questions), %d with reports in the prompt (%.2f on average)",
            split,
            len(examples),
            sum(1 + len(e.follow_ups) for e in examples),
            sum(e.use_rag for e in examples),
            sum(len(e.context_texts) for e in examples if e.use_rag) / max(1, sum(e.use_rag for e in examples)),
        )
    return out


def main(cfg: TrainReaderConfig) -> Path:
    """Fine-tune the reader of ``cfg``; returns ``cfg.out_dir``."""
    check_writable(cfg.out_dir, cfg.overwrite)
    if not Path(cfg.reader_dir).is_dir():
        raise FileNotFoundError(
            f"reader_dir {cfg.reader_dir} does not exist; build the tiny default with `python jobs/pipeline.py "
            "steps=[make_data,prepare_models,pretrain_reader]` or point it at a reader directory / real local VLM"
        )
    data_dir = write_examples(cfg)
    init_ray(cfg.ray)
    factory = functools.partial(
        make_reader_sft_task,
        cfg.run_name,
        str(Path(cfg.reader_dir).resolve()),
        str(data_dir.resolve()),
        cfg.lora,
        cfg.context.style,
        cfg.max_val,
        cfg.finetune,
        cfg.freeze_vision_tower,
    )
    fit_to_dir(cfg, factory, cfg.out_dir, cfg.overwrite)
    return Path(cfg.out_dir)


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
