"""The retrieval API: JOMED dual heads, save/load, and route -> FAISS -> fused -> adaptive-k over a hand-built index.

The index under test is written here in the agreed layout (manifest.json, text/, image/, embeddings/, docs/)
with document embeddings chosen by hand, so that the expected rankings and scores are known exactly:

* radiology:     doc r_i's image is image i; its TEXT embedding is the image embedding of image i+1 (mod 5),
                 so text mode ranks r_{j-1} first for query image j, image mode ranks r_j first.
* pathology:     doc p_i's text and image embeddings are both image 5+i's. Served by a dual-head directory
                 (identity heads) rather than a plain encoder directory.
* ophthalmology: text embeddings with prescribed cosines [0.9, 0.85, 0.8, 0.4, 0.35] to query image 8.

One more store is written by the index builder itself (:func:`medrag_ray.retrieval.embed.write_store`) to
check that this reader agrees with that writer.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from medrag_ray.config import ConfigError, load_config
from medrag_ray.data.schema import CORPUS_SCHEMA, CorpusDoc, to_table
from medrag_ray.mining.miner import png_bytes
from medrag_ray.models.common import ModelLoadError, read_card
from medrag_ray.models.dual_encoder import DualEncoder, DualEncoderConfig, build_dual_encoder, save_dual_encoder
from medrag_ray.models.router import build_router, save_router
from medrag_ray.retrieval.embed import (
    EMBEDDINGS_SCHEMA,
    CorpusEmbedder,
    docs_to_batch,
    encoder_info,
    group_by_domain,
    read_embeddings,
    read_manifest,
    write_store,
)
from medrag_ray.retrieval.fusion import candidate_sims, fused_score
from medrag_ray.retrieval.index import DomainIndex, DomainIndexSet, IndexConfig, IndexFileError, IndexMeta
from medrag_ray.retrieval.retriever import (
    DocEmbeddings,
    DomainResources,
    DualHeadRetriever,
    MultimodalRetriever,
    RetrievalConfig,
    head_scores,
    load_retriever,
    read_docs,
    save_retriever,
)

FLAT = IndexConfig(kind="flat", use_gpu="never")
PART = "part-000000-test-00000.parquet"  # the builder's part naming: part-<generation:06d>-<tag>.parquet
PRESCRIBED = [0.9, 0.85, 0.8, 0.4, 0.35]
ROUTER_DOMAINS = ("radiology", "ophthalmology", "pathology", "dermatology")


# ------------------------------------------------------------------------------------------- helpers


def pattern_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Distinct 64x64 RGB images: random 8x8 colour grids upscaled."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).resize((64, 64), Image.NEAREST)
        for _ in range(n)
    ]


@torch.no_grad()
def image_emb(encoder: DualEncoder, images: list[Image.Image]) -> np.ndarray:
    return encoder.encode_image(encoder.preprocess(images)).float().numpy()


@torch.no_grad()
def text_emb(encoder: DualEncoder, texts: list[str]) -> np.ndarray:
    return encoder.encode_text(texts).float().numpy()


def docs_for(domain: str, prefix: str, texts: list[str], images: list[Image.Image | None]) -> list[CorpusDoc]:
    return [
        CorpusDoc(
            id=f"{prefix}{i}",
            domain=domain,
            split="train",
            source="test",
            text=text,
            image_bytes=png_bytes(img) if img is not None else None,
            image_available=img is not None,
        )
        for i, (text, img) in enumerate(zip(texts, images, strict=True))
    ]


def write_index(
    root: Path,
    model_id: str,
    spec: dict[str, tuple[Path, list[CorpusDoc], np.ndarray, np.ndarray]],
) -> Path:
    """Write the agreed store layout by hand: spec maps domain -> (encoder_dir, docs, text_emb, image_emb)."""
    text_set, image_set, manifest = DomainIndexSet(), DomainIndexSet(), {}
    for domain, (encoder_dir, docs, t_emb, i_emb) in spec.items():
        ids = [d.id for d in docs]
        meta = IndexMeta(domain=domain, model_id=model_id)
        text_set.add_index(DomainIndex.build(t_emb, ids, meta, FLAT))
        image_set.add_index(DomainIndex.build(i_emb, ids, meta, FLAT))
        emb_table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "domain": pa.array([domain] * len(ids), pa.string()),
                "text_emb": pa.array([row.tolist() for row in t_emb], pa.list_(pa.float32())),
                "image_emb": pa.array([row.tolist() for row in i_emb], pa.list_(pa.float32())),
            },
            schema=EMBEDDINGS_SCHEMA,
        )
        (root / "embeddings" / domain).mkdir(parents=True)
        pq.write_table(emb_table, root / "embeddings" / domain / PART)
        (root / "docs" / domain).mkdir(parents=True)
        table = to_table(docs, CorpusDoc)
        assert table.schema.equals(CORPUS_SCHEMA)
        pq.write_table(table, root / "docs" / domain / PART)
        manifest[domain] = {"encoder_dir": str(encoder_dir), "model_id": model_id, "dim": t_emb.shape[1],
                            "n_docs": len(ids)}
    text_set.save(root / "text")
    image_set.save(root / "image")
    (root / "manifest.json").write_text(json.dumps({"format": 1, "domains": manifest}), encoding="utf-8")
    return root


def with_cosines(query: np.ndarray, cosines: list[float], seed: int = 0) -> np.ndarray:
    """Unit vectors whose cosine to the unit vector ``query`` is exactly ``cosines``."""
    rng = np.random.default_rng(seed)
    q = query / np.linalg.norm(query)
    rows = []
    for c in cosines:
        o = rng.standard_normal(q.shape[0])
        o -= (o @ q) * q
        o /= np.linalg.norm(o)
        rows.append(c * q + math.sqrt(1 - c * c) * o)
    return np.stack(rows).astype(np.float32)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def encoder() -> DualEncoder:
    torch.manual_seed(0)
    return build_dual_encoder(DualEncoderConfig())


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return pattern_images(9)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, encoder: DualEncoder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retriever")
    encoder_dir = save_dual_encoder(encoder, root / "retriever_plain")
    dual_dir = save_retriever(DualHeadRetriever(encoder), root / "retriever_dual")
    torch.manual_seed(1)
    router = build_router(DualEncoderConfig(), ROUTER_DOMAINS)
    with torch.no_grad():
        router.head.weight.zero_()
        router.head.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 1.0]))  # radiology wins; dermatology has no index
    router_dir = save_router(router, root / "router")
    return {"root": root, "encoder": encoder_dir, "dual": dual_dir, "router": router_dir}


@pytest.fixture(scope="module")
def index_dir(dirs: dict[str, Path], encoder: DualEncoder, images: list[Image.Image]) -> Path:
    img = image_emb(encoder, images)
    rad_docs = docs_for("radiology", "r", [f"radiology report {i}" for i in range(5)], images[:5])
    rad_text = np.stack([img[(i + 1) % 5] for i in range(5)])
    path_docs = docs_for("pathology", "p", [f"pathology caption {i}" for i in range(3)], images[5:8])
    oph_docs = docs_for("ophthalmology", "o", [f"fundus report {i}" for i in range(5)], [None] * 5)
    oph_text = with_cosines(img[8], PRESCRIBED)
    spec = {
        "radiology": (dirs["encoder"], rad_docs, rad_text, img[:5]),
        "pathology": (dirs["dual"], path_docs, img[5:8], img[5:8]),
        "ophthalmology": (dirs["encoder"], oph_docs, oph_text, oph_text),
    }
    return write_index(dirs["root"] / "index", encoder.model_id, spec)


@pytest.fixture(scope="module")
def mr(dirs: dict[str, Path], index_dir: Path) -> MultimodalRetriever:
    return MultimodalRetriever.from_artifacts(dirs["router"], index_dir, verify_docs=0)


# ------------------------------------------------------------------------------------ dual heads


def test_identity_heads_reproduce_plain_clip_scores(encoder: DualEncoder, images: list[Image.Image]) -> None:
    retriever = DualHeadRetriever(encoder)
    texts = ["a report", "another report about the lungs", "a caption"]
    with torch.no_grad():
        pixels = encoder.preprocess(images[:4])
        q = encoder.encode_image(pixels)
        d_txt, d_img = encoder.encode_text(texts), encoder.encode_image(encoder.preprocess(images[4:7]))
        plain_text = encoder.similarity(q, d_txt) / encoder.logit_scale  # MMed-RAG's score without the scale
        got_text = retriever.score(pixels, doc_text_emb=d_txt, mode="text")
        got_image = retriever.score(pixels, doc_image_emb=d_img, mode="image")
        got_fused = retriever.score(pixels, doc_text_emb=d_txt, doc_image_emb=d_img, mode="fused",
                                    weights=(0.3, 0.5, 0.2))
        expected_fused = fused_score(
            candidate_sims(q, d_img.expand(4, -1, -1), d_txt.expand(4, -1, -1)), (0.3, 0.5, 0.2)
        )
        q_text, q_image = retriever.query_embeddings(pixels)
    assert torch.allclose(got_text, plain_text, atol=1e-6)
    assert torch.allclose(got_image, q @ d_img.T, atol=1e-6)
    assert torch.allclose(got_fused, expected_fused, atol=1e-6)
    assert torch.allclose(q_text, q, atol=1e-6) and torch.allclose(q_image, q, atol=1e-6)
    assert torch.allclose(q_text.norm(dim=-1), torch.ones(4), atol=1e-6)


def test_heads_are_independent_and_freeze_except(encoder: DualEncoder, images: list[Image.Image]) -> None:
    retriever = DualHeadRetriever(copy.deepcopy(encoder))  # freeze_except flips the encoder's requires_grad
    pixels = encoder.preprocess(images[:3])
    with torch.no_grad():
        docs = encoder.encode_image(encoder.preprocess(images[3:6]))
    retriever.freeze_except("text")
    trainable = {name for name, p in retriever.named_parameters() if p.requires_grad}
    assert trainable == {"text_head.weight"}
    assert retriever.head_parameters("text") == [retriever.text_head.weight]
    assert retriever.head_parameters("fusion") == [retriever.fusion.weights]
    before_image = retriever.score(pixels, doc_image_emb=docs, mode="image").detach()
    before_text = retriever.score(pixels, doc_text_emb=docs, mode="text").detach()
    opt = torch.optim.SGD(retriever.head_parameters("text"), lr=1e-3)

    def loss_fn() -> torch.Tensor:  # every query should prefer document 0 (a JOMED-style KL to a one-hot)
        return -torch.log_softmax(retriever.score(pixels, doc_text_emb=docs, mode="text") / 0.01, dim=1)[:, 0].mean()

    loss = loss_fn()
    loss.backward()
    assert retriever.image_head.weight.grad is None and retriever.text_head.weight.grad is not None
    opt.step()
    after_text = retriever.score(pixels, doc_text_emb=docs, mode="text").detach()
    after_image = retriever.score(pixels, doc_image_emb=docs, mode="image").detach()
    assert not torch.allclose(after_text, before_text, atol=1e-5)  # the text head learned
    assert loss_fn().item() < loss.item()  # ... in the direction of the loss
    assert torch.equal(after_image, before_image)  # the image head is untouched
    retriever.freeze_except("image")
    assert {n for n, p in retriever.named_parameters() if p.requires_grad} == {"image_head.weight"}
    with pytest.raises(ValueError, match="freeze_except: 'encoder'"):
        retriever.freeze_except("encoder")  # type: ignore[arg-type]
    retriever.reset_heads()
    assert torch.allclose(retriever.score(pixels, doc_text_emb=docs, mode="text").detach(), before_text, atol=1e-6)


def test_head_scores_fused_uses_each_head_and_question_term() -> None:
    q_text = torch.tensor([[1.0, 0.0, 0.0]])
    q_image = torch.tensor([[0.0, 1.0, 0.0]])
    question = torch.tensor([[0.0, 0.0, 2.0]])
    d_txt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    d_img = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # doc 1 has no image: zero row
    got = head_scores(q_text, q_image, doc_text_emb=d_txt, doc_image_emb=d_img, mode="fused",
                      question_emb=question, weights=(1.0, 2.0, 4.0))
    # doc0: 1*cos(qt, t0)=1 + 2*cos(qi, i0)=2 + 4*cos(qq, t0)=0 -> 3; doc1: 0 + 0 + 4*1 -> 4
    assert torch.allclose(got, torch.tensor([[3.0, 4.0]]))
    no_q = head_scores(q_text, q_image, doc_text_emb=d_txt, doc_image_emb=d_img, mode="fused", weights=(1.0, 2.0, 4.0))
    assert torch.allclose(no_q, torch.tensor([[3.0, 0.0]]))
    with pytest.raises(ValueError, match="doc_image_emb"):
        head_scores(q_text, q_image, doc_text_emb=d_txt, mode="image")


def test_save_load_round_trip(tmp_path: Path, encoder: DualEncoder, images: list[Image.Image]) -> None:
    retriever = DualHeadRetriever(encoder, fusion_init=(0.7, 0.2, 0.1), fusion_temperature=0.05)
    torch.manual_seed(3)
    with torch.no_grad():
        retriever.text_head.weight.add_(0.3 * torch.randn_like(retriever.text_head.weight))
        retriever.image_head.weight.add_(0.3 * torch.randn_like(retriever.image_head.weight))
    out = save_retriever(retriever, tmp_path / "dual")
    card = read_card(out)
    assert card is not None and card.kind == "dual_head_retriever" and card.extra["model_id"] == encoder.model_id
    loaded = load_retriever(out)
    pixels = encoder.preprocess(images[:3])
    docs_t = torch.from_numpy(text_emb(encoder, ["one", "two", "three", "four"]))
    docs_i = torch.from_numpy(image_emb(encoder, images[3:7]))
    with torch.no_grad():
        for mode in ("text", "image", "fused"):
            a = retriever.score(pixels, doc_text_emb=docs_t, doc_image_emb=docs_i, mode=mode, questions=["q", "", None])
            b = loaded.score(pixels, doc_text_emb=docs_t, doc_image_emb=docs_i, mode=mode, questions=["q", "", None])
            assert torch.allclose(a, b, atol=1e-6), mode
        plain = encoder.encode_image(pixels) @ docs_t.T
    assert not torch.allclose(loaded.score(pixels, doc_text_emb=docs_t).detach(), plain, atol=1e-3)  # trained heads
    assert loaded.fusion.temperature == 0.05
    assert torch.allclose(loaded.fusion.weights, torch.tensor([0.7, 0.2, 0.1]))


def test_load_plain_encoder_dir_gives_identity_heads(dirs: dict[str, Path], encoder: DualEncoder,
                                                     images: list[Image.Image]) -> None:
    loaded = load_retriever(dirs["encoder"])
    assert torch.equal(loaded.text_head.weight, torch.eye(encoder.embed_dim))
    assert torch.equal(loaded.image_head.weight, torch.eye(encoder.embed_dim))
    pixels = encoder.preprocess(images[:2])
    docs = torch.from_numpy(text_emb(encoder, ["a", "b", "c"]))
    with torch.no_grad():
        assert torch.allclose(loaded.score(pixels, doc_text_emb=docs), encoder.encode_image(pixels) @ docs.T, atol=1e-6)


def test_load_retriever_refuses_other_directories(dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="'router' model, not a retriever.*save_retriever"):
        load_retriever(dirs["router"])
    with pytest.raises(ModelLoadError, match="is not a retriever.*save_dual_encoder"):
        load_retriever(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_retriever(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(dirs["dual"], broken)
    (broken / "retriever_heads.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="retriever_heads"):
        load_retriever(broken)


# ------------------------------------------------------------------------------------------ config


def test_config_validation_names_field_and_fix() -> None:
    cases = [
        ({"k": 0}, r"retrieval\.k=0 must be an integer >= 1"),
        ({"mode": "both"}, r"retrieval\.mode='both' is not one of"),
        ({"adaptive": "elbow"}, r"retrieval\.adaptive='elbow'.*'gap' is the paper's rule"),
        ({"k": 5, "k_min": 6}, r"retrieval\.k_min=6 exceeds retrieval\.k=5"),
        ({"k": 5, "k_max": 6}, r"retrieval\.k_max=6 .*k_max <= k \(5\)"),
        ({"k": 10, "candidates": 5}, r"retrieval\.candidates=5 must be an integer >= retrieval\.k \(10\)"),
        ({"gamma": -0.1}, r"retrieval\.gamma=-0\.1 must be a finite number >= 0"),
        ({"tau": 1.0}, r"retrieval\.tau=1\.0 must be a finite number > 1"),
        ({"temperature": 0.0}, r"retrieval\.temperature=0\.0 must be a number > 0"),
        ({"fused_weights": (1.0, 2.0)}, r"retrieval\.fused_weights=.* three finite numbers"),
        ({"fused_weights": (0.0, 0.0, 0.0)}, r"all 0"),
        ({"scale": "log"}, r"retrieval\.scale='log'"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            RetrievalConfig(**kwargs)  # type: ignore[arg-type]
    cfg = RetrievalConfig(k=3)
    assert cfg.n_candidates == 12 and cfg.effective_k_max == 3
    assert RetrievalConfig(k=3, candidates=7, k_max=2).n_candidates == 7


def test_config_loads_from_overrides() -> None:
    cfg = load_config(RetrievalConfig, None, ["mode=fused", "fused_weights=[0, 1, 0]", "k=4", "adaptive=ratio"])
    assert cfg.mode == "fused" and cfg.fused_weights == (0.0, 1.0, 0.0) and cfg.k == 4 and cfg.adaptive == "ratio"
    with pytest.raises(ConfigError, match="k_min"):
        load_config(RetrievalConfig, None, ["k=2", "k_min=3"])


# --------------------------------------------------------------------------------------- pipeline


def test_layout_is_read(mr: MultimodalRetriever, index_dir: Path, encoder: DualEncoder,
                        images: list[Image.Image]) -> None:
    assert mr.domains == ("ophthalmology", "pathology", "radiology")
    manifest = read_manifest(index_dir).domains
    assert manifest["radiology"].n_docs == 5 and manifest["radiology"].dim == encoder.embed_dim
    res = mr.resources("pathology")
    emb = res.doc_embeddings()
    assert emb.ids == ["p0", "p1", "p2"] and res.doc_embeddings() is emb  # read once
    assert np.allclose(emb.image, image_emb(encoder, images[5:8]), atol=1e-6)
    assert res.docs["p1"].text == "pathology caption 1" and res.docs["p1"].image_bytes == png_bytes(images[6])
    assert read_docs(index_dir, "pathology", with_images=False)["p1"].image_bytes is None
    t, m = emb.gather(np.array([[2, -1]]))
    assert np.allclose(t[0, 0], emb.text[2]) and not t[0, 1].any() and not m[0, 1].any()


def test_own_document_first_and_text_vs_image_index(mr: MultimodalRetriever, images: list[Image.Image]) -> None:
    doms = ["radiology"] * 5
    by_image = mr.retrieve(images[:5], domains=doms, cfg=RetrievalConfig(k=5, mode="image", adaptive="none"))
    by_text = mr.retrieve(images[:5], domains=doms, cfg=RetrievalConfig(k=5, mode="text", adaptive="none"))
    for j in range(5):
        assert by_image[j].hits[0].doc_id == f"r{j}"
        assert by_image[j].hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert by_text[j].hits[0].doc_id == f"r{(j - 1) % 5}"  # text embedding of r_{j-1} is image j's
        assert by_text[j].hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.rank for h in by_text[j].hits] == list(range(5))
        scores = [h.score for h in by_text[j].hits]
        assert scores == sorted(scores, reverse=True)
        assert by_image[j].domain == "radiology" and by_image[j].domain_confidence is None
    hit = by_image[2].hits[0]
    assert hit.text == "radiology report 2" and hit.image_bytes == png_bytes(images[2])
    # pathology is served by a dual-head directory and its text embeddings are its own images'
    path = mr.retrieve(images[5:8], domains=["pathology"] * 3, cfg=RetrievalConfig(k=3, adaptive="none"))
    assert [r.hits[0].doc_id for r in path] == ["p0", "p1", "p2"]


def test_text_scores_equal_plain_clip_cosines(mr: MultimodalRetriever, encoder: DualEncoder,
                                             images: list[Image.Image], index_dir: Path) -> None:
    [result] = mr.retrieve([images[3]], domains=["radiology"], cfg=RetrievalConfig(k=5, adaptive="none"))
    emb = DocEmbeddings.from_domain(read_embeddings(index_dir, "radiology"))
    q = image_emb(encoder, [images[3]])[0]
    for hit in result.hits:
        assert hit.score == pytest.approx(float(emb.text[emb.rows([hit.doc_id])[0]] @ q), abs=1e-5)


def test_adaptive_rules_on_known_scores(mr: MultimodalRetriever, images: list[Image.Image]) -> None:
    query, doms = [images[8]], ["ophthalmology"]

    def run(**kwargs: object) -> tuple[int, list[bool], list[float]]:
        [res] = mr.retrieve(query, domains=doms, cfg=RetrievalConfig(k=5, **kwargs))  # type: ignore[arg-type]
        return res.k_kept, [h.kept for h in res.hits], [h.score for h in res.hits]

    k, kept, scores = run(adaptive="none")
    assert k == 5 and all(kept)
    assert scores == pytest.approx(PRESCRIBED, abs=1e-5)
    # gap rule: u = log(.9/.85)=.057, log(.85/.8)=.061, log(.8/.4)=.693 -> first u > 0.5 at i=3
    assert run(adaptive="gap", gamma=0.5)[:2] == (3, [True, True, True, False, False])
    assert run(adaptive="gap", gamma=0.05)[0] == 1
    assert run(adaptive="gap", gamma=0.8)[0] == 5
    assert run(adaptive="gap", gamma=0.5, k_max=2)[:2] == (2, [True, True, False, False, False])
    assert run(adaptive="gap", gamma=0.05, k_min=4)[0] == 4
    # ratio rule: S_1/S_i = 1, 1.059, 1.125, 2.25, 2.57
    assert run(adaptive="ratio", tau=1.5)[:2] == (3, [True, True, True, False, False])
    assert run(adaptive="ratio", tau=1.1)[0] == 2
    assert run(adaptive="ratio", tau=3.0, k_max=4)[0] == 4
    assert run(adaptive="none", k_max=2)[0] == 2
    # softmax scale with temperature 0.1: gaps (S_i - S_{i+1}) / 0.1 = 0.5, 0.5, 4.0, 0.5
    assert run(adaptive="gap", gamma=1.0, scale="softmax", temperature=0.1)[0] == 3
    assert run(adaptive="gap", gamma=0.4, scale="softmax", temperature=0.1)[0] == 1


def test_router_is_used_and_skipped(mr: MultimodalRetriever, images: list[Image.Image]) -> None:
    cfg = RetrievalConfig(k=3, mode="image", adaptive="none")
    routed = mr.retrieve(images[:3], cfg=cfg)
    # bias (3, 0, 0, 1) over (radiology, ophthalmology, pathology, dermatology): dermatology has no index
    expected_conf = math.e**3 / (math.e**3 + 2 + math.e)
    for j, res in enumerate(routed):
        assert res.domain == "radiology"
        assert res.domain_confidence == pytest.approx(expected_conf, abs=1e-5)
        assert res.hits[0].doc_id == f"r{j}"
    explicit = mr.retrieve(images[:3], domains=["pathology"] * 3, cfg=cfg)
    assert all(r.domain == "pathology" and r.domain_confidence is None for r in explicit)
    assert [h.doc_id for h in explicit[0].hits] != [h.doc_id for h in routed[0].hits]
    assert mr.route(images[:2]) == [("radiology", pytest.approx(expected_conf, abs=1e-5))] * 2


def test_an_unindexed_or_unsure_route_is_unknown(mr: MultimodalRetriever, images: list[Image.Image]) -> None:
    router = mr.router
    assert router is not None
    cfg = RetrievalConfig(k=3, mode="image", adaptive="none")
    bias = router.head.bias.detach().clone()
    try:
        with torch.no_grad():
            router.head.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 3.0]))  # dermatology wins: it has no index
        unknown = mr.retrieve(images[:2], cfg=cfg)
        conf = math.e**3 / (math.e**3 + 2 + math.e)
        assert [(r.domain, r.hits, r.k_kept) for r in unknown] == [("unknown", [], 0)] * 2
        assert unknown[0].domain_confidence == pytest.approx(conf, abs=1e-5)
        with torch.no_grad():
            router.head.bias.copy_(bias)
        router.set_calibration(2.0, 0.0)  # a temperature spreads the probabilities: radiology at T=2
        [hot] = mr.route(images[:1])
        assert hot == ("radiology", pytest.approx(math.e**1.5 / (math.e**1.5 + 2 + math.e**0.5), abs=1e-5))
        router.set_calibration(1.0, 0.9)  # below the unknown threshold: unknown, with the confidence it had
        assert mr.route(images[:1]) == [("unknown", pytest.approx(math.e**3 / (math.e**3 + 2 + math.e), abs=1e-5))]
    finally:
        with torch.no_grad():
            router.head.bias.copy_(bias)
        router.set_calibration(1.0, 0.0)


def test_batches_group_by_domain(mr: MultimodalRetriever, images: list[Image.Image],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rad, path = mr.resources("radiology"), mr.resources("pathology")
    assert rad.retriever is mr.resources("ophthalmology").retriever  # one encoder_dir, loaded once
    forwards: list[int] = []
    hooks = [
        res.retriever.encoder.clip.visual.register_forward_hook(lambda m, i, o: forwards.append(o.shape[0]))
        for res in (rad, path)
    ]
    searches: list[tuple[str, int]] = []
    for res in (rad, path):
        original = res.text_index.search

        def counted(queries: np.ndarray, k: int, _orig=original, _d: str = res.domain):  # type: ignore[no-untyped-def]
            searches.append((_d, len(queries)))
            return _orig(queries, k)

        monkeypatch.setattr(res.text_index, "search", counted)
    try:
        doms = ["radiology", "pathology", "radiology", "pathology", "radiology"]
        query = [images[0], images[5], images[1], images[6], images[2]]
        results = mr.retrieve(query, domains=doms, cfg=RetrievalConfig(k=2, adaptive="none"))
        assert sorted(forwards) == [2, 3] and sorted(searches) == [("pathology", 2), ("radiology", 3)]
        assert [r.domain for r in results] == doms
        assert [r.hits[0].doc_id for r in results] == ["r4", "p0", "r0", "p1", "r1"]
        forwards.clear()
        mr.retrieve(query, domains=doms, cfg=RetrievalConfig(k=2, adaptive="none", batch_size=2))
        assert sorted(forwards) == [1, 2, 2]
    finally:
        for hook in hooks:
            hook.remove()


def test_fused_weights_pick_the_ranking(mr: MultimodalRetriever, images: list[Image.Image]) -> None:
    doms = ["radiology"] * 5
    beta_only = mr.retrieve(images[:5], domains=doms,
                            cfg=RetrievalConfig(k=5, mode="fused", fused_weights=(0.0, 1.0, 0.0), adaptive="none"))
    alpha_only = mr.retrieve(images[:5], domains=doms,
                             cfg=RetrievalConfig(k=5, mode="fused", fused_weights=(1.0, 0.0, 0.0), adaptive="none"))
    image_mode = mr.retrieve(images[:5], domains=doms, cfg=RetrievalConfig(k=5, mode="image", adaptive="none"))
    for j in range(5):
        assert beta_only[j].hits[0].doc_id == f"r{j}"  # ranks by image similarity
        assert alpha_only[j].hits[0].doc_id == f"r{(j - 1) % 5}"  # ranks by text similarity
        assert [h.doc_id for h in beta_only[j].hits] == [h.doc_id for h in image_mode[j].hits]
        assert [h.score for h in beta_only[j].hits] == pytest.approx([h.score for h in image_mode[j].hits], abs=1e-5)
    # default weights: the retriever's untrained FusedScorer (1, 0, 0) = plain image->text
    default = mr.retrieve(images[:2], domains=doms[:2], cfg=RetrievalConfig(k=5, mode="fused", adaptive="none"))
    assert [h.doc_id for h in default[1].hits] == [h.doc_id for h in alpha_only[1].hits]


def test_fused_question_term(mr: MultimodalRetriever, encoder: DualEncoder, images: list[Image.Image],
                             index_dir: Path) -> None:
    cfg = RetrievalConfig(k=3, mode="fused", fused_weights=(1.0, 1.0, 2.0), adaptive="none")
    with_q, without_q = mr.retrieve([images[5], images[5]], questions=["is there atypia?", None],
                                    domains=["pathology"] * 2, cfg=cfg)
    emb = DocEmbeddings.from_domain(read_embeddings(index_dir, "pathology"))
    q_img = image_emb(encoder, [images[5]])[0]
    q_txt = text_emb(encoder, ["is there atypia?"])[0]
    for res, has_q in ((with_q, True), (without_q, False)):
        assert {h.doc_id for h in res.hits} == {"p0", "p1", "p2"}
        for hit in res.hits:
            r = emb.rows([hit.doc_id])[0]
            expected = emb.text[r] @ q_img + emb.image[r] @ q_img + (2.0 * emb.text[r] @ q_txt if has_q else 0.0)
            assert hit.score == pytest.approx(float(expected), abs=1e-5), (hit.doc_id, has_q)
    assert [h.score for h in with_q.hits] != pytest.approx([h.score for h in without_q.hits], abs=1e-4)


def test_in_memory_resources_without_images(encoder: DualEncoder, images: list[Image.Image]) -> None:
    """A store built in memory: no image index, and a document with a zero image embedding."""
    img = image_emb(encoder, images[:3])
    docs = docs_for("radiology", "m", ["a", "b", "c"], [images[0], images[1], None])
    ids = [d.id for d in docs]
    index = DomainIndex.build(img, ids, IndexMeta("radiology", encoder.model_id), FLAT)
    image_rows = img.copy()
    image_rows[2] = 0.0
    res = DomainResources("radiology", DualHeadRetriever(encoder), index, {d.id: d for d in docs},
                          embeddings=DocEmbeddings(ids, img, image_rows))
    mr = MultimodalRetriever([res])
    cfg = RetrievalConfig(k=3, mode="fused", fused_weights=(1.0, 1.0, 0.0), adaptive="none")
    [out] = mr.retrieve([images[2]], domains=["radiology"], cfg=cfg)
    scores = {h.doc_id: h.score for h in out.hits}
    q = img[2]
    assert scores["m2"] == pytest.approx(1.0, abs=1e-5)  # text term 1, image term 0 (no image)
    assert scores["m0"] == pytest.approx(float(2 * img[0] @ q), abs=1e-5)
    assert out.hits[0].doc_id == "m0" and out.hits[0].image_bytes == png_bytes(images[0])
    with pytest.raises(ValueError, match="no image index"):
        mr.retrieve([images[0]], domains=["radiology"], cfg=RetrievalConfig(k=2, mode="image"))
    with pytest.raises(ValueError, match="dim 64 but the retriever embeds in 32"):
        DomainResources("radiology", DualHeadRetriever(build_dual_encoder(DualEncoderConfig(embed_dim=32))), index,
                        {d.id: d for d in docs})
    with pytest.raises(IndexFileError, match="have no CorpusDoc row"):
        DomainResources("radiology", DualHeadRetriever(encoder), index, {})


def test_retrieve_argument_errors(mr: MultimodalRetriever, images: list[Image.Image]) -> None:
    assert mr.retrieve([]) == []
    with pytest.raises(ValueError, match=r"domains \['dermatology'\] have no index"):
        mr.retrieve(images[:1], domains=["dermatology"])
    with pytest.raises(ValueError, match="2 questions for 1 images"):
        mr.retrieve(images[:1], questions=["a", "b"], domains=["radiology"])
    with pytest.raises(TypeError, match="not a PIL image"):
        mr.retrieve([np.zeros((4, 4, 3))], domains=["radiology"])  # type: ignore[list-item]


def test_without_router_domains_are_required(dirs: dict[str, Path], index_dir: Path,
                                             images: list[Image.Image]) -> None:
    mr = MultimodalRetriever.from_artifacts(None, index_dir, domains=["radiology"], with_images=False, verify_docs=0)
    assert mr.domains == ("radiology",)
    [res] = mr.retrieve(images[:1], domains=["radiology"], cfg=RetrievalConfig(k=2, mode="image"))
    assert res.hits[0].doc_id == "r0" and res.hits[0].image_bytes is None
    with pytest.raises(ValueError, match="no domain router is loaded: pass domains"):
        mr.retrieve(images[:1])


# ------------------------------------------------------------------------------ artifacts errors


def test_missing_index_dir_and_parts(tmp_path: Path, dirs: dict[str, Path], index_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"index directory .*nowhere does not exist.*jobs/build_index\.py"):
        MultimodalRetriever.from_artifacts(dirs["router"], tmp_path / "nowhere")
    broken = tmp_path / "index"
    shutil.copytree(index_dir, broken)
    shutil.rmtree(broken / "docs" / "radiology")
    with pytest.raises(FileNotFoundError, match=r"docs/radiology holds no part-\*\.parquet.*jobs/build_index\.py"):
        MultimodalRetriever.from_artifacts(None, broken, domains=["radiology"], verify_docs=0)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["domains"]["pathology"]["n_docs"] = 7
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match="n_docs=7"):
        MultimodalRetriever.from_artifacts(None, broken, domains=["pathology"], verify_docs=0)
    manifest["format"] = 2
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match="format=2"):
        MultimodalRetriever.from_artifacts(None, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json does not exist.*jobs/build_index\.py"):
        MultimodalRetriever.from_artifacts(None, broken)
    with pytest.raises(ValueError, match=r"domains \['dermatology'\] are not in"):
        MultimodalRetriever.from_artifacts(None, index_dir, domains=["dermatology"], verify_docs=0)


def test_store_written_by_the_builder_is_read_and_verified(tmp_path: Path, dirs: dict[str, Path],
                                                            images: list[Image.Image]) -> None:
    """The index builder's own writer (embed.write_store over CorpusEmbedder outputs) -> from_artifacts."""
    texts = ["left pleural effusion", "no acute findings", "cardiomegaly", "a small nodule"]
    docs = docs_for("radiology", "v", texts, images[:4])
    batch = CorpusEmbedder(str(dirs["encoder"]), device="cpu")(docs_to_batch(docs))
    root = tmp_path / "index"
    manifest = write_store(root, group_by_domain(batch), docs, encoder_info(dirs["encoder"]), FLAT)
    assert manifest.domains["radiology"].n_docs == 4
    mr = MultimodalRetriever.from_artifacts(None, root)  # verify_docs=4: the retriever reproduces the store
    by_image = mr.retrieve(images[:4], domains=["radiology"] * 4, cfg=RetrievalConfig(k=4, mode="image"))
    assert [r.hits[0].doc_id for r in by_image] == ["v0", "v1", "v2", "v3"]
    assert by_image[1].hits[0].text == "no acute findings"
    fused = mr.retrieve(images[:2], domains=["radiology"] * 2, questions=["effusion?", None],
                        cfg=RetrievalConfig(k=3, mode="fused", fused_weights=(0.0, 1.0, 0.0), adaptive="none"))
    assert [r.hits[0].doc_id for r in fused] == ["v0", "v1"]
    torch.manual_seed(123)
    other = save_dual_encoder(build_dual_encoder(DualEncoderConfig()), tmp_path / "other")  # same id, new weights
    with pytest.raises(IndexFileError, match="does not reproduce the text embeddings"):
        MultimodalRetriever.from_artifacts(None, root, retriever_dirs={"radiology": other})
    small = save_dual_encoder(build_dual_encoder(DualEncoderConfig(embed_dim=32)), tmp_path / "small")
    with pytest.raises(IndexFileError, match="built with model_id="):
        MultimodalRetriever.from_artifacts(None, root, retriever_dirs={"radiology": small})
