"""jobs/mine_prefs.py: which re-runs have nothing to mine (and so start no Ray Data pass)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import mine_prefs
from medrag_ray.config import PIPELINE_STEPS, PipelineConfig


def test_limit_selects_samples_spread_over_the_domains(tmp_path: Path) -> None:
    """The file is grouped by domain, as the synthetic generator writes it: limit 4 takes two of each domain."""
    path = tmp_path / "samples.parquet"
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(6)], "domain": ["radiology"] * 3 + ["pathology"] * 3,
                             "question": ["q"] * 6}), path)
    assert mine_prefs.selected_ids(str(path), 4) == {"s0", "s1", "s3", "s4"}
    assert mine_prefs.selected_ids(str(path), 0) == {f"s{i}" for i in range(6)}


def test_all_mined_looks_at_the_selected_ids_only(tmp_path: Path) -> None:
    path = tmp_path / "samples.parquet"
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(6)], "domain": ["radiology"] * 3 + ["pathology"] * 3,
                             "question": ["q"] * 6}), path)
    spread4 = {"s0", "s1", "s3", "s4"}
    assert mine_prefs.all_mined(str(path), 4, spread4)
    assert not mine_prefs.all_mined(str(path), 4, {"s0", "s1", "s2", "s3"})  # s4 is selected and not mined
    assert not mine_prefs.all_mined(str(path), 5, spread4)
    assert not mine_prefs.all_mined(str(path), 0, spread4)  # limit 0 selects every row
    assert mine_prefs.all_mined(str(path), 0, spread4 | {"s2", "s5", "other"})
    assert not mine_prefs.all_mined(str(path), 4, set())
    assert not mine_prefs.all_mined(str(tmp_path), 4, spread4)  # a directory: left to the Ray Data filter


def test_missing_prerequisites_run_exactly_the_pipeline_steps_before_mining(tmp_path: Path, monkeypatch) -> None:
    """The steps come from the pipeline's own order (a step added before mine_prefs is built too; nothing after
    it, such as train_dpo, which needs the pairs this job writes)."""
    from jobs import pipeline

    ran: list[PipelineConfig] = []

    def fake_pipeline(cfg: PipelineConfig) -> dict:
        ran.append(cfg)
        for part in ("data/synthetic/samples_train.parquet", "models/reader", "models/router", "index"):
            target = tmp_path / "artifacts" / part
            target.parent.mkdir(parents=True, exist_ok=True)
            target.mkdir() if "." not in target.name else target.write_text("")
        return {}

    monkeypatch.setattr(pipeline, "main", fake_pipeline)
    monkeypatch.chdir(tmp_path)
    mine_prefs.build_prerequisites(mine_prefs.parse_args([]))
    [cfg] = ran
    assert cfg.steps == PIPELINE_STEPS[: PIPELINE_STEPS.index("mine_prefs")]
    assert "train_reader" in cfg.steps and "train_dpo" not in cfg.steps
    assert cfg.artifacts_dir == "artifacts"
    mine_prefs.build_prerequisites(mine_prefs.parse_args([]))  # everything exists now: nothing is built
    assert len(ran) == 1


def test_missing_prerequisites_without_build_missing_name_the_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        mine_prefs.build_prerequisites(mine_prefs.parse_args(["build_missing=false"]))
    message = str(err.value)
    assert "reader_dir=artifacts/models/reader" in message and "context.index_dir=artifacts/index" in message
    assert "python jobs/pipeline.py steps=[make_data,prepare_models," in message and "train_reader]" in message
