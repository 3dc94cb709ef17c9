"""A tiny shared-data folder in the real layout, with planted duplicates, for the routing-dataset tests.

Layout and what is planted (``FAKE`` describes it for the assertions):

* ``vqa_rad/``: images v0..v5 (PNG files named ``.jpg`` is not needed: they are ``.png``); train questions
  on v0 (twice), v1, v2, v3, v5; test questions on v1 and v4. v5 has the same pixels as v0 (a re-saved
  copy), v1 is in both official splits, v2 has the same pixels as the MedPix image m2.
* ``medpix2/``: three images m0..m2 with captions, MedPix's own test split.
* ``pathvqa/``: five images p0..p4, two questions each (split by the reader's image hash).
* ``medmnist/pneumoniamnist.npz``: 30 train / 6 val / 6 test 28x28 images, ``val[0]`` a copy of ``train[0]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

VQA_TRAIN = {"v0": 2, "v1": 1, "v2": 1, "v3": 1, "v5": 1}
VQA_TEST = {"v1": 1, "v4": 1}
PNEUMONIA_SIZES = {"train": 30, "val": 6, "test": 6}


def _noise(rng: np.random.Generator, size: tuple[int, int] = (36, 30)) -> np.ndarray:
    return rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def _save(pixels: np.ndarray, path: Path, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)


def make_fake_shared(root: Path) -> Path:
    """Write the fake shared-data folder under ``root`` and return it."""
    rng = np.random.default_rng(7)
    pics = {name: _noise(rng) for name in ("v0", "v1", "v2", "v3", "v4", "m0", "m1", "p0", "p1", "p2", "p3", "p4")}
    pics["v5"] = pics["v0"]  # same pixels, saved again under another name (different file bytes: compression)
    pics["m2"] = pics["v2"]  # a VQA-RAD train image that is also a MedPix (test) image

    vqa = root / "vqa_rad"
    for name in ("v0", "v1", "v2", "v3", "v4"):
        _save(pics[name], vqa / "images" / f"{name}.png")
    _save(pics["v5"], vqa / "images" / "v5.png", compress_level=1)
    qid = 0

    def questions(spec: dict[str, int]) -> list[dict[str, object]]:
        nonlocal qid
        rows = []
        for name, n in spec.items():
            for j in range(n):
                qid += 1
                rows.append(
                    {"qid": qid, "image_name": f"{name}.png", "image_organ": "CHEST", "answer": "yes" if j else "no",
                     "answer_type": "CLOSED", "question_type": "PRES", "question": f"is there something {j}?",
                     "phrase_type": "freeform"}
                )  # fmt: skip
        return rows

    (vqa / "trainset.json").write_text(json.dumps(questions(VQA_TRAIN)))
    (vqa / "testset.json").write_text(json.dumps(questions(VQA_TEST)))

    medpix = root / "medpix2"
    lines = []
    for i, name in enumerate(("m0", "m1", "m2")):
        _save(pics[name], medpix / "images" / f"MPX{i}_synpic{i}.png")
        desc = {"Caption": f"Axial CT number {i}.", "Modality": "CT", "Plane": "Axial", "Age": "40", "Sex": "male"}
        lines.append(json.dumps({"Type": "CT", "U_id": f"MPX{i}", "image": f"MPX{i}_synpic{i}", "Description": desc}))
    (medpix / "descriptions_test.jsonl").write_text("\n".join(lines) + "\n")

    path = root / "pathvqa"
    qa = []
    for name in ("p0", "p1", "p2", "p3", "p4"):
        _save(pics[name], path / "images" / f"{name}.jpg", quality=95)
        for j in range(2):
            qa.append(
                {"image": f"images/{name}.jpg", "question": f"what is shown {j}?", "answer": "tissue",
                 "answer_type": "OPEN", "question_type": "WHAT"}
            )  # fmt: skip
    (path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa) + "\n")

    arrays = {}
    for split, n in PNEUMONIA_SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 1), dtype=np.uint8)
    arrays["val_images"][0] = arrays["train_images"][0]
    (root / "medmnist").mkdir(parents=True, exist_ok=True)
    np.savez(root / "medmnist" / "pneumoniamnist.npz", **arrays)
    return root
