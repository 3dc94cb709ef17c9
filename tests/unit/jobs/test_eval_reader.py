"""jobs/eval_reader.py: its config, the missing-input message, and main's outputs with stubbed models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medrag_ray.models.reader as reader_models
import medrag_ray.reader.engine as engine_module
import medrag_ray.retrieval.retriever as retriever_module
from jobs.eval_reader import DEFAULT_CONFIG, main, parse_args
from medrag_ray.config import ConfigError, EvalReaderConfig
from medrag_ray.data.schema import Sample, write_parquet
from medrag_ray.mining.miner import png_bytes
from medrag_ray.reader.engine import ClosedScores


def test_shipped_yaml_and_overrides() -> None:
    cfg = parse_args(["--config", str(DEFAULT_CONFIG)])
    assert cfg == EvalReaderConfig()  # the YAML spells out the defaults
    assert cfg.samples_path == "artifacts/data/synthetic/samples_test.parquet" and cfg.route is True
    assert cfg.context.retrieval.k == 5 and cfg.context.retrieval.k_max == 3
    cfg = parse_args(["name=vqa_rad-test", "limit=50", "route=false", "context.style=jomed", "context.retrieval.k=7"])
    assert (cfg.name, cfg.limit, cfg.route, cfg.context.style, cfg.context.retrieval.k) == (
        "vqa_rad-test", 50, False, "jomed", 7,
    )
    assert cfg.context.router_dir == "artifacts/models/router"  # untouched keys keep the YAML's values
    for bad, field in (("limit=-1", "limit"), ("batch_size=0", "batch_size"), ("device=tpu", "device"),
                       ("context.index_dir=''", "context.index_dir"), ("reader_dir=''", "reader_dir")):
        with pytest.raises(ConfigError, match=field):
            parse_args([bad])


def test_missing_input_names_the_field_and_the_build_command(tmp_path: Path) -> None:
    samples = tmp_path / "samples.parquet"
    samples.write_bytes(b"")
    for d in ("reader", "router"):
        (tmp_path / d).mkdir()
    cfg = parse_args([f"samples_path={samples}", f"reader_dir={tmp_path / 'reader'}",
                      f"context.router_dir={tmp_path / 'router'}", f"context.index_dir={tmp_path / 'no_index'}"])
    with pytest.raises(FileNotFoundError) as info:
        main(cfg)
    message = str(info.value)
    assert f"context.index_dir={tmp_path / 'no_index'}" in message and "python jobs/pipeline.py" in message
    assert "reader_dir" not in message and "samples_path" not in message
    with pytest.raises(FileNotFoundError, match="reader_dir=.*missing_reader"):
        main(parse_args([f"samples_path={samples}", f"reader_dir={tmp_path / 'missing_reader'}"]))


def test_main_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = png_bytes(Image.new("RGB", (8, 8), (10, 200, 90)))
    rows = [
        Sample(id=f"s{i}", domain="radiology", split="test", source="stub", question=f"Q{i}?", answer=a,
               answer_type="closed", image_bytes=png, image_available=True)
        for i, a in enumerate(["yes", "no", "yes"])
    ]
    rows.append(Sample(id="r", domain="radiology", split="test", source="stub", text="T.", answer_type="report",
                       image_bytes=png, image_available=True))
    write_parquet(rows, Sample, tmp_path / "samples.parquet")
    for d in ("reader", "router", "index"):
        (tmp_path / d).mkdir()

    class NoHits:
        def retrieve(self, images, questions, domains=None, cfg=None, exclude_ids=None):  # noqa: ANN001, ANN201
            return [retriever_module.RetrievalResult("radiology", 0.9, [], k_kept=0) for _ in images]

    class AlwaysYes:
        def __init__(self, model: object, processor: object, batch_size: int) -> None:
            self.batch_size = batch_size

        def score_closed(self, inputs, choices=("yes", "no")):  # noqa: ANN001, ANN201
            return ClosedScores(tuple(choices), np.tile([0.9, 0.1], (len(inputs), 1)))

    stub_loader = classmethod(lambda cls, *a, **k: NoHits())
    monkeypatch.setattr(retriever_module.MultimodalRetriever, "from_artifacts", stub_loader)
    monkeypatch.setattr(reader_models, "load_reader", lambda *a, **k: (None, None))
    monkeypatch.setattr(engine_module, "ReaderEngine", AlwaysYes)
    cfg = parse_args([f"samples_path={tmp_path / 'samples.parquet'}", f"reader_dir={tmp_path / 'reader'}",
                      f"context.router_dir={tmp_path / 'router'}", f"context.index_dir={tmp_path / 'index'}",
                      f"out_dir={tmp_path / 'eval'}", "name=stub-test", "device=cpu"])
    result = main(cfg)
    written = json.loads((tmp_path / "eval" / "reader.json").read_text())
    assert written == result
    assert written["name"] == "stub-test" and written["config"]["name"] == "stub-test"
    assert written["overall"]["n"] == 3 and written["skipped"]["not_closed"] == 1
    assert written["overall"]["accuracy_no_rag"] == pytest.approx(2 / 3, abs=1e-6)
    assert written["overall"]["majority_baseline"] == pytest.approx(2 / 3, abs=1e-6)
    assert "(stub-test)" in (tmp_path / "eval" / "reader.md").read_text()
