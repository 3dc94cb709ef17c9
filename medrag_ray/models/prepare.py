"""Build the initial tiny offline models for a dataset: tokenizer, dual encoder, domain router, reader.

This is the pipeline step that turns a fresh clone into something every later step can load: a BPE
tokenizer trained offline on the dataset's *train* split (reports, questions, answers; never val/test),
and the dual encoder (retriever R_d / router tower), the router F(x_v) and the LLaVA-style reader M built
from their configs with seeded random weights. Training them is the job of the later steps; here each one
is saved, loaded back and run once on real dataset rows, so a broken install fails here, loudly.

Output layout (``out_dir``)::

    tokenizer/  encoder/  router/  reader/  prepared.json
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medrag_ray.config import TinyModelsConfig, to_dict
from medrag_ray.data.schema import CorpusDoc, Sample, read_parquet
from medrag_ray.models.dual_encoder import build_dual_encoder, load_dual_encoder, save_dual_encoder
from medrag_ray.models.reader import build_tiny_reader, load_reader, save_reader
from medrag_ray.models.router import load_router, router_from_encoder, save_router
from medrag_ray.models.tokenizer import answer_token_ids, format_prompt, train_bpe_tokenizer
from medrag_ray.reader.prompts import closed_rag_prompt, report_prompt
from medrag_ray.utils import atomic_output_dir, seed_everything

logger = logging.getLogger(__name__)

PREPARED_NAME = "prepared.json"
SUBDIRS: tuple[str, ...] = ("tokenizer", "encoder", "router", "reader")


@dataclass(frozen=True)
class DatasetFiles:
    """The files of a dataset directory in the layout ``jobs/make_data.py`` writes."""

    train: Path
    corpus: Path

    @classmethod
    def find(cls, dataset_dir: str | Path) -> DatasetFiles:
        root = Path(dataset_dir)
        files = cls(train=root / "samples_train.parquet", corpus=root / "corpus.parquet")
        missing = [str(p) for p in (files.train, files.corpus) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"dataset_dir {root} lacks {missing}; create it with `python jobs/make_data.py out_dir={root}` "
                "or point dataset_dir at a dataset in that layout"
            )
        return files


def tokenizer_texts(samples: list[Sample], corpus: list[CorpusDoc]) -> list[str]:
    """The texts the reader will read and write (train split): reports/captions, questions and answers, and the
    wording of the prompts it is asked with (:mod:`medrag_ray.reader.prompts`: every closed question with and
    without 1-3 reference reports, the report prompts). Without the prompt wording its words split into
    single letters, and the scaffolding alone is ~190 tokens of every prompt instead of ~70."""
    texts = [d.text for d in corpus]
    for i, s in enumerate(samples):
        texts.extend(t for t in (s.text, s.question, s.answer) if t)
        if s.answer_type == "closed" and s.question:
            texts.append(closed_rag_prompt(s.question, [""] * (1 + i % 3), s.domain))
            texts.append(closed_rag_prompt(s.question, [], s.domain))
    for k in range(4):
        texts.append(report_prompt([""] * k))
    return texts


def _image(record: Sample | CorpusDoc) -> Image.Image:
    if record.image_bytes is None:
        raise ValueError(f"record {record.id} has no inline image_bytes; prepare_models needs inline images")
    return Image.open(io.BytesIO(record.image_bytes)).convert("RGB")


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prepare_models(
    dataset_dir: str | Path, out_dir: str | Path, cfg: TinyModelsConfig, overwrite: bool = False
) -> Path:
    """Train the tokenizer, build, save, reload and smoke-run the tiny models; returns ``out_dir``."""
    files = DatasetFiles.find(dataset_dir)
    samples = read_parquet(files.train, Sample)
    corpus = read_parquet(files.corpus, CorpusDoc)
    domains = sorted({d.domain for d in corpus})
    if len(domains) < 2:
        raise ValueError(f"the corpus in {dataset_dir} has domains {domains}; the router needs at least two")
    seed_everything(cfg.seed)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        tokenizer = train_bpe_tokenizer(tokenizer_texts(samples, corpus), cfg.tokenizer_vocab_size, tmp / "tokenizer")
        encoder = build_dual_encoder(cfg.encoder)
        save_dual_encoder(encoder, tmp / "encoder")
        router = router_from_encoder(encoder, domains)
        save_router(router, tmp / "router")
        reader, processor = build_tiny_reader(cfg.reader, tokenizer)
        save_reader(reader, processor, tmp / "reader", config=cfg.reader)
        smoke = smoke_check(tmp, samples, corpus)
        params = {"encoder": _param_count(encoder), "router_head": _param_count(router.head)}
        params["reader"] = _param_count(reader)
        summary: dict[str, Any] = {
            "dataset_dir": str(Path(dataset_dir).resolve()),
            "domains": domains,
            "config": to_dict(cfg),
            "tokenizer_size": len(tokenizer),
            "parameters": params,
            "smoke": smoke,
        }
        (tmp / PREPARED_NAME).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("prepared %s in %s: %s parameters", ", ".join(SUBDIRS), out_dir, summary["parameters"])
    return Path(out_dir)


@torch.no_grad()
def smoke_check(models_dir: Path, samples: list[Sample], corpus: list[CorpusDoc], n: int = 4) -> dict[str, Any]:
    """Load every saved model back and run it on ``n`` dataset rows; returns what each produced."""
    docs = corpus[:: max(1, len(corpus) // n)][:n]
    images = [_image(d) for d in docs]
    encoder = load_dual_encoder(models_dir / "encoder")
    img = encoder.encode_image(encoder.preprocess(images))
    txt = encoder.encode_text([d.text for d in docs])
    router = load_router(models_dir / "router")
    routed = router.predict(images)
    reader, processor = load_reader(models_dir / "reader")
    closed = next(s for s in samples if s.answer_type == "closed")
    inputs = processor(images=[_image(closed)], text=[format_prompt(closed.question)], return_tensors="pt")
    logits = reader(**inputs).logits[0, -1]
    yes_id, no_id = answer_token_ids(processor.tokenizer, ["yes", "no"])
    p_yes = torch.softmax(logits[[yes_id, no_id]].float(), dim=-1)[0].item()
    generated = reader.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return {
        "image_text_similarity_diag": [round(float(v), 4) for v in (img * txt).sum(-1)],
        "router_predictions": [[d, round(c, 4)] for d, c in routed],
        "reader_question": closed.question,
        "reader_p_yes": round(p_yes, 4),
        "reader_generated": answer,
    }
