"""router_report / route_samples: counts, known vs unknown domains, per-source accuracy, markdown."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from medrag_ray.data.schema import Sample
from medrag_ray.eval.calibration import confidence_ece
from medrag_ray.eval.router_eval import (
    has_image,
    route_samples,
    router_markdown,
    router_report,
    unknown_domain_lines,
)

DOMAINS3 = ("ophthalmology", "pathology", "radiology")
COLOUR = {"radiology": (200, 0, 0), "ophthalmology": (0, 200, 0), "pathology": (0, 0, 200), "dermatology": (9, 9, 9)}


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), rgb).save(buf, format="PNG")
    return buf.getvalue()


def sample(i: int, domain: str, source: str, colour: str | None = None) -> Sample:
    return Sample(
        id=f"s{i}", domain=domain, split="test", source=source, answer=domain, answer_type="label",
        image_bytes=png(COLOUR[colour or domain]), image_available=True,
    )  # fmt: skip


class ColourRouter:
    """Routes by the dominant channel (red radiology, green ophthalmology, blue pathology)."""

    domains = DOMAINS3

    def __init__(self) -> None:
        self.batches: list[int] = []

    def predict(self, images: Sequence[Image.Image], batch_size: int = 64) -> list[tuple[str, float]]:
        self.batches.append(len(images))
        out = []
        for im in images:
            r, g, b = im.getpixel((0, 0))
            channel = max(range(3), key=lambda c: (r, g, b)[c])
            out.append((("radiology", "ophthalmology", "pathology")[channel], 0.5 + channel / 10))
        return out


@pytest.fixture()
def samples() -> list[Sample]:
    rows = [sample(i, "radiology", "vqa_rad") for i in range(3)]
    rows += [sample(3, "radiology", "medpix2", colour="pathology")]  # a miss: radiology routed to pathology
    rows += [sample(4 + i, "ophthalmology", "retinamnist") for i in range(2)]
    rows += [sample(6, "pathology", "pathvqa"), sample(7, "pathology", "pathvqa", colour="radiology")]
    rows += [sample(8 + i, "dermatology", "dermamnist") for i in range(2)]  # unknown to the router
    return rows


def test_route_samples_batches_and_predicts(samples: list[Sample]) -> None:
    router = ColourRouter()
    preds = route_samples(router, samples, batch_size=4)
    assert router.batches == [4, 4, 2]
    assert [p for p, _ in preds] == [
        "radiology", "radiology", "radiology", "pathology", "ophthalmology", "ophthalmology", "pathology",
        "radiology", "radiology", "radiology",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="batch_size"):
        route_samples(router, samples, batch_size=0)


def test_router_report_counts_and_accuracies(samples: list[Sample]) -> None:
    preds = route_samples(ColourRouter(), samples)
    res = router_report(samples, preds, DOMAINS3)
    assert res["n_total"] == 10 and res["n_evaluated"] == 8 and res["n_unknown_domain"] == 2
    assert res["accuracy"] == pytest.approx(6 / 8)
    rep = res["report"]
    assert rep["confusion"]["labels"] == list(DOMAINS3)
    # rows truth (oph, path, rad), columns predicted
    assert rep["confusion"]["rows_truth_cols_predicted"] == [[2, 0, 0], [0, 1, 1], [0, 1, 3]]
    assert rep["per_class"]["radiology"]["recall"] == pytest.approx(0.75)
    assert rep["per_class"]["pathology"]["precision"] == pytest.approx(0.5)
    src = res["per_source"]
    assert src["vqa_rad"] == {
        "domains": {"radiology": 3}, "n": 3, "n_known_domain": 3, "correct": 3, "accuracy": 1.0,
        "predicted": {"radiology": 3}, "mean_confidence": pytest.approx(0.5),
    }  # fmt: skip
    assert src["medpix2"]["accuracy"] == 0.0 and src["pathvqa"]["accuracy"] == 0.5
    assert src["dermamnist"]["accuracy"] is None and src["dermamnist"]["n_known_domain"] == 0
    derm = {"n": 2, "predicted": {"radiology": 2}, "sources": {"dermamnist": 2}}
    assert res["unknown_domains"] == {"dermatology": derm}
    assert res["mean_confidence"]["correct"] == pytest.approx((3 * 0.5 + 2 * 0.6 + 0.7) / 6)
    lines = unknown_domain_lines(res)
    assert len(lines) == 1 and "2 examples of domain 'dermatology'" in lines[0]


def test_router_markdown_has_the_tables(samples: list[Sample]) -> None:
    res = router_report(samples, route_samples(ColourRouter(), samples), DOMAINS3)
    md = router_markdown(res, "Router on test")
    assert md.startswith("# Router on test")
    assert "| radiology | 0 | 1 | 3 |" in md
    assert "| pathvqa | pathology | 2 | 0.500 | pathology 1, radiology 1 | 0.600 |" in md
    assert "n/a (unknown domain)" in md and "'dermatology'" in md


def test_only_unknown_domains_and_bad_input(samples: list[Sample]) -> None:
    derm = [s for s in samples if s.domain == "dermatology"]
    res = router_report(derm, [("radiology", 0.9)] * 2, DOMAINS3)
    assert res["report"] is None and res["accuracy"] is None and res["n_evaluated"] == 0
    assert "No example of a domain the router knows." in router_markdown(res, "x")
    with pytest.raises(ValueError, match="one per sample"):
        router_report(samples, [], DOMAINS3)
    assert not has_image(Sample(id="n", domain="radiology", split="test", source="x"))


def test_unknown_routes_are_counted_and_calibration_reported(samples: list[Sample]) -> None:
    preds = route_samples(ColourRouter(), samples)
    preds[0] = ("unknown", 0.3)  # a radiology image the router was unsure of
    preds[8] = ("unknown", 0.4)  # one of the two dermatology images: detected as no domain of the router
    res = router_report(samples, preds, DOMAINS3)
    assert res["routed_unknown"] == {"known_domains": {"n": 8, "routed_unknown": 1, "rate": 0.125},
                                     "unknown_domains": {"n": 2, "routed_unknown": 1, "rate": 0.5}}
    assert res["accuracy"] == pytest.approx(5 / 8) and res["report"]["confusion"]["labels"][-1] == "unknown"
    known = [i for i, s in enumerate(samples) if s.domain in DOMAINS3]
    conf = np.array([preds[i][1] for i in known])
    right = np.array([preds[i][0] == samples[i].domain for i in known])
    assert res["ece"] == pytest.approx(confidence_ece(conf, right), abs=1e-6)
    assert "Routed to 'unknown': 1 of 8 images of the router's domains, 1 of 2 images of other domains" in (
        router_markdown(res, "x"))
