"""The README's main job end to end on a tiny default: data -> models -> Ray Train router and retrievers ->
Ray Data index -> the retrieval API over what the pipeline wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import pipeline
from jobs.runtime import shutdown_ray
from medrag_ray.config import PIPELINE_STEPS
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import CorpusDoc, read_parquet
from medrag_ray.eval.classification import classification_report
from medrag_ray.models.router import load_router
from medrag_ray.retrieval.retrieval_config import RetrievalConfig
from medrag_ray.retrieval.retriever import MultimodalRetriever
from medrag_ray.train.data import domain_examples
from medrag_ray.train.tasks import predict_domains

pytestmark = pytest.mark.slow

TINY = [
    "data.domains=[radiology,pathology]", "data.n_per_domain=18", "data.n_phenotypes=3", "data.image_size=32",
    "models.tokenizer_vocab_size=400",
    "models.encoder.image_size=32", "models.reader.image_size=32", "router_train.epochs=3", "router_train.batch_size=4",
    "retriever_train.epochs=1", "retriever_train.batch_size=4",
]


def test_pipeline_trains_indexes_and_retrieves(tmp_path: Path) -> None:
    try:
        outputs = pipeline.main(pipeline.parse_args([f"artifacts_dir={tmp_path}", *TINY]))
    finally:
        shutdown_ray()
    assert list(outputs) == list(PIPELINE_STEPS)
    domains = ["pathology", "radiology"]
    router_metrics = json.loads(outputs["train_router"].read_text())
    assert router_metrics["domains"] == domains and [h["epoch"] for h in router_metrics["history"]] == [1, 2, 3]
    router = load_router(tmp_path / "models" / "router")
    val = domain_examples(tmp_path / "data" / "synthetic" / "samples_val.parquet")
    expected = classification_report([e.label for e in val], predict_domains(router, val), router.domains)
    assert router_metrics["val"] == expected.to_dict()  # per-domain precision/recall + confusion of the saved router
    assert expected.accuracy >= 0.8
    assert set(json.loads(outputs["train_retriever"].read_text())["runs"]) == set(domains)
    manifest = json.loads(outputs["build_index"].read_text())
    corpus = read_parquet(tmp_path / "data" / "synthetic" / "corpus.parquet", CorpusDoc)
    for d in domains:
        assert manifest["domains"][d]["n_docs"] == sum(doc.domain == d for doc in corpus)
        assert Path(manifest["domains"][d]["encoder_dir"]) == (tmp_path / "models" / "retriever" / d).resolve()

    retriever = MultimodalRetriever.from_artifacts(tmp_path / "models" / "router", tmp_path / "index")
    queries = [next(doc for doc in corpus if doc.domain == d) for d in domains]
    images = [load_image(doc.image_bytes) for doc in queries]
    # image head: a corpus image's nearest document image is itself (cosine 1), in its routed domain
    results = retriever.retrieve(images, cfg=RetrievalConfig(k=5, mode="image", adaptive="none"))
    for doc, result in zip(queries, results, strict=True):
        assert result.domain == doc.domain and 0.0 < result.domain_confidence <= 1.0
        assert result.hits[0].doc_id == doc.id and result.hits[0].score == pytest.approx(1.0, abs=1e-4)
    # text head + adaptive-k (paper's gap rule): hits sorted, kept ones a prefix, within [k_min, k]
    results = retriever.retrieve(images, cfg=RetrievalConfig(k=5, mode="text", adaptive="gap", gamma=0.01))
    ids = {doc.id: doc for doc in corpus}
    for doc, result in zip(queries, results, strict=True):
        scores = [h.score for h in result.hits]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5
        assert [h.kept for h in result.hits] == [True] * result.k_kept + [False] * (5 - result.k_kept)
        assert 1 <= result.k_kept <= 5
        assert all(ids[h.doc_id].domain == doc.domain and h.text == ids[h.doc_id].text for h in result.hits)
