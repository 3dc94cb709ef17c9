"""Diagnostics rows by hand: phenotype precision, majority of reports, oracle context, kept counts, Fig. 2's curve."""

from __future__ import annotations

import json

import pytest

from medrag_ray.config import SyntheticDataConfig
from medrag_ray.data.schema import CorpusDoc, Sample
from medrag_ray.data.synthetic import generate, manifest
from medrag_ray.eval.diagnostics import (
    CaseTruth,
    finding_kinds,
    kept_distribution,
    load_case_truths,
    oracle_contexts,
    report_majority,
    retrieval_quality,
    similarity_curve,
)
from medrag_ray.reader.context import SampleContext
from medrag_ray.retrieval.retriever import Hit, RetrievalResult

NODULE = "There is a subtle pulmonary nodule."
NO_NODULE = "No pulmonary nodule."
TRUTHS = {
    "q": CaseTruth("radiology", 1, {"nodule": True, "cardiomegaly": False}),
    "a": CaseTruth("radiology", 1, {"nodule": True}),
    "b": CaseTruth("radiology", 1, {"nodule": True}),
    "c": CaseTruth("radiology", 2, {"nodule": False}),
    "d": CaseTruth("radiology", 2, {"nodule": False}),
}


def sample(finding: str, kind: str, case_id: str = "q") -> Sample:
    meta = {"case_id": case_id, "finding": finding, "finding_kind": kind}
    return Sample(id=f"{case_id}-{finding}", domain="radiology", split="test", source="synthetic", question="?",
                  answer="yes", answer_type="closed", meta=json.dumps(meta))


def result(*docs: tuple[str, str, float], kept: int | None = None) -> RetrievalResult:
    hits = [Hit(d, t, s, kept is None or i < kept, i) for i, (d, t, s) in enumerate(docs)]
    return RetrievalResult("radiology", 0.9, hits, sum(h.kept for h in hits))


def test_report_majority_reads_negations_and_ties() -> None:
    assert report_majority([NODULE, NODULE, NO_NODULE], "radiology", "nodule") is True
    assert report_majority([NODULE, NO_NODULE, NO_NODULE], "radiology", "nodule") is False
    assert report_majority([NODULE, NO_NODULE], "radiology", "nodule") is None
    assert report_majority(["Frontal radiograph of the chest."], "radiology", "nodule") is None


def test_retrieval_quality_by_hand() -> None:
    samples = [sample("nodule", "subtle"), sample("cardiomegaly", "visible")]
    results = [
        result(("a", NODULE, 0.9), ("c", NO_NODULE, 0.8), ("b", NODULE, 0.7)),  # 2 of 3 same phenotype; majority yes
        result(("c", NO_NODULE, 0.9), ("d", NO_NODULE, 0.8), ("a", NODULE, 0.7), kept=2),  # 0 of 2 kept
    ]
    q = retrieval_quality(samples, results, TRUTHS)
    assert list(q) == ["radiology", "overall"]
    o = q["overall"]
    assert o["n"] == 2 and o["phenotype_precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert o["mean_kept"] == 2.5 and o["n_subtle"] == 1 and o["majority_accuracy_subtle"] == 1.0
    wrong = [result(("c", NO_NODULE, 0.9), ("d", NO_NODULE, 0.8), ("b", NODULE, 0.7))] * 2
    assert retrieval_quality(samples, wrong, TRUTHS)["overall"]["majority_accuracy_subtle"] == 0.0


def test_oracle_context_is_the_phenotype_never_the_own_case() -> None:
    corpus = [CorpusDoc(id=i, domain="radiology", split="train", source="synthetic", text=f"report {i}")
              for i in "qabcd"]
    [ctx] = oracle_contexts([sample("nodule", "subtle")], corpus, TRUTHS, k=3)
    assert sorted(ctx.doc_ids) == ["a", "b"]  # only two other cases of phenotype 1
    assert oracle_contexts([sample("nodule", "subtle")], corpus, TRUTHS, k=3) == [ctx]  # seeded
    with pytest.raises(ValueError, match="not in the manifest"):
        oracle_contexts([sample("nodule", "subtle", case_id="zz")], corpus, TRUTHS, k=3)


def test_kept_distribution_and_similarity_curve() -> None:
    ctx = [SampleContext("radiology", None, texts=t) for t in (("x",), ("x", "y"), ("x",), ())]
    assert kept_distribution(ctx) == {0: 1, 1: 2, 2: 1}
    curve = similarity_curve([result(("a", "", 0.8), ("b", "", 0.4)), result(("a", "", 0.5), ("b", "", 0.5))])
    assert curve == pytest.approx([1.0, 0.75])
    assert similarity_curve([]) == []


def test_truths_and_kinds_from_a_generated_manifest(tmp_path) -> None:  # noqa: ANN001
    ds = generate(SyntheticDataConfig(domains=("radiology",), n_per_domain=18, n_phenotypes=3))
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest(ds, {})))
    truths = load_case_truths(path)
    closed = [s for s in ds.samples["test"] if s.answer_type == "closed"]
    kinds = finding_kinds(closed)
    assert set(kinds) == {"visible", "subtle"} and len(truths) == 18
    for s in closed:
        m = json.loads(s.meta)
        assert truths[m["case_id"]].findings[m["finding"]] == (s.answer == "yes")
    assert finding_kinds([Sample(id="r", domain="radiology", split="test", source="vqa_rad", question="?",
                                 answer="yes", answer_type="closed")]) == (None,)
