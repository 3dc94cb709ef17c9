"""RAG-PT ablation metrics and the JOMED comparison, by hand and with a scripted reader."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medrag_ray.eval.rag_pt_eval import (
    OVERALL,
    ClosedPredictions,
    ablation_markdown,
    ablation_rows,
    closed_ablation,
    closed_metrics,
    distillation_kl,
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
    md = ablation_markdown(ablation_rows({"reader": pred, "+ retrieval": pred}), "t")
    assert md.count("| reader | 4 | 0.750 | - |") == 1 and "| + retrieval | 4 | 0.750 | +0.000 [+0.000, +0.000] |" in md
    assert "a acc | b acc" in md


KINDS = ("visible", "subtle", "subtle", "visible")
LABELS = ("yes", "no", "yes", "no")


def test_ablation_rows_pair_each_row_with_the_one_above_by_kind() -> None:
    none = ClosedPredictions(("a",) * 4, LABELS, np.array([0.9, 0.2, 0.2, 0.1]), KINDS)  # subtle q3 wrong
    rag = ClosedPredictions(("a",) * 4, LABELS, np.array([0.9, 0.2, 0.8, 0.7]), KINDS)  # q3 right, visible q4 wrong
    oracle = ClosedPredictions(("a",) * 4, LABELS, np.array([0.9, 0.1, 0.9, 0.2]), KINDS)  # all right
    rows = ablation_rows({"none": none, "rag": rag, "oracle": oracle}, compare_to={"oracle": "none"})
    assert [r["name"] for r in rows] == ["none", "rag", "oracle"] and rows[0]["vs_above"] is None
    assert [r["accuracy"] for r in rows] == [0.75, 0.75, 1.0]
    assert rows[1]["by_kind"]["subtle"]["accuracy"] == 1.0 and rows[1]["by_kind"]["visible"]["accuracy"] == 0.5
    rag_vs = rows[1]["vs_above"]
    assert rag_vs["row"] == "none" and rag_vs["difference"] == 0.0
    assert rag_vs["by_kind"]["subtle"]["difference"] == 0.5 and rag_vs["by_kind"]["visible"]["difference"] == -0.5
    assert rows[2]["vs_above"]["row"] == "none" and rows[2]["vs_above"]["difference"] == 0.25
    lo, hi = rows[2]["accuracy_ci"]
    assert lo == hi == 1.0
    md = ablation_markdown(rows, "t")
    assert "+0.250 [+0.000, +0.750] vs none" in md and "| subtle acc | subtle Δ [95% CI] |" in md
    with pytest.raises(ValueError, match="same questions"):
        ablation_rows({"none": none, "other": ClosedPredictions(("a",) * 4, ("no",) * 4, none.p_yes, KINDS)})


def test_closed_ablation_rows_and_diagnostics(scripted) -> None:
    mr, samples, images, *_ = scripted
    adaptive = RetrievalConfig(k=8, k_max=8, adaptive="gap", gamma=0.1)
    out = closed_ablation(ScriptedReader(), [ScriptedReader()], mr, samples, images, adaptive, fixed_k=8, route=False)
    names = [r["name"] for r in out["rows"]]
    assert names == ["reader, no retrieval", "+ retrieval (fixed k=8)", "+ adaptive-k (gap)", "+ RAG-PT stage 1"]
    assert out["rows"][0]["accuracy"] == 0.0 and out["rows"][1]["accuracy"] == 1.0  # 8 of 8 documents hold d1
    assert out["rows"][1]["vs_above"]["difference"] == 1.0 and out["rows"][1]["vs_above"]["ci_low"] == 1.0
    assert [r["name"] for r in out["diagnostics"]] == ["+ retrieval (fixed k=8)", "adaptive-k (ratio, tau=1.5; "
                                                       "reference code)"]
    assert out["retrieval"] == {}  # no ground truth: no oracle row, no phenotype precision
    kept = out["adaptive_k"]["kept"]
    assert sum(kept["gap"].values()) == sum(kept["ratio"].values()) == len(samples)
    curve = out["adaptive_k"]["similarity_curve"]
    assert curve[0] == 1.0 and all(a >= b for a, b in zip(curve, curve[1:], strict=False))


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


def test_jomed_leaves_out_questions_without_candidates(scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    import medrag_ray.eval.rag_pt_eval as rag_pt_eval

    mr, samples, images, *_ = scripted
    original = rag_pt_eval.score_candidates

    def first_routed_nowhere(retriever, engine, samples, images, head, k, route=True):  # noqa: ANN001, ANN202
        return [q for q in original(retriever, engine, samples, images, head, k, route=route) if q.sample_id != "q0"]

    monkeypatch.setattr(rag_pt_eval, "score_candidates", first_routed_nowhere)
    out = jomed_comparison(ScriptedReader(), mr, mr, samples, images, k=3, temperature=0.05, route=False)
    assert out.analysis["n_no_candidate"] == 1 and out.analysis["all"]["n"] == len(samples) - 1
    assert len(out.ft_rag.labels) == len(out.jomed.labels) == len(samples) - 1
    assert "1 questions are left out" in jomed_markdown(out.analysis, "t")
    monkeypatch.setattr(rag_pt_eval, "score_candidates", lambda *a, **k: [])
    with pytest.raises(ValueError, match="none of 24 samples got a candidate"):
        jomed_comparison(ScriptedReader(), mr, mr, samples, images, k=3, temperature=0.05, route=False)


def test_distillation_kl_before_and_after_each_head() -> None:
    metrics = {"runs": {
        "text": {"initial": {"val_kl": 0.084}, "final": {"epoch": 10, "val_kl": 0.093}},
        "image": {"initial": {"val_kl": 0.09}, "final": {"epoch": 10, "val_kl": 0.05}},
        "fusion": {"initial": {"val_accuracy": 0.7}, "final": {"epoch": 10, "val_accuracy": 0.8}},
        "old": {"final": {"val_kl": 0.1}},  # written before the initial validation was recorded
    }}
    kl = distillation_kl(metrics)
    assert kl == {"text": {"before": 0.084, "after": 0.093}, "image": {"before": 0.09, "after": 0.05}}
    analysis = {s: {"n": 1, "oracle_accuracy": 1.0, "methods": {m: {"accuracy": 1.0, "macro_f1": 1.0}
                                                               for m in ("ft_rag", "jomed")}}
                for s in ("all", "consistent", "inconsistent")}
    md = jomed_markdown({**analysis, "inconsistent_share": 0.0, "distillation": kl}, "t")
    assert "text head: validation Sharp Perplexity KL 0.0840 before training, 0.0930 after (+0.0090)" in md
    assert "image head: validation Sharp Perplexity KL 0.0900 before training, 0.0500 after (-0.0400)" in md
