"""The one-process answerer over a tiny artifacts directory: every number is re-derived by hand from the models."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medrag_ray.config import ServeConfig
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.reader.prompts import closed_prompt, closed_rag_prompt, jomed_input, report_prompt, single_image_input
from medrag_ray.retrieval.embed import read_docs_table
from medrag_ray.retrieval.retrieval_config import RetrievalConfig
from medrag_ray.serving.answer import LocalAnswerer
from medrag_ray.serving.images import InputError


@pytest.fixture(scope="module")
def root(tiny_artifacts: Path) -> Path:
    return tiny_artifacts


@pytest.fixture(scope="module")
def answerer(root: Path) -> LocalAnswerer:
    return LocalAnswerer(ServeConfig(artifacts_dir=str(root), jomed_temperature=0.5))


@pytest.fixture(scope="module")
def closed(root: Path) -> list[Sample]:
    rows = read_parquet(root / "data" / "synthetic" / "samples_val.parquet", Sample)
    return [s for s in rows if s.answer_type == "closed"][:4]


def image_of(sample: Sample) -> Image.Image:
    return load_image(sample.image_bytes, name=sample.id)


def probs(answerer: LocalAnswerer, inputs: list[Any]) -> np.ndarray:
    return answerer.engine.score_closed(inputs).probs


def test_closed_concat_answer_is_the_readers_own_scores(answerer: LocalAnswerer, closed: list[Sample],
                                                        root: Path) -> None:
    s = closed[0]
    [out] = answerer.answer([(s.image_bytes, {"question": s.question})])
    image = image_of(s)
    [(domain, confidence)] = answerer.evidence.retriever.route([image])
    assert out["domain"] == domain and out["domain_confidence"] == pytest.approx(confidence, abs=1e-6)
    [result] = answerer.evidence.retriever.retrieve([image], [s.question], domains=[domain],
                                                    cfg=answerer.cfg.retrieval)
    assert [e["id"] for e in out["evidence"]] == [h.doc_id for h in result.hits]
    assert [e["kept"] for e in out["evidence"]] == [h.kept for h in result.hits]
    assert out["k_kept"] == result.k_kept >= 1
    indexed = set(read_docs_table(root / "index", domain).column("id").to_pylist())
    assert {e["id"] for e in out["evidence"]} <= indexed
    kept = [h.text for h in result.kept_hits]
    expected = probs(answerer, [single_image_input(image, closed_rag_prompt(s.question, kept, domain))])[0]
    assert [out["probabilities"]["yes"], out["probabilities"]["no"]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert out["answer"] == ("yes" if expected[0] > expected[1] else "no")
    singles = probs(answerer, [single_image_input(image, closed_rag_prompt(s.question, [t], domain)) for t in kept])
    answers = ["yes" if p[0] > p[1] else "no" for p in singles]
    assert out["consistency"] == {"consistent": len(set(answers)) == 1, "candidate_answers": answers}
    assert out["fusion"] == "concat" and out["retriever"] == "fine-tuned" and out["task"] == "closed"


def test_jomed_fusion_is_the_weighted_sum_of_candidate_scores(answerer: LocalAnswerer, closed: list[Sample]) -> None:
    s = closed[1]
    [out] = answerer.answer([(s.image_bytes, {"question": s.question, "fusion": "jomed", "k": 3,
                                              "domain": s.domain})])
    assert out["domain"] == s.domain and out["domain_confidence"] is None and out["k_kept"] == 3
    scores = np.array([e["score"] for e in out["evidence"]])
    weights = np.exp((scores - scores.max()) / 0.5)
    weights /= weights.sum()
    assert [e["weight"] for e in out["evidence"]] == pytest.approx(weights.tolist(), abs=1e-5)
    res = answerer.evidence.retriever.resources(s.domain)
    image = image_of(s)
    inputs = [jomed_input(image, closed_prompt(s.question), [(load_image(res.docs[e["id"]].image_bytes, name="d"),
                                                              e["text"])]) for e in out["evidence"]]
    per_candidate = probs(answerer, inputs)
    fused = (per_candidate * weights[:, None]).sum(axis=0)
    assert [out["probabilities"]["yes"], out["probabilities"]["no"]] == pytest.approx(fused.tolist(), abs=1e-5)
    assert out["consistency"]["candidate_answers"] == ["yes" if p[0] > p[1] else "no" for p in per_candidate]


def test_a_batch_answers_as_each_request_alone_and_keeps_errors_in_their_slots(
    answerer: LocalAnswerer, closed: list[Sample]
) -> None:
    items = [(s.image_bytes, {"question": s.question}) for s in closed[:3]]
    alone = [answerer.answer([item])[0] for item in items]
    together = answerer.answer([items[0], (b"not an image", {"question": "q"}), items[1],
                                (closed[0].image_bytes, {"question": ""}), items[2]])
    assert isinstance(together[1], InputError) and together[1].status == 415
    assert isinstance(together[3], InputError) and (together[3].status, together[3].field) == (422, "question")
    for a, b in zip(alone, [together[0], together[2], together[4]], strict=True):
        assert a["answer"] == b["answer"] and [e["id"] for e in a["evidence"]] == [e["id"] for e in b["evidence"]]
        assert a["probabilities"]["yes"] == pytest.approx(b["probabilities"]["yes"], abs=1e-5)


def test_report_and_fixed_k(answerer: LocalAnswerer, closed: list[Sample]) -> None:
    s = closed[2]
    [out] = answerer.answer([(s.image_bytes, {"task": "report", "max_new_tokens": 5, "domain": s.domain})])
    kept = [e["text"] for e in out["evidence"] if e["kept"]]
    [expected] = answerer.engine.generate([single_image_input(image_of(s), report_prompt(kept))], max_new_tokens=5)
    assert out["answer"] == expected and out["probabilities"] is None and out["consistency"] is None
    [fixed] = answerer.answer([(s.image_bytes, {"question": s.question, "k": 2, "adaptive": "none"})])
    assert fixed["k_kept"] == 2 and [e["kept"] for e in fixed["evidence"]] == [True, True]


def test_a_prompt_longer_than_the_reader_is_refused_naming_k(answerer: LocalAnswerer, closed: list[Sample],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = answerer.engine.model.config.text_config
    monkeypatch.setattr(config, "max_position_embeddings", 60)
    s = closed[0]
    [err] = answerer.answer([(s.image_bytes, {"question": s.question, "k": 3, "adaptive": "none"})])
    assert isinstance(err, InputError) and (err.status, err.field) == (422, "k") and "60 positions" in err.message


def test_ifa_without_critical_layers_is_a_clear_422(answerer: LocalAnswerer, closed: list[Sample]) -> None:
    assert answerer.ifa is None  # the tiny artifacts have no eval/critical_layers.json
    [err] = answerer.answer([(closed[0].image_bytes, {"question": closed[0].question, "ifa": True})])
    assert isinstance(err, InputError) and err.field == "ifa" and "find_ifa_layers" in err.message


def test_jpeg_of_the_same_image_is_answered(answerer: LocalAnswerer, closed: list[Sample]) -> None:
    buf = io.BytesIO()
    image_of(closed[0]).save(buf, format="JPEG", quality=95)
    [out] = answerer.answer([(buf.getvalue(), {"question": closed[0].question})])
    assert out["answer"] in ("yes", "no") and sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_retrieval_override_is_what_the_server_config_says(root: Path) -> None:
    cfg = ServeConfig(artifacts_dir=str(root), retrieval=RetrievalConfig(k=3, adaptive="none"), consistency=False)
    answerer = LocalAnswerer(cfg)
    s = next(s for s in read_parquet(root / "data" / "synthetic" / "samples_val.parquet", Sample)
             if s.answer_type == "closed")
    [out] = answerer.answer([(s.image_bytes, {"question": s.question})])
    assert not isinstance(out, InputError), out
    assert out["k_kept"] == 3 and out["consistency"] is None


def test_jomed_fusion_uses_the_distilled_heads_when_they_exist(root: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    from medrag_ray.models.dual_encoder import load_dual_encoder
    from medrag_ray.retrieval.retriever import DualHeadRetriever, MultimodalRetriever, save_retriever

    s = next(x for x in read_parquet(root / "data" / "synthetic" / "samples_val.parquet", Sample)
             if x.domain == "radiology" and x.answer_type == "closed")
    art = tmp_path / "art"
    shutil.copytree(root, art, symlinks=True)
    torch.manual_seed(3)
    heads = DualHeadRetriever(load_dual_encoder(root / "models" / "init" / "encoder"))
    with torch.no_grad():
        heads.text_head.weight.add_(0.5 * torch.randn_like(heads.text_head.weight))
    save_retriever(heads, art / "models" / "retriever_jomed" / "radiology")
    answerer = LocalAnswerer(ServeConfig(artifacts_dir=str(art)))
    [out] = answerer.answer([(s.image_bytes, {"question": s.question, "fusion": "jomed", "domain": "radiology"})])
    assert out["retriever"] == "jomed"
    distilled = MultimodalRetriever.from_artifacts(
        None, art / "index", retriever_dirs={"radiology": art / "models" / "retriever_jomed" / "radiology"},
        domains=["radiology"])
    [result] = distilled.retrieve([image_of(s)], domains=["radiology"], cfg=RetrievalConfig(k=4, adaptive="none"))
    assert [e["id"] for e in out["evidence"]] == [h.doc_id for h in result.hits]
    assert [e["score"] for e in out["evidence"]] == pytest.approx([h.score for h in result.hits], abs=1e-5)
    [plain] = answerer.answer([(s.image_bytes, {"question": s.question, "domain": "radiology"})])
    assert plain["retriever"] == "fine-tuned"


def test_ifa_answers_are_the_engines_ifa_scores(root: Path, closed: list[Sample], tmp_path: Path) -> None:
    import json

    from medrag_ray.reader.ifa import IFASettings, IFASpec

    layers_file = tmp_path / "critical_layers.json"
    layers_file.write_text(json.dumps({"layers": [0]}))
    answerer = LocalAnswerer(ServeConfig(artifacts_dir=str(root), ifa_layers_path=str(layers_file), ifa_strength=4.0))
    assert answerer.ifa == IFASettings(layers=(0,), strength=4.0)
    s = closed[0]
    [out] = answerer.answer([(s.image_bytes, {"question": s.question, "ifa": "true", "k": 2, "adaptive": "none"})])
    assert out["ifa"] is True and out["k_kept"] == 2
    texts = [e["text"] for e in out["evidence"]]
    scores = [e["score"] for e in out["evidence"]]
    inp = single_image_input(image_of(s), closed_rag_prompt(s.question, texts, out["domain"]))
    expected = answerer.engine.score_closed([inp], ifa=answerer.ifa,
                                            ifa_specs=[IFASpec(s.question, tuple(texts), tuple(scores))]).probs[0]
    assert out["probabilities"]["yes"] == pytest.approx(float(expected[0]), abs=1e-5)
    with pytest.raises(ValueError, match="exceed the reader's 2 decoder layers"):
        LocalAnswerer(ServeConfig(artifacts_dir=str(root), ifa_layers=(5,)))


def test_jomed_over_documents_without_images_is_a_422_not_a_crash() -> None:
    from medrag_ray.serving.answer import Evidence, Retrieved, plan_read
    from medrag_ray.serving.query import AnswerQuery

    evidence = (Evidence("d1", "No effusion.", 0.9, 0, True, 0.6), Evidence("d2", "Effusion.", 0.8, 1, True, 0.4))
    retrieved = Retrieved("radiology", 0.9, evidence, images=(None, None))
    with pytest.raises(InputError) as info:
        plan_read(AnswerQuery(question="Is there an effusion?", fusion="jomed"), Image.new("RGB", (8, 8)),
                  retrieved, style="mmed")
    assert (info.value.status, info.value.field) == (422, "fusion")
    plan = plan_read(AnswerQuery(question="Is there an effusion?"), Image.new("RGB", (8, 8)), retrieved, "mmed")
    assert len(plan.inputs) == 3 and plan.n_candidates == 2  # concat + each kept report alone
    assert "1. No effusion. 2. Effusion." in plan.inputs[0].parts[1]


def test_an_image_of_no_indexed_domain_is_answered_without_retrieval(answerer: LocalAnswerer,
                                                                     closed: list[Sample]) -> None:
    router = answerer.evidence.retriever.router
    assert router is not None
    s = closed[2]
    saved = (router.temperature, router.unknown_threshold)
    router.set_calibration(saved[0], 0.999999)  # nothing is that sure: every image is of an unknown domain
    try:
        concat, jomed = answerer.answer([(s.image_bytes, {"question": s.question}),
                                         (s.image_bytes, {"question": s.question, "fusion": "jomed"})])
    finally:
        router.set_calibration(*saved)
    [(_, confidence)] = answerer.evidence.retriever.route([image_of(s)])
    expected = probs(answerer, [single_image_input(image_of(s), closed_prompt(s.question))])[0]
    for out in (concat, jomed):
        assert out["domain"] == "unknown" and out["domain_confidence"] == pytest.approx(confidence, abs=1e-6)
        assert out["evidence"] == [] and out["k_kept"] == 0 and out["retriever"] == "none"
        assert [out["probabilities"]["yes"], out["probabilities"]["no"]] == pytest.approx(expected.tolist(), abs=1e-5)
