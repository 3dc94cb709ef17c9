from __future__ import annotations

import logging
from pathlib import Path

import pytest

from medrag_ray.utils import _quiet_root_info, atomic_output_dir, check_writable, shared_data_dir


def test_atomic_output_dir_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left

    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_check_writable_protects_existing_output(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("1")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        check_writable(tmp_path / "x", overwrite=False)
    assert check_writable(tmp_path / "x", overwrite=True) == tmp_path / "x"
    (tmp_path / "f").write_text("file")
    with pytest.raises(FileExistsError, match="not a directory"):
        check_writable(tmp_path / "f", overwrite=True)
    assert check_writable(tmp_path / "empty", overwrite=False) == tmp_path / "empty"


def test_root_info_chatter_is_dropped_but_warnings_kept() -> None:
    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "m", None, None)

    assert not _quiet_root_info(record("root", logging.INFO))
    assert _quiet_root_info(record("root", logging.WARNING))
    assert _quiet_root_info(record("medrag_ray.x", logging.INFO))


def test_shared_data_dir_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDRAG_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
