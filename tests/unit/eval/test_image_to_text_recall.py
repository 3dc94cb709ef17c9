"""image_to_text_recall: in-gallery image->text recall with a fake encoder whose rankings are known."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from medrag_ray.eval.retrieval import (
    dedupe_texts,
    gallery_text_key,
    image_to_text_recall,
    positive_ranks,
    retrieval_metrics,
)


class AngleEncoder:
    """2-D unit embeddings: an image's angle (degrees) is its red value, a text's angle is looked up.

    Cosine similarity then falls with the angular distance, so every ranking can be worked out by hand.
    """

    def __init__(self, text_angles: dict[str, float]) -> None:
        self.text_angles = text_angles
        self.preprocessed = 0

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        self.preprocessed += len(images)
        return torch.tensor([[float(im.convert("RGB").getpixel((0, 0))[0])] for im in images])

    @staticmethod
    def _unit(deg: torch.Tensor) -> torch.Tensor:
        rad = torch.deg2rad(deg)
        return torch.stack([torch.cos(rad), torch.sin(rad)], dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._unit(pixels[:, 0]) * 3.0  # not normalized on purpose: the metric normalizes

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self._unit(torch.tensor([self.text_angles[t] for t in texts]))


def image_at(angle: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (angle, 0, 0))


def test_gallery_text_key_and_dedupe() -> None:
    assert gallery_text_key("  No  effusion.\n") == "No effusion."
    gallery, positive = dedupe_texts(["a b", "c", "a  b ", "A b", "c"])
    assert gallery == ["a b", "c", "A b"] and positive == [0, 1, 0, 2, 1]
    with pytest.raises(ValueError, match="empty"):
        dedupe_texts(["a", "  "])


def test_hand_computed_ranks_recall_and_chance() -> None:
    # texts at 0, 20, ..., 180 degrees. An image on its text ranks it 1st; 12 deg past it, the next text
    # (8 away) beats its own (12 away): 2nd; 25 deg past it, the next two (5 and 15 away) beat it: 3rd.
    texts = [f"t{j}" for j in range(10)]
    enc = AngleEncoder({t: 20.0 * j for j, t in enumerate(texts)})
    want = [1, 2, 3, 1, 2, 3, 1, 2, 1, 1]
    offset = {1: 0, 2: 12, 3: 25}
    images = [image_at(20 * j + offset[r]) for j, r in enumerate(want)]
    ids = [f"img{j}" for j in range(10)]
    res = image_to_text_recall(enc, images, texts, ids, ks=(1, 2, 3, 5), batch_size=3, return_ranks=True)
    assert res["ranks"] == dict(zip(ids, want, strict=True))
    assert res["recall"] == {"1": 0.5, "2": 0.8, "3": 1.0, "5": 1.0}
    assert res["chance"] == {"1": 0.1, "2": 0.2, "3": 0.3, "5": 0.5}
    assert res["n_queries"] == 10 and res["n_gallery"] == 10 and res["n_duplicate_texts"] == 0
    assert res["mrr"] == pytest.approx((5 + 3 / 2 + 2 / 3) / 10, abs=1e-6)
    assert res["median_rank"] == 1.5
    assert enc.preprocessed == 10  # every image embedded once, in batches of 3


def test_duplicate_texts_are_one_gallery_entry_not_a_miss() -> None:
    # images 0 and 1 both have the text "same" (once with extra spaces); both sit exactly on it
    enc = AngleEncoder({"same": 0.0, "other": 90.0, "third": 180.0})
    texts = ["same", " same ", "other", "third"]
    res = image_to_text_recall(enc, [image_at(0), image_at(0), image_at(90), image_at(180)], texts,
                               ["a", "b", "c", "d"], ks=(1, 3), return_ranks=True)  # fmt: skip
    assert res["n_gallery"] == 3 and res["n_duplicate_texts"] == 1
    assert res["recall"] == {"1": 1.0, "3": 1.0}
    assert res["chance"] == {"1": pytest.approx(1 / 3, abs=1e-6), "3": 1.0}
    assert res["ranks"] == {"a": 1, "b": 1, "c": 1, "d": 1}


def test_ties_rank_the_positive_last() -> None:
    # two different texts with the same embedding: an exact tie for both images
    enc = AngleEncoder({"left": 30.0, "right": 30.0})
    res = image_to_text_recall(enc, [image_at(30), image_at(40)], ["left", "right"], ["x", "y"], ks=(1, 2),
                               return_ranks=True)  # fmt: skip
    assert res["ranks"] == {"x": 2, "y": 2}
    assert res["recall"] == {"1": 0.0, "2": 1.0}


def test_bytes_and_pil_inputs_agree() -> None:
    enc = AngleEncoder({"a": 0.0, "b": 60.0, "c": 120.0})
    pil = [image_at(10), image_at(70), image_at(100)]
    encoded = []
    for im in pil:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    ids = ["1", "2", "3"]
    texts = ["a", "b", "c"]
    assert image_to_text_recall(enc, pil, texts, ids) == image_to_text_recall(enc, encoded, texts, ids)


def test_retrieval_metrics_agrees_with_ranks_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 25)).round(1)  # rounding makes ties common
    positive = rng.integers(0, 25, size=40).tolist()
    ids = [str(i) for i in range(40)]
    res = retrieval_metrics(scores, positive, ids, ks=(1, 3, 10, 25))
    ranks = positive_ranks(scores, positive)
    for k in (1, 3, 10, 25):
        assert res["recall"][str(k)] == pytest.approx(float(np.mean(ranks <= k)), abs=1e-6)
    assert res["recall"]["25"] == 1.0
    assert res["mrr"] == pytest.approx(float(np.mean(1 / ranks)), abs=1e-6)
    assert res["median_rank"] == float(np.median(ranks))
    assert math.isclose(res["chance"]["3"], 3 / 25, abs_tol=1e-6)


def test_errors_name_the_problem() -> None:
    enc = AngleEncoder({"a": 0.0})
    with pytest.raises(ValueError, match="one of each per pair"):
        image_to_text_recall(enc, [image_at(0)], ["a", "a"], ["x"])
    with pytest.raises(ValueError, match="no pairs"):
        image_to_text_recall(enc, [], [], [])
    with pytest.raises(ValueError, match="unique"):
        image_to_text_recall(enc, [image_at(0), image_at(0)], ["a", "a"], ["x", "x"])
    with pytest.raises(ValueError, match="batch_size"):
        image_to_text_recall(enc, [image_at(0)], ["a"], ["x"], batch_size=0)
