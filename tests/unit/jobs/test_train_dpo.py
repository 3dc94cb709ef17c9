"""jobs/train_dpo.py: parsing, the per-stage pair files, and the checks that run before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import train_dpo
from medrag_ray.config import ConfigError
from medrag_ray.data.schema import PreferencePair, read_parquet, write_parquet


def pair(sample: str, pair_type: str, noised: int = 0) -> PreferencePair:
    return PreferencePair(
        id=f"{sample}/{pair_type}", domain="radiology", source="t", pair_type=pair_type, prompt="Is there X?",
        chosen="yes", rejected="yes" if noised else "no", rejected_noised=noised, image_bytes=b"png",
        image_available=True,
    )


def test_defaults_are_the_two_rag_pt_stages() -> None:
    cfg = train_dpo.parse_args([])
    assert cfg.stages == (("cm",), ("oa1", "oa2", "oa")) and cfg.beta == 0.1
    assert train_dpo.parse_args(["stages=[[oa1],[cm,oa2]]"]).stages == (("oa1",), ("cm", "oa2"))
    with pytest.raises(ConfigError, match="unknown pair kinds"):
        train_dpo.parse_args(["stages=[[cm],[dpo]]"])
    with pytest.raises(ConfigError, match="beta"):
        train_dpo.parse_args(["beta=0"])
    with pytest.raises(ConfigError, match="non-empty"):
        train_dpo.parse_args(["stages=[[cm],[]]"])


def test_stage_pairs_are_selected_and_split(tmp_path: Path) -> None:
    pairs = [pair(f"s{i:02d}", "cm", 1) for i in range(30)] + [pair(f"s{i:02d}", "oa1") for i in range(10)]
    write_parquet(pairs, PreferencePair, tmp_path / "pairs" / "part-0.parquet")
    cfg = train_dpo.parse_args([f"pairs_path={tmp_path / 'pairs'}", "val_fraction=0.2"])
    counts = train_dpo.write_stage_pairs(cfg, ["cm"], tmp_path / "stage1")
    train = read_parquet(tmp_path / "stage1" / "train.parquet", PreferencePair)
    val = read_parquet(tmp_path / "stage1" / "val.parquet", PreferencePair)
    assert counts == {"train": len(train), "val": len(val)} and len(train) + len(val) == 30 and val
    assert {p.pair_type for p in train + val} == {"cm"}
    assert train_dpo.write_stage_pairs(cfg, ["oa2"], tmp_path / "stage2") == {"train": 0, "val": 0}
    assert not (tmp_path / "stage2").exists()


def test_missing_inputs_and_no_pairs_fail_before_ray(tmp_path: Path) -> None:
    base = [f"out_dir={tmp_path / 'out'}", f"work_dir={tmp_path / 'work'}"]
    with pytest.raises(FileNotFoundError, match="mine_prefs"):
        train_dpo.main(train_dpo.parse_args([*base, f"pairs_path={tmp_path / 'none'}"]))
    write_parquet([pair("s0", "oa1")], PreferencePair, tmp_path / "pairs.parquet")
    with pytest.raises(FileNotFoundError, match="reader_dir"):
        train_dpo.main(train_dpo.parse_args([*base, f"pairs_path={tmp_path / 'pairs.parquet'}",
                                             f"reader_dir={tmp_path / 'none'}"]))
    (tmp_path / "reader").mkdir()
    with pytest.raises(ValueError, match="no training pair"):
        train_dpo.main(train_dpo.parse_args([*base, f"pairs_path={tmp_path / 'pairs.parquet'}",
                                             f"reader_dir={tmp_path / 'reader'}", "stages=[[cm]]"]))
    assert not (tmp_path / "out").exists()
