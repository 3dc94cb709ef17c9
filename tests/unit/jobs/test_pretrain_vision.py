"""jobs/pretrain_vision.py: parsing and the input checks that run before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import pretrain_vision
from medrag_ray.config import ConfigError


def test_defaults_and_overrides() -> None:
    cfg = pretrain_vision.parse_args(["finding_kinds=[visible,subtle]", "train.epochs=3"])
    assert cfg.finding_kinds == ("visible", "subtle") and cfg.train.epochs == 3
    assert cfg.reader_dir == "artifacts/models/init/reader" and cfg.out_dir == "artifacts/models/reader_vision"
    with pytest.raises(ConfigError, match="finding_kinds"):
        pretrain_vision.parse_args(["finding_kinds=[obvious]"])


def test_missing_inputs_name_the_field_and_the_remedy(tmp_path: Path) -> None:
    cfg = pretrain_vision.parse_args([f"dataset_dir={tmp_path / 'none'}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(FileNotFoundError, match="make_data.py"):
        pretrain_vision.main(cfg)
    data = tmp_path / "data"
    data.mkdir()
    (data / "samples_train.parquet").write_bytes(b"")
    cfg = pretrain_vision.parse_args(
        [f"dataset_dir={data}", f"reader_dir={tmp_path / 'no_reader'}", f"out_dir={tmp_path / 'out'}"]
    )
    with pytest.raises(FileNotFoundError, match="reader_dir .* does not exist.*prepare_models"):
        pretrain_vision.main(cfg)
    assert not (tmp_path / "out").exists()
