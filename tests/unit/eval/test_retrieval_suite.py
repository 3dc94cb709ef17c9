"""Eval sets, encoder layouts and the retrieval evaluation loop (fake encoder; real MedPix pairs)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from medrag_ray.data.schema import Sample, write_parquet
from medrag_ray.eval.outputs import write_json_and_markdown
from medrag_ray.eval.retrieval_suite import (
    PairSet,
    encoder_dir_for,
    encoder_layout,
    evaluate_retrieval,
    medpix_pair_set,
    retrieval_markdown,
    skip_reason,
    synthetic_pair_sets,
)
from tests.conftest import require


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


class LookupEncoder:
    """One-hot embeddings: image with red value v and text ``"text v"`` share dimension v (perfect retrieval)."""

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.tensor([im.getpixel((0, 0))[0] for im in images])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(pixels.long(), 64).float()

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([int(t.split()[-1]) for t in texts]), 64).float()


def make_encoder_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text("{}")
    return path


def test_encoder_layouts(tmp_path: Path) -> None:
    single = make_encoder_dir(tmp_path / "single")
    per = tmp_path / "per"
    make_encoder_dir(per / "radiology")
    (tmp_path / "empty").mkdir()
    assert encoder_layout(single) == "single" and encoder_dir_for(single, "pathology") == single
    assert encoder_layout(per) == "per_domain" and encoder_dir_for(per, "radiology") == per / "radiology"
    assert encoder_dir_for(per, "pathology") is None
    assert "has per-domain retrievers for ['radiology'] but none for pathology" in skip_reason("x", per, "pathology")
    assert encoder_layout(tmp_path / "nope") == "missing"
    assert "python jobs/train_retriever.py" in skip_reason("trained", tmp_path / "nope", "radiology")
    assert "python jobs/pipeline.py" in skip_reason("untrained", tmp_path / "nope", "radiology")
    assert "encoders.mine" in skip_reason("mine", tmp_path / "nope", "radiology")
    assert encoder_layout(tmp_path / "empty") == "unknown" and "neither" in skip_reason("x", tmp_path / "empty", "x")
    assert skip_reason("x", single, "radiology") == ""


def test_synthetic_pair_sets_take_report_rows_per_domain(tmp_path: Path) -> None:
    rows = []
    for i, domain in enumerate(["radiology", "pathology", "radiology"]):
        common = {"domain": domain, "split": "test", "source": "synthetic", "text": f"report {i}",
                  "image_bytes": png(i), "image_available": True}  # fmt: skip
        rows.append(Sample(id=f"c{i}-report", answer_type="report", **common))
        rows.append(Sample(id=f"c{i}-q0", answer_type="closed", question="q?", answer="yes", **common))
    write_parquet(rows, Sample, tmp_path / "s.parquet")
    sets = synthetic_pair_sets(tmp_path / "s.parquet")
    assert [(s.name, s.domain, s.ids) for s in sets] == [
        ("synthetic", "radiology", ("c0-report", "c2-report")),
        ("synthetic", "pathology", ("c1-report",)),
    ]
    assert sets[0].texts == ("report 0", "report 2") and sets[0].images[1] == png(2)
    with pytest.raises(FileNotFoundError, match="jobs/make_data.py"):
        synthetic_pair_sets(tmp_path / "missing.parquet")


def test_evaluate_retrieval_rows_skips_and_loads_once(tmp_path: Path) -> None:
    single = make_encoder_dir(tmp_path / "single")
    per = tmp_path / "per"
    make_encoder_dir(per / "radiology")
    sets = [
        PairSet("toy", "radiology", ("a", "b", "c"), (png(1), png(2), png(3)), ("text 1", "text 2", "text 3")),
        PairSet("toy", "pathology", ("d", "e"), (png(4), png(5)), ("text 4", "text 5")),
    ]
    loads: list[Path] = []

    def load(directory: Path) -> LookupEncoder:
        loads.append(directory)
        return LookupEncoder()

    encoders = {"one": str(single), "per": str(per), "gone": str(tmp_path / "gone")}
    res = evaluate_retrieval(encoders, sets, load, ks=(1, 2))
    got = [(r["eval_set"], r["domain"], r["encoder"], r["recall"], r["chance"]) for r in res["results"]]
    assert got == [
        ("toy", "radiology", "one", {"1": 1.0, "2": 1.0}, {"1": pytest.approx(1 / 3, abs=1e-6), "2": 0.666667}),
        ("toy", "radiology", "per", {"1": 1.0, "2": 1.0}, {"1": pytest.approx(1 / 3, abs=1e-6), "2": 0.666667}),
        ("toy", "pathology", "one", {"1": 1.0, "2": 1.0}, {"1": 0.5, "2": 1.0}),
    ]
    assert sorted(str(p) for p in loads) == sorted([str(single), str(per / "radiology")])  # each dir loaded once
    skipped = {(s["encoder"], s["domain"]) for s in res["skipped"]}
    assert skipped == {("gone", "radiology"), ("gone", "pathology"), ("per", "pathology")}
    assert res["encoders"]["per"]["layout"] == "per_domain"
    assert res["eval_sets"] == {"toy/radiology": 3, "toy/pathology": 2}
    md = retrieval_markdown(res)
    assert "| toy | radiology | one | 3 | 3 | 1.000 | 1.000 | 0.333 | 0.667 | 1.000 | 1 |" in md
    assert "- gone on toy/pathology:" in md
    path = write_json_and_markdown(tmp_path / "out", "retrieval", res, md)
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))
    assert path.with_suffix(".md").read_text() == md


def test_pair_set_validation() -> None:
    with pytest.raises(ValueError, match="as many"):
        PairSet("x", "radiology", ("a",), (), ("t",))
    with pytest.raises(ValueError, match="domain"):
        PairSet("x", "cardiology", ("a",), (b"",), ("t",))


@pytest.mark.needs_data
def test_medpix_pairs_on_real_data(shared_data: Path) -> None:
    folder = require(shared_data, "medpix2")
    ps = medpix_pair_set(folder)
    lines = (folder / "descriptions_test.jsonl").read_text().splitlines()
    captions = [json.loads(line)["Description"]["Caption"].strip() for line in lines if line.strip()]
    assert ps.domain == "radiology" and len(ps.ids) == len(captions) == 200
    assert sorted(ps.texts) == sorted(captions)
    assert all(Path(p).is_file() for p in ps.images)
    assert len({" ".join(t.split()) for t in ps.texts}) < len(ps.texts)  # shared captions: why the gallery dedupes
