"""medrag_ray.retrieval.embed: the corpus embedder, the Parquet/manifest layout, index builds and additions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from medrag_ray.config import BuildIndexConfig, ConfigError, SyntheticDataConfig
from medrag_ray.data.readers.common import encode_png, load_image
from medrag_ray.data.schema import CorpusDoc, write_parquet
from medrag_ray.data.synthetic import generate
from medrag_ray.models.dual_encoder import load_dual_encoder
from medrag_ray.retrieval import embed as E
from medrag_ray.retrieval.index import IndexConfig, IndexFileError, IndexInputError
from tests.unit.retrieval.embed_fixtures import TINY, save_tiny_encoder


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("enc") / "encoder")


@pytest.fixture(scope="module")
def corpus() -> list[CorpusDoc]:
    return generate(SyntheticDataConfig(n_per_domain=18, n_phenotypes=3, image_size=32)).corpus


@pytest.fixture(scope="module")
def embedder(encoder_dir) -> E.CorpusEmbedder:
    return E.CorpusEmbedder(str(encoder_dir), device="cpu")


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fake_docs(domain: str, ids: list[str]) -> list[CorpusDoc]:
    png = encode_png(np.zeros((8, 8), dtype=np.uint8))
    return [
        CorpusDoc(id=i, domain=domain, split="train", source="test", text=f"report of {i}", image_bytes=png,
                  image_available=True)
        for i in ids
    ]


def fake_embeddings(domain: str, ids: list[str], dim: int = 16, seed: int = 0) -> E.DomainEmbeddings:
    rng = np.random.default_rng(seed)
    return E.DomainEmbeddings(domain, tuple(ids), unit_rows(rng, len(ids), dim), unit_rows(rng, len(ids), dim))


def fake_info(model_id: str = "tiny", dim: int = 16, fingerprint: str = "f" * 64) -> E.EncoderInfo:
    return E.EncoderInfo(encoder_dir="/models/tiny", model_id=model_id, dim=dim, fingerprint=fingerprint)


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------- embedder


def test_embedder_equals_direct_encoder_calls(embedder, encoder_dir, corpus):
    docs = corpus[:10]
    out = embedder(E.docs_to_batch(docs))
    enc = load_dual_encoder(encoder_dir, device="cpu")
    with torch.no_grad():
        image = enc.encode_image(enc.preprocess([load_image(d.image_bytes) for d in docs])).numpy()
        text = enc.encode_text([d.text for d in docs]).numpy()
    assert out["text_emb"].dtype == np.float32 and out["image_emb"].dtype == np.float32
    assert out["text_emb"].shape == (10, 16)
    np.testing.assert_allclose(out["image_emb"], image, atol=1e-5)
    np.testing.assert_allclose(out["text_emb"], text, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_emb"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["image_emb"], axis=1), 1.0, atol=1e-5)
    assert list(out["id"]) == [d.id for d in docs]
    assert list(out["domain"]) == [d.domain for d in docs]
    assert list(out[E.REJECT_COLUMN]) == [""] * 10
    assert embedder.model_id == enc.model_id and embedder.dim == 16


def test_embedder_rejects_bad_rows_and_keeps_the_others(embedder, corpus, tmp_path):
    good = corpus[:3]
    bad = [
        dataclasses.replace(corpus[3], id="corrupt", image_bytes=b"this is not a png"),
        dataclasses.replace(corpus[4], id="no-image", image_bytes=None, image_path="", image_available=False),
        dataclasses.replace(corpus[5], id="missing-file", image_bytes=None, image_path=str(tmp_path / "nope.png")),
    ]
    batch = E.docs_to_batch([good[0], bad[0], good[1], bad[1], bad[2], good[2]])
    batch["text"][5] = "   "  # good[2] now has no text
    out = embedder(batch)
    reasons = dict(zip(out["id"], out[E.REJECT_COLUMN], strict=True))
    assert reasons[good[0].id] == "" and reasons[good[1].id] == ""
    assert "cannot decode" in reasons["corrupt"]
    assert "no image" in reasons["no-image"]
    assert "does not exist" in reasons["missing-file"]
    assert "empty text" in reasons[good[2].id]
    alone = embedder(E.docs_to_batch(good[:2]))
    np.testing.assert_allclose(out["image_emb"][[0, 2]], alone["image_emb"], atol=1e-6)
    np.testing.assert_allclose(out["text_emb"][[0, 2]], alone["text_emb"], atol=1e-6)
    assert not out["text_emb"][[1, 3, 4, 5]].any() and not out["image_emb"][[1, 3, 4, 5]].any()

    accepted, rejects = E.split_rejects(out)
    assert list(accepted["id"]) == [good[0].id, good[1].id]
    assert E.REJECT_COLUMN not in accepted
    assert [r["id"] for r in rejects] == ["corrupt", "no-image", "missing-file", good[2].id]
    assert all(r["reason"] and r["domain"] for r in rejects)
    with pytest.raises(ValueError, match="rejected rows"):
        E.embeddings_table(out)


def test_embedder_reads_relative_image_paths_against_image_root(embedder, corpus, tmp_path):
    doc = corpus[0]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(doc.image_bytes)
    by_path = dataclasses.replace(doc, image_bytes=None, image_path="imgs/a.png")
    rooted = E.CorpusEmbedder(str(embedder.encoder_dir), device="cpu", image_root=str(tmp_path))
    out = rooted(E.docs_to_batch([by_path]))
    ref = embedder(E.docs_to_batch([doc]))
    assert out[E.REJECT_COLUMN][0] == ""
    np.testing.assert_allclose(out["image_emb"], ref["image_emb"], atol=1e-6)
    unrooted = embedder(E.docs_to_batch([by_path]))  # relative to the cwd: not found there
    assert "does not exist" in unrooted[E.REJECT_COLUMN][0]


def test_embedder_refuses_a_batch_without_corpus_columns(embedder):
    with pytest.raises(ValueError, match="CorpusDoc rows"):
        embedder({"id": np.array(["a"], dtype=object), "text": np.array(["t"], dtype=object)})


def test_embed_table_in_small_batches_equals_one_batch(embedder, corpus):
    table = pa.Table.from_pylist([dataclasses.asdict(d) for d in corpus[:11]])
    looped = E.embed_table(embedder, table, batch_size=4, progress=False)
    whole = embedder(E.table_to_batch(table))
    assert list(looped["id"]) == list(whole["id"])
    np.testing.assert_allclose(looped["text_emb"], whole["text_emb"], atol=1e-5)
    np.testing.assert_allclose(looped["image_emb"], whole["image_emb"], atol=1e-5)


# ------------------------------------------------------------------------------- encoder identity


def test_encoder_info_reads_id_dim_and_tells_weights_apart(encoder_dir, tmp_path):
    info = E.encoder_info(encoder_dir)
    assert info.model_id == TINY.model_name and info.dim == 16
    assert info.encoder_dir == str(Path(encoder_dir).resolve())
    copy = shutil.copytree(encoder_dir, tmp_path / "copy")
    assert E.encoder_info(copy).fingerprint == info.fingerprint
    other = E.encoder_info(save_tiny_encoder(tmp_path / "other", seed=1))
    assert other.model_id == info.model_id and other.fingerprint != info.fingerprint
    with pytest.raises(FileNotFoundError):
        E.encoder_info(tmp_path / "absent")


def test_resolve_encoder_dirs_names_missing_dirs_and_the_remedy(tmp_path):
    (tmp_path / "radiology").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        E.resolve_encoder_dirs(["radiology", "pathology", "ophthalmology"], retrievers_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "pathology") in msg and str(tmp_path / "ophthalmology") in msg
    assert str(tmp_path / "radiology") + "," not in msg
    assert "python jobs/train_retriever.py" in msg and "encoder_dir=" in msg
    dirs = E.resolve_encoder_dirs(["radiology"], retrievers_dir=tmp_path)
    assert dirs == {"radiology": tmp_path / "radiology"}
    both = E.resolve_encoder_dirs(["pathology", "radiology"], retrievers_dir=tmp_path / "nowhere", encoder_dir=tmp_path)
    assert both == {"pathology": tmp_path, "radiology": tmp_path}  # encoder_dir takes precedence
    with pytest.raises(FileNotFoundError, match="prepare_models"):
        E.resolve_encoder_dirs(["radiology"], encoder_dir=tmp_path / "nope")


# ---------------------------------------------------------------------------- parquet and tables


def test_embeddings_parquet_round_trip(tmp_path):
    first = fake_embeddings("pathology", ["a", "b", "c"], seed=1)
    second = fake_embeddings("pathology", ["d", "e"], seed=2)
    E.write_embeddings_part(tmp_path, second, E.part_filename(1, "x"))
    E.write_embeddings_part(tmp_path, first, E.part_filename(0, "y"))
    schema = pq.read_schema(next(E.embeddings_dir(tmp_path, "pathology").glob("part-000000-*")))
    assert schema.field("text_emb").type == pa.list_(pa.float32())
    back = E.read_embeddings(tmp_path, "pathology")
    assert back.ids == ("a", "b", "c", "d", "e")  # generation order, not write order
    np.testing.assert_array_equal(back.text, np.vstack([first.text, second.text]))
    np.testing.assert_array_equal(back.image, np.vstack([first.image, second.image]))
    with pytest.raises(FileExistsError):
        E.write_embeddings_part(tmp_path, first, E.part_filename(0, "y"))
    with pytest.raises(FileNotFoundError, match="build_index"):
        E.read_embeddings(tmp_path, "radiology")


def test_domain_embeddings_refuse_bad_vectors_and_ids():
    rng = np.random.default_rng(0)
    with pytest.raises(IndexInputError, match="norm"):
        E.DomainEmbeddings("radiology", ("a", "b"), 2 * unit_rows(rng, 2, 4), unit_rows(rng, 2, 4))
    with pytest.raises(IndexInputError, match="duplicate"):
        E.DomainEmbeddings("radiology", ("a", "a"), unit_rows(rng, 2, 4), unit_rows(rng, 2, 4))
    with pytest.raises(IndexInputError, match="one text and one image"):
        E.DomainEmbeddings("radiology", ("a",), unit_rows(rng, 2, 4), unit_rows(rng, 2, 4))
    with pytest.raises(IndexInputError, match="domain"):
        E.DomainEmbeddings("cardiology", ("a",), unit_rows(rng, 1, 4), unit_rows(rng, 1, 4))


def test_group_by_domain_keeps_row_order(embedder, corpus):
    docs = [corpus[0], corpus[-1], corpus[1]]
    groups = E.group_by_domain(E.split_rejects(embedder(E.docs_to_batch(docs)))[0])
    assert groups[corpus[0].domain].ids == (corpus[0].id, corpus[1].id)
    assert groups[corpus[-1].domain].ids == (corpus[-1].id,)


def test_docs_parquet_round_trip_and_drop_ids(tmp_path, corpus):
    docs = [d for d in corpus if d.domain == "radiology"]
    E.write_docs_part(tmp_path, "radiology", docs, E.part_filename(0))
    assert E.read_docs(tmp_path, "radiology") == docs
    with pytest.raises(IndexInputError, match="domain"):
        E.write_docs_part(tmp_path, "pathology", docs, E.part_filename(0))
    table = E.docs_table(docs)
    kept = E.drop_ids(table, [docs[0].id, "not-there"])
    assert kept.column("id").to_pylist() == [d.id for d in docs[1:]]
    assert E.drop_ids(table, []).num_rows == len(docs)


# ----------------------------------------------------------------------------- manifest and store


def test_manifest_round_trip_and_errors(tmp_path):
    manifest = E.IndexManifest(
        {
            "radiology": E.ManifestEntry("/m/r", "tiny", 16, 5, "ab" * 32, "flat"),
            "pathology": E.ManifestEntry("/m/p", "tiny", 16, 7),
        }
    )
    E.write_manifest(tmp_path, manifest)
    raw = json.loads((tmp_path / E.MANIFEST_FILE).read_text())
    assert raw["format"] == 1
    assert raw["domains"]["radiology"] == {
        "encoder_dir": "/m/r", "model_id": "tiny", "dim": 16, "n_docs": 5,
        "encoder_fingerprint": "ab" * 32, "index_kind": "flat",
    }
    assert E.read_manifest(tmp_path) == manifest
    raw["format"] = 2
    (tmp_path / E.MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(IndexFileError, match="format"):
        E.read_manifest(tmp_path)
    raw["format"] = 1
    del raw["domains"]["pathology"]["n_docs"]
    (tmp_path / E.MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(IndexFileError, match="n_docs"):
        E.read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="build_index"):
        E.read_manifest(tmp_path / "none")


def make_store(tmp_path: Path, n: int = 6, info: E.EncoderInfo | None = None) -> tuple[Path, dict]:
    embs = {
        "radiology": fake_embeddings("radiology", [f"r{i}" for i in range(n)], seed=1),
        "pathology": fake_embeddings("pathology", [f"p{i}" for i in range(n + 2)], seed=2),
    }
    docs = fake_docs("radiology", list(embs["radiology"].ids)) + fake_docs("pathology", list(embs["pathology"].ids))
    store = tmp_path / "index"
    rejects = [{"id": "bad0", "domain": "radiology", "reason": "image: cannot decode"}]
    E.write_store(store, embs, docs, info or fake_info(), IndexConfig(use_gpu="never"), rejects=rejects)
    return store, embs


def test_write_store_layout_and_load(tmp_path):
    store, embs = make_store(tmp_path)
    manifest, text, image = E.load_index_store(store)
    assert {d: e.n_docs for d, e in manifest.domains.items()} == {"pathology": 8, "radiology": 6}
    assert manifest.domains["radiology"].model_id == "tiny"
    for domain, emb in embs.items():
        assert text[domain].ids == emb.ids == image[domain].ids == E.read_embeddings(store, domain).ids
        assert [d.id for d in E.read_docs(store, domain)] == list(emb.ids)
        scores, ids = text[domain].search(emb.text, 1)
        assert [row[0] for row in ids] == list(emb.ids)
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert E.read_rejects(store) == [{"id": "bad0", "domain": "radiology", "reason": "image: cannot decode"}]
    with pytest.raises(FileExistsError, match="overwrite"):
        make_store(tmp_path)


def test_failed_rebuild_leaves_the_previous_store_untouched(tmp_path):
    store, embs = make_store(tmp_path)
    before = snapshot(store)
    with pytest.raises(IndexInputError, match="nlist"):  # IVF with more cells than documents fails mid-build
        E.write_store(store, embs, E.read_docs(store, "radiology") + E.read_docs(store, "pathology"), fake_info(),
                      IndexConfig(kind="ivf", nlist=64, use_gpu="never"), overwrite=True)
    assert snapshot(store) == before
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


def test_build_domain_indexes_match_brute_force():
    emb = fake_embeddings("ophthalmology", [f"o{i}" for i in range(30)], seed=3)
    text, image = E.build_domain_indexes([emb], IndexConfig(use_gpu="never"), "m")
    query = emb.image[:4]
    scores, ids = text["ophthalmology"].search(query, 5)
    brute = query @ emb.text.T
    order = np.argsort(-brute, axis=1)[:, :5]
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, axis=1), atol=1e-5)
    assert ids == [[emb.ids[j] for j in row] for row in order]
    assert image["ophthalmology"].model_id == "m"


def test_add_documents_appends_without_rebuild(tmp_path):
    store, embs = make_store(tmp_path)
    _, text_before, _ = E.load_index_store(store)
    old_scores, old_ids = text_before["radiology"].search(embs["radiology"].text, 3)
    new = fake_embeddings("radiology", ["r-new-0", "r-new-1"], seed=9)
    rejects = [{"id": "bad1", "domain": "radiology", "reason": "no image"}]
    manifest = E.add_documents(store, [new], fake_docs("radiology", list(new.ids)), fake_info(), rejects)
    assert manifest.domains["radiology"].n_docs == 8 and manifest.domains["pathology"].n_docs == 8
    assert E.read_manifest(store) == manifest
    loaded, text, image = E.load_index_store(store)
    assert loaded == manifest
    assert text["radiology"].ids == embs["radiology"].ids + new.ids == E.read_embeddings(store, "radiology").ids
    scores, ids = text["radiology"].search(new.text, 1)
    assert [row[0] for row in ids] == list(new.ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    _, img_ids = image["radiology"].search(new.image, 1)
    assert [row[0] for row in img_ids] == list(new.ids)
    # the old vectors are unchanged: their own searches return the same scores (new docs may enter the top 3)
    again, again_ids = text["radiology"].search(embs["radiology"].text, 1)
    np.testing.assert_allclose(again[:, 0], old_scores[:, 0], atol=1e-6)
    assert [r[0] for r in again_ids] == [r[0] for r in old_ids]
    assert [d.id for d in E.read_docs(store, "radiology")] == list(embs["radiology"].ids + new.ids)
    assert len(list(E.embeddings_dir(store, "radiology").glob("part-000001-*"))) == 1
    assert [r["id"] for r in E.read_rejects(store)] == ["bad0", "bad1"]
    assert text["pathology"].ids == embs["pathology"].ids  # untouched domain


def test_add_documents_refuses_duplicates_and_leaves_the_store_untouched(tmp_path):
    store, embs = make_store(tmp_path)
    before = snapshot(store)
    dup = fake_embeddings("radiology", ["r-new", "r2"], seed=5)
    with pytest.raises(IndexInputError, match=r"already indexed \['r2'\]"):
        E.add_documents(store, [dup], fake_docs("radiology", list(dup.ids)), fake_info())
    assert snapshot(store) == before
    assert not list(tmp_path.glob(".index*"))  # no temp dir left behind


@pytest.mark.parametrize(
    ("info", "dim", "match"),
    [
        (fake_info(model_id="another-model"), 16, "model_id"),
        (fake_info(dim=8), 8, "dim 8"),
        (fake_info(fingerprint="0" * 64), 16, "weights differ"),
    ],
)
def test_add_documents_refuses_another_model(tmp_path, info, dim, match):
    store, _ = make_store(tmp_path)
    before = snapshot(store)
    new = fake_embeddings("radiology", ["r-new"], dim=dim)
    with pytest.raises(IndexInputError, match=match):
        E.add_documents(store, [new], fake_docs("radiology", ["r-new"]), info)
    assert snapshot(store) == before


def test_add_documents_refuses_unknown_domains_and_mismatched_docs(tmp_path):
    store, _ = make_store(tmp_path)
    before = snapshot(store)
    derm = fake_embeddings("dermatology", ["d0"])
    with pytest.raises(IndexInputError, match="no index for domain"):
        E.add_documents(store, [derm], fake_docs("dermatology", ["d0"]), fake_info())
    new = fake_embeddings("radiology", ["r-new"])
    with pytest.raises(IndexInputError, match="do not match"):
        E.add_documents(store, [new], fake_docs("radiology", ["r-other"]), fake_info())
    assert snapshot(store) == before


# ---------------------------------------------------------------------------------- job planning


def test_corpus_ids_and_duplicate_check(tmp_path, corpus):
    path = tmp_path / "corpus.parquet"
    write_parquet(corpus, CorpusDoc, path)
    ids = E.corpus_ids(path)
    assert {d: len(v) for d, v in ids.items()} == {"ophthalmology": 12, "pathology": 12, "radiology": 12}
    E.check_unique_ids(ids, "corpus")
    with pytest.raises(IndexInputError, match="repeats ids"):
        E.check_unique_ids({"radiology": ["a", "b", "a"]}, "corpus")
    with pytest.raises(FileNotFoundError, match="make_data"):
        E.corpus_ids(tmp_path / "missing.parquet")


def test_plan_index_job_checks_before_work(tmp_path, corpus, encoder_dir):
    path = tmp_path / "corpus.parquet"
    write_parquet(corpus, CorpusDoc, path)
    cfg = BuildIndexConfig(corpus_path=str(path), out_dir=str(tmp_path / "idx"), encoder_dir=str(encoder_dir))
    plan = E.plan_index_job(cfg)
    assert plan.domains == ("ophthalmology", "pathology", "radiology")
    assert plan.counts == {"ophthalmology": 12, "pathology": 12, "radiology": 12}
    assert {i.model_id for i in plan.encoders.values()} == {TINY.model_name}

    narrowed = E.plan_index_job(dataclasses.replace(cfg, domains=("pathology",)))
    assert narrowed.domains == ("pathology",)
    with pytest.raises(IndexInputError, match="no rows of domain"):
        E.plan_index_job(dataclasses.replace(cfg, domains=("dermatology",)))

    info = E.encoder_info(encoder_dir)
    rad = [d for d in corpus if d.domain == "radiology"][:3]
    E.write_store(
        tmp_path / "idx", [fake_embeddings("radiology", [d.id for d in rad])], rad, info, IndexConfig(use_gpu="never")
    )
    with pytest.raises(FileExistsError, match="overwrite"):
        E.plan_index_job(cfg)
    add = dataclasses.replace(cfg, mode="add", domains=("radiology",))
    with pytest.raises(IndexInputError, match="already indexed"):
        E.plan_index_job(add)
    with pytest.raises(IndexInputError, match="no index for domain"):
        E.plan_index_job(dataclasses.replace(add, domains=("pathology",)))


def test_build_index_config_validation():
    cfg = BuildIndexConfig(index={"kind": "hnsw", "ef_search": 64})
    assert cfg.index_config() == IndexConfig(kind="hnsw", ef_search=64)
    assert BuildIndexConfig().index_config() == IndexConfig()
    assert BuildIndexConfig(num_actors=2, max_actors=6).actor_pool_size() == (2, 6)
    assert BuildIndexConfig(num_actors=3).actor_pool_size() == 3
    with pytest.raises(ConfigError, match="index.nlst"):
        BuildIndexConfig(index={"nlst": 4})
    with pytest.raises(ConfigError, match="index.kind"):
        BuildIndexConfig(index={"kind": "annoy"})
    with pytest.raises(ConfigError, match="mode"):
        BuildIndexConfig(mode="append")
    with pytest.raises(ConfigError, match="overwrite"):
        BuildIndexConfig(mode="add", overwrite=True)
    with pytest.raises(ConfigError, match="retrievers_dir"):
        BuildIndexConfig(retrievers_dir="", encoder_dir="")
    with pytest.raises(ConfigError, match="max_actors"):
        BuildIndexConfig(num_actors=3, max_actors=2)
    with pytest.raises(ConfigError, match="device"):
        BuildIndexConfig(device="cuda:1")
