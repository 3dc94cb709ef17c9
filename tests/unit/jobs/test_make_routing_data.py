"""jobs/make_routing_data.py: config, the shared-data folder lookup, writing, refusing to clobber, entrypoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import jobs.make_routing_data as job
from medrag_ray.config import ConfigError, MakeRoutingDataConfig
from medrag_ray.data.routing import load_summary
from medrag_ray.data.schema import SPLITS, Sample, read_parquet
from medrag_ray.data.synthetic import samples_name
from tests.unit.data.fake_shared import PNEUMONIA_SIZES, make_fake_shared


@pytest.fixture(scope="module")
def fake_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_shared(tmp_path_factory.mktemp("shared"))


def test_defaults_and_overrides() -> None:
    assert job.parse_args([]) == MakeRoutingDataConfig()
    cfg = job.parse_args(["data.sources=[vqa_rad,dermamnist]", "data.max_per_source_split=0"])
    assert cfg.data.sources == ("vqa_rad", "dermamnist") and cfg.data.max_per_source_split == 0
    with pytest.raises(ConfigError, match="max_per_source_split"):
        job.parse_args(["data.max_per_source_split=-1"])


def test_missing_shared_data_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(job, "shared_data_dir", lambda: None)
    with pytest.raises(ConfigError, match="MEDRAG_SHARED_DATA"):
        job.main(job.parse_args([f"out_dir={tmp_path / 'out'}"]))
    with pytest.raises(ConfigError, match="shared_dir="):
        job.main(job.parse_args([f"shared_dir={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


def test_main_writes_and_refuses_to_clobber(fake_shared: Path, tmp_path: Path) -> None:
    args = [f"shared_dir={fake_shared}", f"out_dir={tmp_path / 'routing'}", "data.sources=[vqa_rad,pneumoniamnist]",
            "data.max_per_source_split=5", "data.val_fraction=0"]  # fmt: skip
    out = job.main(job.parse_args(args))
    summary = load_summary(out)
    assert summary["counts"] == {
        "vqa_rad": {"train": 3, "val": 0, "test": 2},  # v0 (= v5), v2, v3 | v1, v4
        "pneumoniamnist": {"train": 5, "val": 5, "test": 5},
    }
    assert summary["sources"]["pneumoniamnist"]["available"]["val"] == PNEUMONIA_SIZES["val"]
    for split in SPLITS:
        rows = read_parquet(out / samples_name(split), Sample)
        assert len(rows) == summary["per_split"][split] == sum(c[split] for c in summary["counts"].values())
    with pytest.raises(FileExistsError, match="overwrite=true"):
        job.main(job.parse_args(args))
    job.main(job.parse_args([*args, "overwrite=true", "data.max_per_source_split=2"]))
    assert load_summary(out)["counts"]["pneumoniamnist"] == {"train": 2, "val": 2, "test": 2}


def test_script_entrypoint_logs_counts(fake_shared: Path, tmp_path: Path, repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(repo_root / "jobs" / "make_routing_data.py"), f"shared_dir={fake_shared}",
         f"out_dir={tmp_path / 'r'}", "data.sources=[pneumoniamnist]"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pneumoniamnist (radiology): kept train=29 val=6 test=6" in result.stderr
    assert (tmp_path / "r" / "summary.json").is_file()
