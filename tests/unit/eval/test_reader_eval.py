"""Reader evaluation without / with retrieval: hand-computed reports, and the loop with a fake reader and retriever."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medrag_ray.config import ReaderContextConfig
from medrag_ray.data.schema import Sample
from medrag_ray.eval.reader_eval import evaluate_reader, reader_markdown, reader_report
from medrag_ray.mining.miner import png_bytes
from medrag_ray.reader.engine import ClosedScores
from medrag_ray.reader.prompts import ReaderInput
from medrag_ray.retrieval.retriever import Hit, RetrievalConfig, RetrievalResult

PNG = png_bytes(Image.new("RGB", (8, 8), (120, 30, 200)))
RETRIEVED = "Report similar to"


def sample(sid: str, domain: str, answer: str, answer_type: str = "closed", **kw: object) -> Sample:
    fields: dict[str, object] = dict(
        id=sid, domain=domain, split="test", source="stub", question=f"Is there finding {sid}?", answer=answer,
        answer_type=answer_type, image_bytes=PNG, image_available=True,
    )
    fields.update(kw)
    return Sample(**fields)  # type: ignore[arg-type]


# (id, domain, reference as written, no-RAG answer, RAG answer)
TABLE = [
    ("r1", "radiology", "Yes.", "yes", "yes"),  # right both
    ("r2", "radiology", "- No.", "yes", "no"),  # helped
    ("r3", "radiology", "no", "no", "yes"),  # hurt
    ("r4", "radiology", "No", "yes", "yes"),  # wrong both
    ("p1", "pathology", "yes", "no", "yes"),  # helped
    ("p2", "pathology", "Yes", "no", "yes"),  # helped
]


def test_report_values_by_hand() -> None:
    samples = [sample(i, d, y) for i, d, y, _, _ in TABLE]
    report = reader_report(samples, [t[3] for t in TABLE], [t[4] for t in TABLE])
    assert list(report.per_domain) == ["pathology", "radiology"]
    rad, path, overall = report.per_domain["radiology"], report.per_domain["pathology"], report.overall
    assert (rad.n, rad.accuracy_no_rag, rad.accuracy_rag, rad.helped, rad.hurt) == (4, 0.5, 0.5, 1, 1)
    assert (rad.majority_answer, rad.majority_baseline) == ("no", 0.75)
    assert (path.n, path.accuracy_no_rag, path.accuracy_rag, path.helped, path.hurt) == (2, 0.0, 1.0, 2, 0)
    assert (path.majority_answer, path.majority_baseline) == ("yes", 1.0)
    assert (overall.n, overall.helped, overall.hurt) == (6, 3, 1)
    assert overall.accuracy_no_rag == pytest.approx(2 / 6) and overall.accuracy_rag == pytest.approx(4 / 6)
    # 3 yes / 3 no: the tie goes to the alphabetically first answer.
    assert (overall.majority_answer, overall.majority_baseline) == ("no", 0.5)
    for g in (rad, path, overall):  # paired accuracies: the difference is exactly the net flips
        assert g.accuracy_rag - g.accuracy_no_rag == pytest.approx((g.helped - g.hurt) / g.n)
    d = report.to_dict()
    assert d["overall"] == {"n": 6, "accuracy_no_rag": 0.333333, "accuracy_rag": 0.666667, "helped": 3, "hurt": 1,
                            "majority_answer": "no", "majority_baseline": 0.5}
    assert d["per_domain"]["pathology"]["accuracy_rag"] == 1.0
    md = reader_markdown(report, "T")
    assert "| radiology | 4 | 0.500 | 0.500 | 1 | 1 | 0.750 (no) |" in md
    assert "| **overall** | 6 | 0.333 | 0.667 | 3 | 1 | 0.500 (no) |" in md
    assert "Skipped" not in md


def test_report_rejects_bad_input() -> None:
    samples = [sample("a", "radiology", "yes")]
    with pytest.raises(ValueError, match="one answer per sample"):
        reader_report(samples, ["yes"], [])
    with pytest.raises(ValueError, match="no samples"):
        reader_report([], [], [])
    with pytest.raises(ValueError, match="not a closed yes/no"):
        reader_report([sample("b", "radiology", "maybe")], ["yes"], ["yes"])


class FakeRetriever:
    """Keeps one hit per image whose text names the sample (read from its exclude_ids) and one unkept hit."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def retrieve(self, images, questions, domains=None, cfg=None, exclude_ids=None):  # noqa: ANN001, ANN201
        self.calls.append(dict(n=len(images), questions=list(questions), domains=domains, cfg=cfg))
        out = []
        for own in exclude_ids:
            [sid] = own
            hits = [Hit("d1", f"{RETRIEVED} {sid}.", 0.9, True, 0), Hit("d2", "Unkept text.", 0.1, False, 1)]
            out.append(RetrievalResult("radiology", 0.7, hits, k_kept=1))
        return out


class FakeEngine:
    """Says yes when the prompt holds a retrieved report, no otherwise; records every call's prompts."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def score_closed(self, inputs: list[ReaderInput], choices=("yes", "no")) -> ClosedScores:  # noqa: ANN001
        assert tuple(choices) == ("yes", "no")
        prompts = ["\n".join(p for p in inp.parts if isinstance(p, str)) for inp in inputs]
        self.calls.append(prompts)
        return ClosedScores(("yes", "no"), np.array([[0.8, 0.2] if RETRIEVED in p else [0.3, 0.7] for p in prompts]))


def mixed_samples() -> list[Sample]:
    return [
        sample("c1", "radiology", "Yes."),
        sample("c2", "radiology", "No."),
        sample("open1", "radiology", "effusion", answer_type="open"),
        sample("rep1", "pathology", "", answer_type="report", text="A report."),
        sample("maybe1", "pathology", "maybe"),
        sample("broken", "pathology", "yes", image_bytes=b"not an image"),
        sample("c3", "pathology", "yes"),
        sample("c4", "pathology", "- no"),
        sample("noimage", "radiology", "no", image_bytes=None, image_available=False),
    ]


def test_evaluate_reader_with_fakes() -> None:
    retriever, engine = FakeRetriever(), FakeEngine()
    ctx = ReaderContextConfig(retrieval=RetrievalConfig(k=2, adaptive="none"))
    report = evaluate_reader(engine, retriever, mixed_samples(), ctx, route=False, batch_size=2)

    assert report.skipped == {"not_closed": 2, "not_yes_no": 1, "undecodable_image": 2}
    assert report.undecodable_image_ids == ("broken", "noimage")
    # Eligible c1, c2, broken, c3, c4, noimage in chunks of 2: retrieval per chunk on the decodable ones only.
    assert [c["n"] for c in retriever.calls] == [2, 1, 1]
    assert retriever.calls[0]["domains"] == ["radiology", "radiology"] and retriever.calls[0]["cfg"] is ctx.retrieval
    assert retriever.calls[1]["questions"] == ["Is there finding c3?"]
    # Two reader calls per chunk: no-RAG first (no retrieved text), then RAG (each sample's own retrieved text).
    assert len(engine.calls) == 6
    no_rag, rag = engine.calls[0::2], engine.calls[1::2]
    assert all(RETRIEVED not in p and "Unkept" not in p for call in no_rag for p in call)
    for call in rag:
        for p in call:
            sid = p.split("Is there finding ", 1)[1].split("?", 1)[0]
            assert f"{RETRIEVED} {sid}." in p and "Unkept" not in p
    # The engine says no without retrieval and yes with it: c1, c3 (yes) helped; c2, c4 (no) hurt.
    assert (report.overall.n, report.overall.helped, report.overall.hurt) == (4, 2, 2)
    assert report.overall.accuracy_no_rag == 0.5 and report.overall.accuracy_rag == 0.5
    for domain in ("radiology", "pathology"):
        g = report.per_domain[domain]
        assert (g.n, g.helped, g.hurt, g.majority_baseline) == (2, 1, 1, 0.5)
    assert report.to_dict()["undecodable_image_ids"] == ["broken", "noimage"]
    assert "Skipped: not_closed 2, not_yes_no 1, undecodable_image 2." in reader_markdown(report, "T")


def test_evaluate_reader_routes_by_default_and_fails_without_eligible_samples() -> None:
    retriever = FakeRetriever()
    evaluate_reader(FakeEngine(), retriever, [sample("c1", "radiology", "yes")], ReaderContextConfig())
    assert retriever.calls[0]["domains"] is None  # route=True: the router picks the domain
    with pytest.raises(ValueError, match="no closed yes/no sample"):
        evaluate_reader(FakeEngine(), FakeRetriever(), [sample("m", "radiology", "maybe")], ReaderContextConfig())
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_reader(FakeEngine(), FakeRetriever(), [], ReaderContextConfig(), batch_size=0)
