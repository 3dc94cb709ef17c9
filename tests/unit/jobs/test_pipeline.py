from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from jobs import pipeline, prepare_models
from medrag_ray.config import ConfigError
from medrag_ray.models.reader import load_reader
from medrag_ray.models.router import load_router
from medrag_ray.models.tokenizer import answer_token_ids, load_tokenizer

TINY = ["data.n_per_domain=12", "data.n_phenotypes=3", "data.image_size=32", "models.tokenizer_vocab_size=400",
        "steps=[make_data,prepare_models]"]


@pytest.mark.slow
def test_pipeline_builds_then_skips_then_rebuilds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = pipeline.parse_args([f"artifacts_dir={tmp_path}", *TINY])
    outputs = pipeline.main(cfg)
    assert set(outputs) == {"make_data", "prepare_models"}
    manifest = json.loads(outputs["make_data"].read_text())
    prepared = json.loads(outputs["prepare_models"].read_text())
    assert prepared["domains"] == sorted(manifest["config"]["domains"])
    assert prepared["dataset_dir"] == str((tmp_path / "data" / "synthetic").resolve())
    # The smoke run used the saved models: routed domains are real domains, p(yes) is a probability.
    assert {d for d, _ in prepared["smoke"]["router_predictions"]} <= set(prepared["domains"])
    assert 0.0 < prepared["smoke"]["reader_p_yes"] < 1.0

    models = tmp_path / "models" / "init"
    tok = load_tokenizer(models / "tokenizer")
    assert len(answer_token_ids(tok, ["yes", "no"])) == 2
    assert load_router(models / "router").domains == tuple(prepared["domains"])
    reader, _ = load_reader(models / "reader")
    assert reader.config.vision_config.image_size == 64  # the pipeline's reader default, not ReaderConfig's 32
    assert sum(p.numel() for p in reader.parameters()) == prepared["parameters"]["reader"]

    stamps = {p: p.stat().st_mtime_ns for p in outputs.values()}
    caplog.set_level(logging.INFO, logger="jobs.pipeline")
    pipeline.main(cfg)
    assert {p: p.stat().st_mtime_ns for p in outputs.values()} == stamps
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 2

    pipeline.main(pipeline.parse_args([f"artifacts_dir={tmp_path}", "rebuild=true", *TINY, "steps=[prepare_models]"]))
    assert outputs["prepare_models"].stat().st_mtime_ns != stamps[outputs["prepare_models"]]
    assert outputs["make_data"].stat().st_mtime_ns == stamps[outputs["make_data"]]


def test_prepare_models_needs_a_dataset(tmp_path: Path) -> None:
    cfg = prepare_models.parse_args([f"dataset_dir={tmp_path / 'none'}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(FileNotFoundError, match="python jobs/make_data.py"):
        prepare_models.main(cfg)
    assert not (tmp_path / "out").exists()


def test_prepare_models_refuses_to_overwrite_before_working(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    cfg = prepare_models.parse_args([f"dataset_dir={tmp_path / 'none'}", f"out_dir={out}"])
    with pytest.raises(FileExistsError, match="overwrite=true"):
        prepare_models.main(cfg)
    assert (out / "keep.txt").read_text() == "earlier result"


def test_pipeline_rejects_unknown_steps() -> None:
    with pytest.raises(ConfigError, match="unknown or no steps"):
        pipeline.parse_args(["steps=[make_data, train_everything]"])
    assert [s.name for s in pipeline.steps(pipeline.parse_args(["steps=[prepare_models]"]))] == ["prepare_models"]


def test_seeded_models_are_reproducible() -> None:
    from medrag_ray.config import TinyModelsConfig
    from medrag_ray.models.dual_encoder import build_dual_encoder
    from medrag_ray.utils import seed_everything

    cfg = TinyModelsConfig()
    seed_everything(cfg.seed)
    a = build_dual_encoder(cfg.encoder)
    seed_everything(cfg.seed)
    b = build_dual_encoder(cfg.encoder)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
