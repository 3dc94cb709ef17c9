"""jobs/eval_retrieval.py end to end on tiny synthetic data with the untrained init encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.eval_retrieval import main, parse_args
from medrag_ray.config import ConfigError, EvalRetrievalConfig
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.models.dual_encoder import DualEncoder, load_dual_encoder
from tests.conftest import require
from tests.unit.jobs.eval_fixtures import init_model_dir, tiny_synthetic

DOMAINS3 = ("radiology", "ophthalmology", "pathology")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model_dir("encoder", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def test_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("syn"), DOMAINS3) / "samples_test.parquet"


def own_text_top1(enc: DualEncoder, rows: list[Sample]) -> float:
    """R@1 computed independently: argmax cosine over the distinct texts is the image's own text."""
    gallery = sorted({" ".join(s.text.split()) for s in rows})
    with torch.no_grad():
        img = enc.encode_image(enc.preprocess([load_image(s.image_bytes) for s in rows])).numpy()
        txt = enc.encode_text(gallery).numpy()
    best = (img @ txt.T).argmax(axis=1)
    return float(np.mean([gallery[b] == " ".join(s.text.split()) for b, s in zip(best, rows, strict=True)]))


def test_defaults_and_overrides() -> None:
    assert parse_args([]) == EvalRetrievalConfig()
    assert set(EvalRetrievalConfig().encoders) == {"trained", "untrained", "domain_agnostic"}
    cfg = parse_args(["encoders={untrained: some/dir}", "ks=[1,3]", "eval_sets=[synthetic]"])
    assert cfg.encoders == {"untrained": "some/dir"} and cfg.ks == (1, 3) and cfg.eval_sets == ("synthetic",)
    with pytest.raises(ConfigError, match="ks"):
        parse_args(["ks=[0,5]"])
    with pytest.raises(ConfigError, match="eval_sets"):
        parse_args(["eval_sets=[iuxray]"])
    with pytest.raises(ConfigError, match="encoders"):
        parse_args(["encoders={}"])


@pytest.mark.slow
def test_main_evaluates_single_and_per_domain_encoders(encoder_dir: Path, test_parquet: Path, tmp_path: Path) -> None:
    per_domain = tmp_path / "retriever"
    per_domain.mkdir()
    (per_domain / "radiology").symlink_to(encoder_dir.resolve(), target_is_directory=True)
    out = tmp_path / "eval"
    cfg = parse_args([
        f"encoders={{untrained: {encoder_dir}, trained: {per_domain}, domain_agnostic: {tmp_path / 'absent'}}}",
        "eval_sets=[synthetic]", f"synthetic_path={test_parquet}", "ks=[1,5,100]", "device=cpu",
        f"out_dir={out}",
    ])  # fmt: skip
    result = main(cfg)

    reports = [s for s in read_parquet(test_parquet, Sample) if s.answer_type == "report"]
    enc = load_dual_encoder(encoder_dir)
    rows = {(r["domain"], r["encoder"]): r for r in result["results"]}
    assert set(rows) == {(d, "untrained") for d in DOMAINS3} | {("radiology", "trained")}
    for domain in DOMAINS3:
        mine = [s for s in reports if s.domain == domain]
        row = rows[(domain, "untrained")]
        assert row["eval_set"] == "synthetic" and row["n_queries"] == len(mine)
        assert row["n_gallery"] == len({" ".join(s.text.split()) for s in mine})
        assert row["recall"]["100"] == 1.0 and row["chance"]["100"] == 1.0  # k >= gallery size
        assert row["chance"]["1"] == pytest.approx(1 / row["n_gallery"], abs=1e-6)
        assert row["recall"]["1"] == pytest.approx(own_text_top1(enc, mine), abs=1e-6)
    same = {k: v for k, v in rows[("radiology", "trained")].items() if k not in ("encoder", "encoder_dir")}
    assert same == {k: v for k, v in rows[("radiology", "untrained")].items() if k not in ("encoder", "encoder_dir")}
    skipped = {(s["encoder"], s["domain"]) for s in result["skipped"]}
    expected = {("domain_agnostic", d) for d in DOMAINS3} | {("trained", "ophthalmology"), ("trained", "pathology")}
    assert skipped == expected
    assert any("domain_agnostic=true" in s["reason"] for s in result["skipped"])

    written = json.loads((out / "retrieval.json").read_text())
    assert written == json.loads(json.dumps(result))
    md = (out / "retrieval.md").read_text()
    assert md.count("| synthetic |") == 4 and "domain_agnostic on synthetic/pathology" in md


def test_nothing_to_evaluate_is_an_error(encoder_dir: Path, test_parquet: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="none of the encoders"):
        main(parse_args([f"encoders={{x: {tmp_path / 'nope'}}}", "eval_sets=[synthetic]",
                         f"synthetic_path={test_parquet}", f"out_dir={tmp_path}"]))  # fmt: skip
    with pytest.raises(ConfigError, match="no eval set"):
        main(parse_args([f"encoders={{x: {encoder_dir}}}", "eval_sets=[synthetic]",
                         f"synthetic_path={tmp_path / 'missing.parquet'}", f"out_dir={tmp_path}"]))  # fmt: skip
    with pytest.raises(ConfigError, match="no eval set"):
        main(parse_args([f"encoders={{x: {encoder_dir}}}", "eval_sets=[synthetic]", "domains=[dermatology]",
                         f"synthetic_path={test_parquet}", f"out_dir={tmp_path}"]))  # fmt: skip
    with pytest.raises(ConfigError, match="medpix_dir"):
        main(parse_args([f"encoders={{x: {encoder_dir}}}", "eval_sets=[medpix]", f"medpix_dir={tmp_path / 'no'}"]))


@pytest.mark.slow
@pytest.mark.needs_data
def test_main_on_medpix_captions(encoder_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    folder = require(shared_data, "medpix2")
    cfg = parse_args([f"encoders={{untrained: {encoder_dir}}}", "eval_sets=[medpix]", f"medpix_dir={folder}",
                      "ks=[1,10,1000]", "device=cpu", f"out_dir={tmp_path}"])  # fmt: skip
    (row,) = main(cfg)["results"]
    assert (row["eval_set"], row["domain"], row["n_queries"]) == ("medpix", "radiology", 200)
    assert row["n_gallery"] < 200 and row["n_duplicate_texts"] == 200 - row["n_gallery"]
    assert row["recall"]["1000"] == 1.0 and row["chance"]["10"] == pytest.approx(10 / row["n_gallery"], abs=1e-6)
