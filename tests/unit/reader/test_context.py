"""Retrieved context for reader samples: self-exclusion, kept hits only, prompts in both styles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medrag_ray.data.schema import CorpusDoc, RecordError, Sample
from medrag_ray.mining.miner import png_bytes
from medrag_ray.models.dual_encoder import build_dual_encoder
from medrag_ray.reader.context import (
    SampleContext,
    reader_input,
    retrieve_contexts,
    sample_image,
    self_doc_ids,
)
from medrag_ray.reader.prompts import closed_prompt, closed_rag_prompt, open_prompt, report_prompt
from medrag_ray.retrieval.index import DomainIndex, IndexConfig, IndexMeta
from medrag_ray.retrieval.retriever import (
    DocEmbeddings,
    DomainResources,
    DualHeadRetriever,
    Hit,
    MultimodalRetriever,
    RetrievalConfig,
    RetrievalResult,
)
from tests.unit.retrieval.embed_fixtures import TINY


def grid_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Distinct 32x32 RGB images: random 4x4 colour grids upscaled."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).resize((32, 32), Image.NEAREST)
        for _ in range(n)
    ]


def closed(sample_id: str = "s1", domain: str = "radiology", meta: str = "{}", **kw: object) -> Sample:
    fields: dict[str, object] = dict(
        id=sample_id, domain=domain, split="train", source="test", question="Is there an effusion?",
        answer="yes", answer_type="closed", meta=meta,
    )
    fields.update(kw)
    return Sample(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ self ids


def test_self_doc_ids() -> None:
    assert self_doc_ids(closed("mmed/iu/7")) == {"mmed/iu/7"}
    assert self_doc_ids(closed("q-7", meta=json.dumps({"case_id": "case-7"}))) == {"q-7", "case-7"}
    assert self_doc_ids(closed("q-7", meta=json.dumps({"case_id": ""}))) == {"q-7"}
    assert self_doc_ids(closed("q-7", meta=json.dumps({"case_id": 7}))) == {"q-7"}


def test_sample_image() -> None:
    image = grid_images(1)[0]
    got = sample_image(closed(image_bytes=png_bytes(image), image_available=True))
    assert np.array_equal(np.asarray(got), np.asarray(image))
    with pytest.raises(RecordError, match="neither image_bytes nor image_path"):
        sample_image(closed())
    with pytest.raises(RecordError) as info:
        sample_image(closed("bad", image_bytes=b"not an image"))
    assert "sample bad" in str(info.value)


# --------------------------------------------------------------------------------- reader_input


def test_reader_input_closed_with_and_without_context() -> None:
    sample, image = closed(), grid_images(1)[0]
    bare = reader_input(sample, image, None)
    assert bare.parts == (image, closed_prompt("Is there an effusion?"))
    ctx = SampleContext("ophthalmology", 0.8, ("d1", "d2"), ("first report", "second report"), (0.9, 0.8))
    mmed = reader_input(sample, image, ctx)
    # The routed domain names the image, not the sample's label.
    assert mmed.parts == (image, closed_rag_prompt("Is there an effusion?", ["first report", "second report"],
                                                   "ophthalmology"))
    assert "fundus image" in mmed.parts[1]
    empty = SampleContext("radiology", None)
    assert reader_input(sample, image, empty).parts == bare.parts
    three = reader_input(sample, image, None, choices=("a", "b", "c"))
    assert three.parts[1].endswith("three options: [a, b, c].")


def test_reader_input_report_and_open() -> None:
    image = grid_images(1)[0]
    ctx = SampleContext("radiology", None, ("d1",), ("a report",), (0.5,))
    report = Sample(id="r", domain="radiology", split="train", source="t", text="No effusion.", answer_type="report")
    assert reader_input(report, image, ctx).parts[1] == report_prompt(["a report"])
    assert reader_input(report, image, None).parts[1] == report_prompt([])
    opened = closed(answer="a nodule", answer_type="open", question="What is seen?")
    assert reader_input(opened, image, ctx).parts[1] == open_prompt("What is seen?", ["a report"])


def test_reader_input_jomed() -> None:
    query, ref1, ref2 = grid_images(3)
    ctx = SampleContext("radiology", 0.5, ("d1", "d2"), ("report one", "report two"), (0.9, 0.7),
                        (png_bytes(ref1), png_bytes(ref2)))
    inp = reader_input(closed(), query, ctx, style="jomed")
    assert len(inp.parts) == 6
    assert inp.parts[1] == "Reference 1: report one" and inp.parts[3] == "Reference 2: report two"
    assert np.array_equal(np.asarray(inp.parts[0]), np.asarray(ref1))
    assert np.array_equal(np.asarray(inp.parts[2]), np.asarray(ref2))
    assert inp.parts[4] is query
    assert inp.parts[5] == closed_prompt("Is there an effusion?")  # the references are the pairs, not the prompt
    for images in ((), (png_bytes(ref1),), (png_bytes(ref1), None)):
        missing = SampleContext("radiology", None, ("d1", "d2"), ("a", "b"), (0.9, 0.7), images)
        with pytest.raises(ValueError, match="style=jomed needs every retrieved document's image"):
            reader_input(closed(), query, missing, style="jomed")
    with pytest.raises(ValueError, match="style must be 'mmed' or 'jomed'"):
        reader_input(closed(), query, ctx, style="rule")


def test_reader_input_unknown_answer_type() -> None:
    label = Sample(id="m", domain="pathology", split="train", source="t", answer="tumor", answer_type="label")
    with pytest.raises(ValueError, match="answer_type 'label' has no reader prompt"):
        reader_input(label, grid_images(1)[0], None)


def test_to_meta() -> None:
    ctx = SampleContext("pathology", 0.75, ("a", "b"), ("t1", "t2"), (0.123456789, 0.5), (b"x", b"y"))
    assert ctx.to_meta() == {
        "routed_domain": "pathology",
        "domain_confidence": 0.75,
        "retrieved_ids": ["a", "b"],
        "retrieved_scores": [0.123457, 0.5],
    }
    given = SampleContext("pathology", None, ("a",), ("t1",), (0.5,))  # route=false: the caller named the domain
    assert given.to_meta()["domain_confidence"] is None


# ---------------------------------------------------------------------------- retrieve_contexts


class StubRetriever:
    """Records the arguments of ``retrieve`` and returns fixed results with kept and unkept hits."""

    def __init__(self, results: list[RetrievalResult]) -> None:
        self.results = results
        self.calls: list[dict[str, object]] = []

    def retrieve(self, images, questions, domains=None, cfg=None, exclude_ids=None):  # noqa: ANN001, ANN201
        self.calls.append(dict(images=images, questions=questions, domains=domains, cfg=cfg, exclude_ids=exclude_ids))
        return self.results


def _hit(doc_id: str, score: float, kept: bool, rank: int, image: bytes | None = None) -> Hit:
    return Hit(doc_id=doc_id, text=f"text of {doc_id}", score=score, kept=kept, rank=rank, image_bytes=image)


def test_retrieve_contexts_keeps_only_kept_hits_and_excludes_self() -> None:
    images = grid_images(2)
    results = [
        RetrievalResult("ophthalmology", 0.6, [_hit("a", 0.9, True, 0, b"A"), _hit("b", 0.8, True, 1, b"B"),
                                               _hit("c", 0.3, False, 2, b"C")], k_kept=2),
        RetrievalResult("radiology", 0.9, [_hit("d", 0.5, False, 0), _hit("e", 0.4, False, 1)], k_kept=0),
    ]
    stub = StubRetriever(results)
    samples = [
        closed("s1", meta=json.dumps({"case_id": "case-1"})),
        Sample(id="s2", domain="pathology", split="train", source="t", text="caption", answer_type="report"),
    ]
    cfg = RetrievalConfig(k=3, adaptive="none")
    contexts = retrieve_contexts(stub, samples, images, cfg)
    [call] = stub.calls
    assert call["images"] == images and call["cfg"] is cfg
    assert call["domains"] is None  # routed
    assert call["questions"] == ["Is there an effusion?", None]
    assert call["exclude_ids"] == [{"s1", "case-1"}, {"s2"}]
    first, second = contexts
    assert first == SampleContext("ophthalmology", 0.6, ("a", "b"), ("text of a", "text of b"), (0.9, 0.8), ())
    assert second == SampleContext("radiology", 0.9)
    assert second.texts == () and second.doc_ids == ()

    with_images = retrieve_contexts(stub, samples, images, cfg, route=False, with_images=True)
    assert stub.calls[-1]["domains"] == ["radiology", "pathology"]
    assert with_images[0].images == (b"A", b"B") and with_images[1].images == ()


# --------------------------------------------------------------------- the real retriever path


@pytest.fixture(scope="module")
def corpus():
    """A radiology index in memory over 6 documents whose text embedding is their own image's embedding."""
    torch.manual_seed(0)
    encoder = build_dual_encoder(TINY)
    images = grid_images(6, seed=3)
    with torch.no_grad():
        emb = encoder.encode_image(encoder.preprocess(images)).float().numpy()
    docs = [
        CorpusDoc(id=f"d{i}", domain="radiology", split="train", source="test", text=f"report {i}",
                  image_bytes=png_bytes(im), image_available=True)
        for i, im in enumerate(images)
    ]
    ids = [d.id for d in docs]
    index = DomainIndex.build(emb, ids, IndexMeta("radiology", encoder.model_id), IndexConfig(use_gpu="never"))
    res = DomainResources("radiology", DualHeadRetriever(encoder), index, {d.id: d for d in docs},
                          embeddings=DocEmbeddings(ids, emb, emb))
    return MultimodalRetriever([res]), images, emb


def test_real_retriever_excludes_own_doc_and_still_returns_k(corpus) -> None:
    mr, images, emb = corpus
    cfg = RetrievalConfig(k=3, adaptive="none")
    [plain] = mr.retrieve([images[2]], domains=["radiology"], cfg=cfg)
    assert plain.hits[0].doc_id == "d2" and plain.hits[0].score == pytest.approx(1.0, abs=1e-5)
    [excluded] = mr.retrieve([images[2]], domains=["radiology"], cfg=cfg, exclude_ids=[{"d2"}])
    ids = [h.doc_id for h in excluded.hits]
    assert "d2" not in ids and len(ids) == 3
    sims = emb @ emb[2]
    expected = [f"d{j}" for j in np.argsort(-sims) if j != 2][:3]
    assert ids == expected
    assert [h.score for h in excluded.hits] == pytest.approx([float(sims[int(i[1:])]) for i in expected], abs=1e-5)

    # Through retrieve_contexts: a train sample whose case id is the corpus document never sees it.
    sample = closed("q2", meta=json.dumps({"case_id": "d2"}))
    [ctx] = retrieve_contexts(mr, [sample], [images[2]], cfg, route=False, with_images=True)
    assert "d2" not in ctx.doc_ids and len(ctx.doc_ids) == 3 and ctx.doc_ids == tuple(expected)
    assert ctx.texts == tuple(f"report {i[1:]}" for i in expected)
    assert all(b is not None for b in ctx.images)


def test_least_similar_docs_matches_numpy(corpus) -> None:
    mr, images, emb = corpus
    docs = mr.least_similar_docs(images, ["radiology"] * len(images))
    for i, doc in enumerate(docs):
        expected = int(np.argmin(emb @ emb[i]))
        assert doc.id == f"d{expected}", i
        assert doc.id != f"d{i}"
    with pytest.raises(ValueError, match="one per image"):
        mr.least_similar_docs(images[:2], ["radiology"])


def test_missing_reader_inputs_names_each_absent_field(tmp_path) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from medrag_ray.reader.context import missing_reader_inputs

    (tmp_path / "reader").mkdir()
    (tmp_path / "samples.parquet").write_bytes(b"")
    cfg = SimpleNamespace(
        samples_path=str(tmp_path / "samples.parquet"),
        reader_dir=str(tmp_path / "reader"),
        context=SimpleNamespace(router_dir=str(tmp_path / "router"), index_dir=str(tmp_path / "index")),
    )
    assert missing_reader_inputs(cfg) == [
        f"context.router_dir={tmp_path / 'router'}",
        f"context.index_dir={tmp_path / 'index'}",
    ]
    (tmp_path / "router").mkdir()
    (tmp_path / "index").mkdir()
    assert missing_reader_inputs(cfg) == []
