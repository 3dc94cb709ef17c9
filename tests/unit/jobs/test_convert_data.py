"""jobs/convert_data.py end to end: real subsets, a broken file with skip_bad, config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.convert_data import main, parse_args
from medrag_ray.config import ConfigError
from medrag_ray.data.readers import iter_mmed_rag_alignment, iter_vqa_rad, read_side_file
from medrag_ray.data.schema import CorpusDoc, PreferencePair, RecordError, Sample, read_parquet
from tests.conftest import REPO_ROOT, require


def test_vqa_rad_subset(shared_data: Path, tmp_path: Path) -> None:
    src = require(shared_data, "vqa_rad")
    out = tmp_path / "out" / "vqa_rad.parquet"
    result = main(parse_args(["source=vqa_rad", f"input_path={src}", f"out_path={out}", "limit=25"]))
    rows = read_parquet(out, Sample)
    expected = list(iter_vqa_rad(src, limit=25))
    assert rows == expected and len(rows) == result.rows_written == 25
    summary = json.loads((tmp_path / "out" / "vqa_rad.summary.json").read_text())
    assert (summary["read"], summary["kept"], summary["rejected"], summary["missing_images"]) == (25, 25, 0, 0)
    assert summary["record_class"] == "Sample" and summary["rows_written"] == 25
    assert read_side_file(tmp_path / "out" / "vqa_rad.missing_images.jsonl") == []
    assert not (tmp_path / "out" / "vqa_rad.rejects.jsonl").exists()


def test_alignment_subset_lists_missing_images(shared_data: Path, tmp_path: Path) -> None:
    src = require(shared_data, "mmed_rag", "training", "alignment")
    out = tmp_path / "pairs.parquet"
    result = main(parse_args(["source=mmed_rag_alignment", f"input_path={src}", f"out_path={out}", "limit=10"]))
    rows = read_parquet(out, PreferencePair)
    assert rows == list(iter_mmed_rag_alignment(src, limit=10))
    assert result.missing_images == 10 and not any(r.image_available for r in rows)
    missing = read_side_file(result.missing_images_path)
    assert [m["id"] for m in missing] == [r.id for r in rows]


def test_default_input_path_and_embedded_images(shared_data: Path, tmp_path: Path) -> None:
    require(shared_data, "medpix2")
    out = tmp_path / "cases.parquet"
    result = main(parse_args(["source=medpix_cases", f"out_path={out}", "embed_images=true", "limit=3"]))
    assert result.input_path == str(shared_data / "medpix2")
    rows = read_parquet(out, CorpusDoc)
    assert len(rows) == 3 and result.record_class == "CorpusDoc"
    for row in rows:
        assert row.image_bytes == Path(row.image_path).read_bytes()


def _broken_pathvqa(tmp_path: Path) -> Path:
    from PIL import Image

    (tmp_path / "src" / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "src" / "images" / "a.png")
    (tmp_path / "src" / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    good = {"image": "images/a.png", "question": "is it green?", "answer": "yes", "answer_type": "CLOSED"}
    lines = [json.dumps(good), '{"image": "images/a.png", "question": ', json.dumps({**good, "question": ""}),
             json.dumps({**good, "image": "images/bad.jpg"}), json.dumps({**good, "question": "why?", "answer": "x"})]
    (tmp_path / "src" / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "src" / "qa.jsonl"


def test_broken_file_with_skip_bad(tmp_path: Path) -> None:
    src = _broken_pathvqa(tmp_path)
    out = tmp_path / "out" / "pathvqa.parquet"
    result = main(parse_args(["source=pathvqa", f"input_path={src}", f"out_path={out}", "skip_bad=true"]))
    rows = read_parquet(out, Sample)
    assert [(r.question, r.answer, r.answer_type) for r in rows] == [("is it green?", "yes", "closed"),
                                                                     ("why?", "x", "open")]  # fmt: skip
    rejects = read_side_file(tmp_path / "out" / "pathvqa.rejects.jsonl")
    assert [(r["location"], r["field"]) for r in rejects] == [("line 2", "<json>"), ("line 3", "question"),
                                                               ("line 4", "image")]  # fmt: skip
    summary = json.loads(Path(result.summary_path).read_text())
    assert (summary["read"], summary["kept"], summary["rejected"]) == (5, 2, 3)
    assert summary["rejects_by_field"] == {"<json>": 1, "question": 1, "image": 1}
    assert summary["rejects_path"] == str(tmp_path / "out" / "pathvqa.rejects.jsonl")


def test_broken_file_without_skip_bad_fails_and_writes_nothing(tmp_path: Path) -> None:
    src = _broken_pathvqa(tmp_path)
    out = tmp_path / "out" / "pathvqa.parquet"
    with pytest.raises(RecordError, match=r"qa\.jsonl, line 2: field '<json>'.*skip_bad"):
        main(parse_args(["source=pathvqa", f"input_path={src}", f"out_path={out}"]))
    assert not out.exists() and not (tmp_path / "out" / "pathvqa.summary.json").exists()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["source=chexpert"], "source must be one of"),
        (["out_path=x.csv"], "must end with .parquet"),
        (["limit=-1"], "limit must be >= 0"),
        (["domain=cardiology"], "domain must be"),
        (["split=holdout"], "split must be"),
        (["rejects_path=r.jsonl"], "skip_bad"),
        (["lmit=3"], "unknown config key lmit"),
    ],
)
def test_config_errors(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_args(overrides)


def test_option_the_source_does_not_take(tmp_path: Path) -> None:
    cfg = parse_args(["source=vqa_rad", "domain=pathology", f"input_path={tmp_path}", f"out_path={tmp_path}/o.parquet"])
    with pytest.raises(ConfigError, match="does not take it"):
        main(cfg)


def test_yaml_defaults_and_command_line(tmp_path: Path) -> None:
    src = _broken_pathvqa(tmp_path)
    out = tmp_path / "cli.parquet"
    proc = subprocess.run(
        [sys.executable, "jobs/convert_data.py", "source=pathvqa", f"input_path={src}", f"out_path={out}",
         "skip_bad=true"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "read 5, kept 2, rejected 3" in proc.stderr
    assert len(read_parquet(out, Sample)) == 2
    cfg = parse_args([])
    assert (cfg.source, cfg.output_path(), cfg.skip_bad, cfg.check_images) == (
        "vqa_rad", "artifacts/data/converted/vqa_rad.parquet", False, True)  # fmt: skip
