"""A scripted reader and an in-memory one-domain index where some documents help the reader (shared by the
distillation and RAG-PT evaluation tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medrag_ray.data.schema import CorpusDoc, Sample
from medrag_ray.mining.miner import png_bytes
from medrag_ray.models.configs import DualEncoderConfig
from medrag_ray.models.dual_encoder import build_dual_encoder
from medrag_ray.reader.engine import ClosedScores
from medrag_ray.retrieval.index import DomainIndex, IndexConfig, IndexMeta
from medrag_ray.retrieval.retriever import (
    DocEmbeddings,
    DomainResources,
    DualHeadRetriever,
    MultimodalRetriever,
    save_retriever,
)

FLAT = IndexConfig(kind="flat", use_gpu="never")
N_DOCS, N_QUERIES = 8, 24
HELPFUL = {"d1", "d4", "d6"}


def pattern(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).resize((64, 64), Image.NEAREST)


class ScriptedReader:
    """p(yes) is 0.9 when a helpful reference is in the input and 0.3 otherwise; records the inputs."""

    def __init__(self) -> None:
        self.inputs: list = []

    def score_closed(self, inputs, choices=("yes", "no")):  # noqa: ANN001, ANN201
        self.inputs.append(list(inputs))
        rows = []
        for inp in inputs:
            text = " ".join(p for p in inp.parts if isinstance(p, str))
            p = 0.9 if "helpful" in text else 0.3
            rows.append([p, 1 - p])
        return ClosedScores(tuple(choices), np.asarray(rows))


def scripted_index(save_dir: Path):  # noqa: ANN201
    """``(retriever, samples, images, doc_text_emb, doc_image_emb)``; the domain's retriever saved in save_dir."""
    torch.manual_seed(0)
    encoder = build_dual_encoder(DualEncoderConfig())
    doc_images = [pattern(i) for i in range(N_DOCS)]
    docs = [CorpusDoc(id=f"d{i}", domain="radiology", split="train", source="t",
                      text=f"{'helpful' if f'd{i}' in HELPFUL else 'useless'} report number {i}.",
                      image_bytes=png_bytes(im), image_available=True) for i, im in enumerate(doc_images)]
    with torch.no_grad():
        text = encoder.encode_text([d.text for d in docs]).float().numpy()
        image = encoder.encode_image(encoder.preprocess(doc_images)).float().numpy()
    ids = [d.id for d in docs]
    meta = IndexMeta("radiology", encoder.model_id)
    res = DomainResources(
        "radiology", DualHeadRetriever(encoder), DomainIndex.build(text, ids, meta, FLAT), {d.id: d for d in docs},
        image_index=DomainIndex.build(image, ids, meta, FLAT), embeddings=DocEmbeddings(ids, text, image),
    )
    samples = [Sample(id=f"q{i}", domain="radiology", split="train", source="t", question="Is there X?",
                      answer="Yes." if i % 3 else "yes", answer_type="closed", image_bytes=b"",
                      meta='{"case_id": "d0"}' if i == 0 else "{}") for i in range(N_QUERIES)]
    images = [pattern(100 + i) for i in range(N_QUERIES)]
    save_retriever(res.retriever, save_dir)
    return MultimodalRetriever([res]), samples, images, text, image
