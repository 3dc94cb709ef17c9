"""The retriever path on every real dual-encoder layout: open_clip ViT, open_clip RN50 (MMed-RAG's base) and
BiomedCLIP (ViT + HF BERT text tower), each as downloaded (hf-hub layout): load offline, embed a corpus the
way ``jobs/build_index.py`` does (:class:`CorpusEmbedder`), build the text and image indexes, retrieve."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medrag_ray.models.dual_encoder import HF_TEXT_CONFIG_DIR, load_dual_encoder
from medrag_ray.retrieval.embed import CorpusEmbedder, DomainEmbeddings, build_domain_indexes
from medrag_ray.retrieval.index import IndexConfig
from tests.unit.conformance.builders import RETRIEVERS, png

REPORTS = ["Small left pleural effusion.", "Mild cardiomegaly, clear lungs.", "No acute abnormality.",
           "Scattered drusen near the macula.", "Glandular tissue with mild atypia.", "Right lower lobe opacity."]


@pytest.fixture(scope="module", params=sorted(RETRIEVERS))
def encoder_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory, hf_text = RETRIEVERS[request.param](tmp_path_factory.mktemp(request.param))
    if hf_text is not None:  # BiomedCLIP: the BERT config beside the weights, as the loader's docs ask
        shutil.copytree(hf_text, directory / HF_TEXT_CONFIG_DIR)
    return directory


def test_embed_index_and_retrieve(encoder_dir: Path) -> None:
    ids = [f"r{i}" for i in range(len(REPORTS))]
    images = [png(20 + 40 * i, (48, 48)) for i in range(len(REPORTS))]
    out = CorpusEmbedder(str(encoder_dir), device="cpu")(
        {"id": ids, "domain": ["radiology"] * len(ids), "text": REPORTS, "image_bytes": images}
    )
    assert list(out["reject_reason"]) == [""] * len(ids)
    for name in ("text_emb", "image_emb"):
        assert np.allclose(np.linalg.norm(out[name], axis=1), 1.0, atol=1e-5)
        assert np.linalg.matrix_rank(out[name]) > 1  # distinct inputs give distinct embeddings

    encoder = load_dual_encoder(encoder_dir, dtype="float32")
    with torch.no_grad():
        direct = encoder.encode_text(REPORTS[:2]).float().numpy()
    assert np.allclose(direct, out["text_emb"][:2], atol=1e-5)

    emb = DomainEmbeddings("radiology", tuple(ids), out["text_emb"], out["image_emb"])
    text, image = build_domain_indexes([emb], IndexConfig(use_gpu="never"), encoder.model_id)
    _, hits = image["radiology"].search(out["image_emb"][[2, 4]], 3)
    assert [h[0] for h in hits] == ["r2", "r4"]  # an indexed image retrieves itself first
    scores, hits = text["radiology"].search(out["image_emb"][:1], 3)
    assert len(hits[0]) == 3 and set(hits[0]) <= set(ids) and np.all(np.diff(scores[0]) <= 1e-6)
