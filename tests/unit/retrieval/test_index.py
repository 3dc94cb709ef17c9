"""Per-domain FAISS indexes: exactness, ANN recall, incremental add, save/load, errors, GPU."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from medrag_ray.config import ConfigError
from medrag_ray.retrieval.index import (
    IDS_FILE,
    INDEX_FILE,
    META_FILE,
    DomainIndex,
    DomainIndexSet,
    IndexConfig,
    IndexFileError,
    IndexInputError,
    IndexMeta,
    faiss_gpu_available,
    prepare_vectors,
)

META = IndexMeta(domain="radiology", model_id="tiny-clip@abc123")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random(n: int, dim: int, seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, dim)))


def _clustered(n: int, dim: int, n_clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    return _unit(centers[labels] + 0.35 * rng.standard_normal((n, dim)))


def _ids(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def _brute_force(docs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ docs.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def _recall(found: list[list[str]], exact: list[list[str]]) -> float:
    hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact, strict=True))
    return hits / sum(len(e) for e in exact)


# ------------------------------------------------------------------------------------- exactness


def test_flat_search_equals_numpy_brute_force() -> None:
    docs, queries = _random(500, 32, 0), _random(20, 32, 1)
    ids = _ids(500)
    index = DomainIndex.build(docs, ids, META, IndexConfig(kind="flat", use_gpu="never"))
    scores, found = index.search(queries, 10)
    ref_scores, ref_rows = _brute_force(docs, queries, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert found == [[ids[r] for r in row] for row in ref_rows]
    assert scores.dtype == np.float32 and scores.shape == (20, 10)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # descending


def test_inputs_are_l2_normalized_by_default() -> None:
    docs = _random(100, 16, 2)
    index = DomainIndex.build(docs * 7.5, _ids(100), META, IndexConfig(use_gpu="never"))
    scores, found = index.search(docs[:3] * 0.01, 1)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)  # cosine of a doc with itself
    assert found == [["doc-0"], ["doc-1"], ["doc-2"]]


def test_normalize_false_requires_unit_norm() -> None:
    cfg = IndexConfig(normalize=False, use_gpu="never")
    docs = _random(50, 8, 3)
    DomainIndex.build(docs, _ids(50), META, cfg)  # unit rows are fine
    bad = docs.copy()
    bad[7] *= 2.0
    with pytest.raises(IndexInputError, match="row 7 has L2 norm 2.0"):
        DomainIndex.build(bad, _ids(50), META, cfg)


def test_float64_and_non_contiguous_inputs_are_converted() -> None:
    docs = _random(60, 8, 4)
    wide = np.asfortranarray(docs.astype(np.float64))
    out = prepare_vectors(wide, 8, normalize=True)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, docs, atol=1e-6)


def test_k_larger_than_index_returns_all_rows() -> None:
    docs = _random(5, 8, 5)
    index = DomainIndex.build(docs, _ids(5), META, IndexConfig(use_gpu="never"))
    scores, found = index.search(docs[:2], 50)
    assert scores.shape == (2, 5)
    assert [sorted(row) for row in found] == [sorted(_ids(5))] * 2
    assert found[0][0] == "doc-0" and found[1][0] == "doc-1"


# ------------------------------------------------------------------------------------ ANN recall


@pytest.mark.parametrize(
    "cfg",
    [
        IndexConfig(kind="ivf", nlist=64, nprobe=12, use_gpu="never"),
        IndexConfig(kind="hnsw", hnsw_m=32, ef_search=128, ef_construction=100, use_gpu="never"),
    ],
    ids=["ivf", "hnsw"],
)
def test_approximate_recall_at_10_vs_exact(cfg: IndexConfig) -> None:
    data = _clustered(5200, 64, 50, seed=6)  # queries come from the same clusters as the documents
    docs, queries = data[:5000], data[5000:]
    ids = _ids(5000)
    exact = DomainIndex.build(docs, ids, META, IndexConfig(use_gpu="never"))
    approx = DomainIndex.build(docs, ids, META, cfg)
    _, exact_ids = exact.search(queries, 10)
    approx_scores, approx_ids = approx.search(queries, 10)
    recall = _recall(approx_ids, exact_ids)
    assert recall >= 0.9, f"{cfg.kind} recall@10 = {recall:.3f}"
    # Scores of whatever the ANN index found are the true inner products.
    pos = {doc_id: i for i, doc_id in enumerate(ids)}
    true = np.array([[queries[b] @ docs[pos[d]] for d in row] for b, row in enumerate(approx_ids)])
    np.testing.assert_allclose(approx_scores, true, atol=1e-4)


def test_ivf_with_too_few_training_vectors_is_refused() -> None:
    with pytest.raises(IndexInputError, match="nlist=64"):
        DomainIndex.build(_random(30, 8, 8), _ids(30), META, IndexConfig(kind="ivf", nlist=64, nprobe=4))


# --------------------------------------------------------------------------------------------- add


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_add_after_build_matches_building_at_once(kind: str) -> None:
    docs, queries = _clustered(1200, 32, 10, seed=9), _random(15, 32, 10)
    ids = _ids(1200)
    cfg = IndexConfig(kind=kind, nlist=16, nprobe=16, use_gpu="never")  # nprobe=nlist: IVF is exact
    whole = DomainIndex.build(docs, ids, META, cfg)
    grown = DomainIndex.build(docs[:800], ids[:800], META, cfg)
    grown.add(docs[800:1000], ids[800:1000])
    grown.add(docs[1000:], ids[1000:])
    assert len(grown) == 1200 and grown.ids == tuple(ids)
    s_whole, i_whole = whole.search(queries, 10)
    s_grown, i_grown = grown.search(queries, 10)
    np.testing.assert_allclose(s_grown, s_whole, atol=1e-5)
    assert i_grown == i_whole
    ref_scores, ref_rows = _brute_force(docs, queries, 10)
    np.testing.assert_allclose(s_grown, ref_scores, atol=1e-5)
    assert i_grown == [[ids[r] for r in row] for row in ref_rows]


def test_duplicate_ids_are_named() -> None:
    docs = _random(10, 8, 11)
    with pytest.raises(IndexInputError, match=r"duplicate ids \(repeated in this batch\): \[.a.\]"):
        DomainIndex.build(docs[:3], ["a", "b", "a"], META)
    index = DomainIndex.build(docs[:5], _ids(5), META, IndexConfig(use_gpu="never"))
    with pytest.raises(IndexInputError, match=r"duplicate ids \(already in the index\): \[.doc-3.\]"):
        index.add(docs[5:7], ["new-1", "doc-3"])
    assert len(index) == 5  # a refused add changes nothing
    with pytest.raises(IndexInputError, match="got 1 ids for 2 embedding rows"):
        index.add(docs[5:7], ["x"])


# ------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    docs, queries = _clustered(800, 16, 8, seed=12), _random(10, 16, 13)
    cfg = IndexConfig(kind=kind, nlist=8, nprobe=3, hnsw_m=8, ef_search=40, use_gpu="never")
    index = DomainIndex.build(docs, _ids(800), META, cfg)
    index.save(tmp_path / "rad")
    assert sorted(p.name for p in (tmp_path / "rad").iterdir()) == sorted([INDEX_FILE, IDS_FILE, META_FILE])
    loaded = DomainIndex.load(tmp_path / "rad", expected_model_id=META.model_id, expected_dim=16)
    assert loaded.meta == META and loaded.cfg == cfg and loaded.dim == 16 and loaded.ids == index.ids
    s0, i0 = index.search(queries, 7)
    s1, i1 = loaded.search(queries, 7)
    np.testing.assert_array_equal(s0, s1)
    assert i0 == i1
    meta = json.loads((tmp_path / "rad" / META_FILE).read_text())
    assert meta["count"] == 800 and meta["kind"] == kind and meta["model_id"] == META.model_id


def test_save_refuses_to_overwrite_without_flag(tmp_path: Path) -> None:
    index = DomainIndex.build(_random(10, 4, 14), _ids(10), META)
    index.save(tmp_path / "x")
    with pytest.raises(FileExistsError, match="overwrite"):
        index.save(tmp_path / "x")
    index.save(tmp_path / "x", overwrite=True)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    index = DomainIndex.build(_random(20, 8, 15), _ids(20), META, IndexConfig(use_gpu="never"))
    d = tmp_path / "idx"
    index.save(d)
    with pytest.raises(IndexFileError, match=r"model_id='tiny-clip@abc123', expected 'other'"):
        DomainIndex.load(d, expected_model_id="other")
    with pytest.raises(IndexFileError, match="index dim=8, expected 32"):
        DomainIndex.load(d, expected_dim=32)
    (d / IDS_FILE).write_text(json.dumps(_ids(19)))
    with pytest.raises(IndexFileError, match=f"{IDS_FILE} holds 19 ids"):
        DomainIndex.load(d)
    (d / IDS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=IDS_FILE):
        DomainIndex.load(d)
    index.save(d, overwrite=True)
    (d / INDEX_FILE).write_bytes(b"not a faiss index")
    with pytest.raises(IndexFileError, match=INDEX_FILE):
        DomainIndex.load(d)
    index.save(d, overwrite=True)
    meta = json.loads((d / META_FILE).read_text())
    meta["dim"] = 9
    meta["config"]["use_gpu"] = "never"
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=f"{INDEX_FILE} has dim 8 but .*{META_FILE} says dim=9"):
        DomainIndex.load(d)


# ----------------------------------------------------------------------------------------- errors


def test_dim_mismatch_names_expected_and_got() -> None:
    index = DomainIndex.build(_random(10, 8, 16), _ids(10), META)
    with pytest.raises(IndexInputError, match="expected dim=8, got 12"):
        index.search(_random(2, 12, 17), 3)
    with pytest.raises(IndexInputError, match="expected dim=8, got 4"):
        index.add(_random(2, 4, 17), ["a", "b"])


def test_bad_inputs_are_refused() -> None:
    index = DomainIndex.build(_random(10, 8, 18), _ids(10), META)
    with pytest.raises(IndexInputError, match="2-D"):
        index.search(np.ones(8, dtype=np.float32), 3)
    with pytest.raises(IndexInputError, match="floating-point"):
        index.search(np.ones((1, 8), dtype=np.int64), 3)
    with pytest.raises(IndexInputError, match="all zeros"):
        index.search(np.zeros((1, 8), dtype=np.float32), 3)
    nan = np.ones((2, 8), dtype=np.float32)
    nan[1, 3] = np.nan
    with pytest.raises(IndexInputError, match="row 1 holds NaN"):
        index.search(nan, 3)
    with pytest.raises(IndexInputError, match="k=0"):
        index.search(_random(1, 8, 19), 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "lsh"}, "index.kind"),
        ({"use_gpu": "maybe"}, "index.use_gpu"),
        ({"nlist": 0}, "index.nlist"),
        ({"nlist": 8, "nprobe": 16}, "nprobe <= nlist"),
        ({"kind": "hnsw", "use_gpu": "always"}, "no GPU HNSW"),
    ],
)
def test_index_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        IndexConfig(**kwargs)


def test_index_meta_validation() -> None:
    with pytest.raises(ConfigError, match="domain='cardiology'"):
        IndexMeta(domain="cardiology", model_id="m")
    with pytest.raises(ConfigError, match="model_id"):
        IndexMeta(domain="pathology", model_id=" ")


@pytest.mark.skipif(faiss_gpu_available(), reason="a faiss GPU is available here")
def test_use_gpu_always_without_gpu_fails_clearly() -> None:
    with pytest.raises(ConfigError, match="use_gpu='always' but .*set use_gpu='auto' or 'never'"):
        DomainIndex.build(_random(10, 8, 20), _ids(10), META, IndexConfig(use_gpu="always"))


# ------------------------------------------------------------------------------------- index sets


def _index_set() -> tuple[DomainIndexSet, dict[str, np.ndarray]]:
    docs = {d: _random(40, 8, seed) for seed, d in enumerate(["radiology", "pathology"])}
    indexes = [
        DomainIndex.build(x, _ids(40, d), IndexMeta(domain=d, model_id="m1"), IndexConfig(use_gpu="never"))
        for d, x in docs.items()
    ]
    return DomainIndexSet(indexes), docs


def test_index_set_search_routes_to_the_domain() -> None:
    indexes, docs = _index_set()
    assert indexes.domains == ("pathology", "radiology") and len(indexes) == 2
    _, found = indexes.search("pathology", docs["pathology"][[4]], 1)
    assert found == [["pathology-4"]]
    with pytest.raises(KeyError, match=r"'ophthalmology'.*known domains: \['pathology', 'radiology'\]"):
        indexes.search("ophthalmology", docs["pathology"][[4]], 1)
    with pytest.raises(IndexInputError, match="already has an index"):
        indexes.add_index(indexes["radiology"])


def test_index_set_save_load(tmp_path: Path) -> None:
    indexes, docs = _index_set()
    indexes.save(tmp_path / "indexes")
    assert sorted(p.name for p in (tmp_path / "indexes").iterdir()) == ["pathology", "radiology"]
    loaded = DomainIndexSet.load(tmp_path / "indexes", expected_model_id="m1")
    assert loaded.domains == indexes.domains
    for domain in loaded:
        s0, i0 = indexes.search(domain, docs[domain][:5], 4)
        s1, i1 = loaded.search(domain, docs[domain][:5], 4)
        np.testing.assert_array_equal(s0, s1)
        assert i0 == i1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DomainIndexSet.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no <domain>/meta.json"):
        DomainIndexSet.load(tmp_path / "empty")
    (tmp_path / "indexes" / "radiology").rename(tmp_path / "indexes" / "dermatology")
    with pytest.raises(IndexFileError, match="domain='radiology' but lives in folder 'dermatology'"):
        DomainIndexSet.load(tmp_path / "indexes")


# -------------------------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not faiss_gpu_available(), reason="needs faiss with GPU support and a CUDA GPU")
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_index_matches_cpu(tmp_path: Path, kind: str) -> None:
    docs, queries = _clustered(3000, 32, 20, seed=21), _random(50, 32, 22)
    ids = _ids(3000)
    cfg = dict(kind=kind, nlist=32, nprobe=32)
    cpu = DomainIndex.build(docs[:2000], ids[:2000], META, IndexConfig(use_gpu="never", **cfg))
    gpu = DomainIndex.build(docs[:2000], ids[:2000], META, IndexConfig(use_gpu="always", **cfg))
    assert gpu.on_gpu and not cpu.on_gpu
    cpu.add(docs[2000:], ids[2000:])
    gpu.add(docs[2000:], ids[2000:])
    s_cpu, i_cpu = cpu.search(queries, 10)
    s_gpu, i_gpu = gpu.search(queries, 10)
    np.testing.assert_allclose(s_gpu, s_cpu, atol=1e-4)
    assert _recall(i_gpu, i_cpu) >= 0.99
    gpu.save(tmp_path / "g")  # the CPU copy is written and follows the adds
    reloaded = DomainIndex.load(tmp_path / "g", use_gpu="never")
    assert len(reloaded) == 3000 and isinstance(faiss.read_index(str(tmp_path / "g" / INDEX_FILE)), faiss.Index)
    np.testing.assert_allclose(reloaded.search(queries, 10)[0], s_cpu, atol=1e-4)
