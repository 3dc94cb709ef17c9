"""jobs/mine_prefs.py: which re-runs have nothing to mine (and so start no Ray Data pass)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import mine_prefs


def test_all_mined_looks_at_the_selected_ids_only(tmp_path: Path) -> None:
    path = tmp_path / "samples.parquet"
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(6)], "question": ["q"] * 6}), path)
    first4 = {"s0", "s1", "s2", "s3"}
    assert mine_prefs.all_mined(str(path), 4, first4)
    assert not mine_prefs.all_mined(str(path), 5, first4)  # s4 is selected and not mined
    assert not mine_prefs.all_mined(str(path), 0, first4)  # limit 0 selects every row
    assert mine_prefs.all_mined(str(path), 0, first4 | {"s4", "s5", "other"})
    assert not mine_prefs.all_mined(str(path), 4, set())
    assert not mine_prefs.all_mined(str(tmp_path), 4, first4)  # a directory: left to the Ray Data filter
