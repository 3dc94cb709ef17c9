"""jobs/build_index.py on a local Ray: build per-domain indexes from a tiny synthetic corpus, then add to them."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from jobs import build_index
from jobs.runtime import init_ray, shutdown_ray
from medrag_ray.config import BuildIndexConfig, RayConfig, SyntheticDataConfig
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import CorpusDoc, write_parquet
from medrag_ray.data.synthetic import generate
from medrag_ray.models.dual_encoder import load_dual_encoder
from medrag_ray.retrieval import embed as E
from medrag_ray.retrieval.index import IndexConfig, IndexInputError
from tests.unit.retrieval.embed_fixtures import save_tiny_encoder

pytestmark = pytest.mark.slow

RAY = RayConfig(num_cpus=2, actor_num_cpus=0.5)


@pytest.fixture(scope="module")
def local_ray():
    init_ray(RAY)
    yield
    shutdown_ray()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def direct_embeddings(encoder_dir: Path, docs: list[CorpusDoc]) -> tuple[np.ndarray, np.ndarray]:
    enc = load_dual_encoder(encoder_dir, device="cpu")
    with torch.no_grad():
        image = enc.encode_image(enc.preprocess([load_image(d.image_bytes) for d in docs])).numpy()
        text = enc.encode_text([d.text for d in docs]).numpy()
    return text, image


def assert_exact_top_k(scores: np.ndarray, ids: list[list[str]], brute: np.ndarray, doc_ids: tuple[str, ...]) -> None:
    """FAISS top-k == NumPy brute force: same scores, and each returned id has its returned score.

    (The untrained encoder gives near-equal scores, so ids are compared through their scores, not their order
    among ties; where the brute-force scores are well separated the order must match exactly.)
    """
    k = scores.shape[1]
    order = np.argsort(-brute, axis=1)[:, :k]
    top = np.take_along_axis(brute, order, axis=1)
    np.testing.assert_allclose(scores, top, atol=1e-5)
    pos = {doc_id: j for j, doc_id in enumerate(doc_ids)}
    for q, row in enumerate(ids):
        assert len(row) == k and len(set(row)) == k
        np.testing.assert_allclose([brute[q, pos[i]] for i in row], scores[q], atol=1e-5)
        separated = np.all(np.abs(np.diff(top[q])) > 1e-4)
        if separated:
            assert row == [doc_ids[j] for j in order[q]]


def test_build_then_add(local_ray, tmp_path):
    domains = ("pathology", "radiology")  # two domains keep the number of actor pools (and the time) down
    corpus = generate(SyntheticDataConfig(domains=domains, n_per_domain=18, n_phenotypes=3, image_size=32)).corpus
    held = {"radiology": 2}  # documents kept back for mode=add
    later = [d for dom, n in held.items() for d in [x for x in corpus if x.domain == dom][-n:]]
    first = [d for d in corpus if d not in later]
    corrupt = dataclasses.replace(first[0], id="corrupt-0", image_bytes=b"\x89PNG broken")
    write_parquet([*first, corrupt], CorpusDoc, tmp_path / "corpus.parquet")
    write_parquet(later, CorpusDoc, tmp_path / "new_docs.parquet")

    retrievers = tmp_path / "retrievers"  # a different encoder per domain: each domain must use its own
    for seed, domain in enumerate(domains):
        save_tiny_encoder(retrievers / domain, seed=seed)

    cfg = BuildIndexConfig(
        corpus_path=str(tmp_path / "corpus.parquet"),
        out_dir=str(tmp_path / "index"),
        retrievers_dir=str(retrievers),
        batch_size=5,
        num_actors=2,
        index=IndexConfig(use_gpu="never"),
        ray=RAY,
    )
    result = build_index.main(cfg)
    store = tmp_path / "index"
    by_domain = {d: [x for x in first if x.domain == d] for d in domains}
    assert result.added == {d: len(v) for d, v in by_domain.items()}
    assert corrupt.domain == "pathology"
    assert result.rejected == {"pathology": 1, "radiology": 0}
    rejects = E.read_rejects(store)
    assert [(r["id"], r["domain"]) for r in rejects] == [("corrupt-0", corrupt.domain)]
    assert "cannot decode" in rejects[0]["reason"]

    manifest, text, image = E.load_index_store(store)
    assert {d: e.n_docs for d, e in manifest.domains.items()} == {d: len(v) for d, v in by_domain.items()}
    assert manifest.domains["radiology"].encoder_dir == str((retrievers / "radiology").resolve())
    for domain, docs in by_domain.items():
        emb = E.read_embeddings(store, domain)
        assert len(text[domain]) == len(image[domain]) == len(docs)
        assert text[domain].ids == emb.ids and sorted(emb.ids) == sorted(d.id for d in docs)
        assert sorted(d.id for d in E.read_docs(store, domain)) == sorted(d.id for d in docs)
        ordered = sorted(docs, key=lambda d: emb.ids.index(d.id))
        want_text, want_image = direct_embeddings(retrievers / domain, ordered)
        np.testing.assert_allclose(emb.text, want_text, atol=1e-5)
        np.testing.assert_allclose(emb.image, want_image, atol=1e-5)
        # a document's own image embedding (same encoder) against the text index == numpy brute force
        query = want_image[:3]
        scores, ids = text[domain].search(query, 4)
        assert_exact_top_k(scores, ids, query @ emb.text.T, emb.ids)

    old_parts = {p: sha(p) for p in sorted((store / E.EMBEDDINGS_DIR).rglob("*.parquet"))}
    old_ids = {d: text[d].ids for d in held}
    old_vectors = {d: faiss.read_index(str(store / "text" / d / "index.faiss")) for d in held}
    old_vectors = {d: ix.reconstruct_n(0, ix.ntotal) for d, ix in old_vectors.items()}

    add_cfg = dataclasses.replace(cfg, mode="add", corpus_path=str(tmp_path / "new_docs.parquet"), num_actors=1)
    added = build_index.main(add_cfg)
    assert added.added == held and added.rejected == {"radiology": 0}
    manifest2, text2, image2 = E.load_index_store(store)
    for domain, n in held.items():
        assert manifest2.domains[domain].n_docs == len(by_domain[domain]) + n
        after = faiss.read_index(str(store / "text" / domain / "index.faiss"))
        old = old_vectors[domain]
        np.testing.assert_array_equal(after.reconstruct_n(0, old.shape[0]), old)  # no rebuild: old rows intact
        emb2 = E.read_embeddings(store, domain)
        new_docs = [d for d in later if d.domain == domain]
        assert emb2.ids == text2[domain].ids == image2[domain].ids
        assert emb2.ids[: len(old)] == old_ids[domain] and sorted(emb2.ids[len(old):]) == sorted(d.id for d in new_docs)
        new_text, new_image = direct_embeddings(retrievers / domain, new_docs)
        for index, vectors, query in ((text2, emb2.text, new_text), (image2, emb2.image, new_image)):
            scores, ids = index[domain].search(query, 3)
            assert_exact_top_k(scores, ids, query @ vectors.T, emb2.ids)
            for q, doc in enumerate(new_docs):  # found by its own embedding, with cosine 1
                assert doc.id in ids[q]
                np.testing.assert_allclose(scores[q, 0], 1.0, atol=1e-5)
    assert manifest2.domains["pathology"] == manifest.domains["pathology"]  # untouched domain
    assert all(p.exists() and sha(p) == h for p, h in old_parts.items())  # earlier parts kept as they were
    assert len(list((store / E.EMBEDDINGS_DIR / "radiology").glob("part-000001-*"))) == 1

    with pytest.raises(IndexInputError, match="already indexed"):  # the same documents again: refused
        build_index.main(add_cfg)
