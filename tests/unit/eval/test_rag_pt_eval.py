"""RAG-PT ablation metrics and the JOMED comparison, by hand and with a scripted reader."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medrag_ray.eval.rag_pt_eval import (
    OVERALL,
    ClosedPredictions,
    ablation_markdown,
    closed_metrics,
    grouped_metrics,
    jomed_comparison,
    jomed_markdown,
    predict_closed,
)
from medrag_ray.retrieval.distill import score_candidates
from medrag_ray.retrieval.retrieval_config import RetrievalConfig
from tests.unit.retrieval.scripted import HELPFUL, ScriptedReader, scripted_index


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory):
    return scripted_index(tmp_path_factory.mktemp("eval") / "radiology")


def test_closed_metrics_by_hand() -> None:
    m = closed_metrics(["yes", "yes", "no", "no"], np.array([0.9, 0.4, 0.2, 0.6]))
    assert m["accuracy"] == 0.5 and m["macro_f1"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs are ordered right
    assert math.isnan(closed_metrics(["yes", "yes"], np.array([0.9, 0.1]))["auroc"])


def test_grouped_metrics_and_markdown() -> None:
    pred = ClosedPredictions(("a", "b", "a", "b"), ("yes", "no", "no", "yes"), np.array([0.8, 0.3, 0.6, 0.7]))
    g = grouped_metrics(pred)
    assert g[OVERALL]["accuracy"] == 0.75 and g["a"]["accuracy"] == 0.5 and g["b"]["accuracy"] == 1.0
    md = ablation_markdown({"reader": g, "+ retrieval": g}, "t")
    assert md.count("| reader | 4 | 0.750 |") == 1 and "| + retrieval |" in md and "a acc | b acc" in md


def test_predict_closed_with_and_without_retrieval(scripted) -> None:
    mr, samples, images, *_ = scripted
    reader = ScriptedReader()
    none = predict_closed(reader, mr, samples, images, None, route=False)
    assert np.allclose(none.p_yes, 0.3) and set(none.labels) == {"yes"}
    rag = predict_closed(reader, mr, samples, images, RetrievalConfig(k=8, k_max=8, adaptive="none"), route=False)
    assert np.allclose(rag.p_yes, 0.9)  # every query's 8 documents include a helpful one
    assert all("Reference" not in " ".join(p for p in i.parts if isinstance(p, str)) for i in reader.inputs[0])


def test_jomed_fusion_oracle_and_consistency(scripted) -> None:
    mr, samples, images, *_ = scripted
    tau, k = 0.05, 3
    out = jomed_comparison(ScriptedReader(), mr, mr, samples, images, k=k, temperature=tau, route=False)
    scored = score_candidates(mr, ScriptedReader(), samples, images, "text", k, route=False)
    for i, q in enumerate(scored):
        w = np.exp((np.array(q.scores) - max(q.scores)) / tau)
        w /= w.sum()
        assert out.jomed.p_yes[i] == pytest.approx(float(w @ np.array(q.class_probs)[:, 0]), rel=1e-6)
        assert out.candidate_answers[i] == ["yes" if d in HELPFUL else "no" for d in q.doc_ids]
    has_helpful = [bool(HELPFUL & set(q.doc_ids)) for q in scored]
    a = out.analysis
    assert a["all"]["oracle_accuracy"] == pytest.approx(np.mean(has_helpful))
    mixed = [len(set(c)) > 1 for c in out.candidate_answers]
    assert a["inconsistent"]["n"] == sum(mixed) and a["consistent"]["n"] == len(samples) - sum(mixed)
    assert a["all"]["methods"]["ft_rag"]["accuracy"] == pytest.approx(np.mean(has_helpful))  # any helpful -> 0.9
    assert "| inconsistent |" in jomed_markdown(a, "t")
