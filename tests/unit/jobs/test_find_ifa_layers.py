"""jobs/find_ifa_layers.py: its config, the missing-input message, sampling, and main on the tiny reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import medrag_ray.models.reader as reader_models
import medrag_ray.retrieval.retriever as retriever_module
from jobs.find_ifa_layers import DEFAULT_CONFIG, main, parse_args
from medrag_ray.config import ConfigError, FindIFALayersConfig
from medrag_ray.data.schema import Sample, write_parquet
from medrag_ray.mining.miner import png_bytes
from medrag_ray.models.reader import ReaderConfig, build_tiny_reader
from medrag_ray.models.tokenizer import train_bpe_tokenizer
from tests.unit.models.conftest import CORPUS


def test_shipped_yaml_and_overrides() -> None:
    cfg = parse_args(["--config", str(DEFAULT_CONFIG)])
    assert cfg == FindIFALayersConfig()
    assert cfg.samples_path == "artifacts/data/synthetic/samples_val.parquet"
    assert cfg.reader_dir == "artifacts/models/reader_dpo" and cfg.limit == 64 and cfg.top_n == 1
    cfg = parse_args(["top_n=2", "criterion=kl", "limit=0", "context.style=jomed"])
    assert (cfg.top_n, cfg.criterion, cfg.limit, cfg.context.style) == (2, "kl", 0, "jomed")
    for bad, field in (("limit=-1", "limit"), ("top_n=0", "top_n"), ("criterion=entropy", "criterion"),
                       ("batch_size=0", "batch_size"), ("device=tpu", "device"), ("reader_dir=''", "reader_dir"),
                       ("context.router_dir=''", "context.router_dir")):
        with pytest.raises(ConfigError, match=field):
            parse_args([bad])


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    samples = tmp_path / "samples.parquet"
    samples.write_bytes(b"")
    (tmp_path / "router").mkdir()
    cfg = parse_args([f"samples_path={samples}", f"reader_dir={tmp_path / 'no_reader'}",
                      f"context.router_dir={tmp_path / 'router'}", f"context.index_dir={tmp_path / 'no_index'}"])
    with pytest.raises(FileNotFoundError) as info:
        main(cfg)
    message = str(info.value)
    assert f"reader_dir={tmp_path / 'no_reader'}" in message and f"context.index_dir={tmp_path / 'no_index'}" in message
    assert "samples_path" not in message and "router_dir" not in message and "python jobs/pipeline.py" in message


def test_main_writes_the_critical_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = png_bytes(Image.new("RGB", (36, 36), (10, 200, 90)))
    rows = [
        Sample(id=f"s{i}", domain="radiology", split="val", source="stub", question=f"Is there finding {i}?",
               answer=a, answer_type="closed", image_bytes=png, image_available=True)
        for i, a in enumerate(["yes", "no", "yes", "no"])
    ]
    rows.append(Sample(id="r", domain="radiology", split="val", source="stub", text="T.", answer_type="report",
                       image_bytes=png, image_available=True))
    write_parquet(rows, Sample, tmp_path / "samples.parquet")
    for d in ("reader", "router", "index"):
        (tmp_path / d).mkdir()

    class Stub:
        def retrieve(self, images, questions, domains=None, cfg=None, exclude_ids=None):  # noqa: ANN001, ANN201
            def hits(i: int) -> list[retriever_module.Hit]:
                if i == 1:  # adaptive-k kept nothing for the second question
                    return []
                return [retriever_module.Hit(f"d{j}", f"Mild cardiomegaly {j}.", 0.9 - 0.2 * j, True, j)
                        for j in range(2)]

            return [retriever_module.RetrievalResult("radiology", 0.9, hits(i), k_kept=len(hits(i)))
                    for i in range(len(images))]

    torch.manual_seed(0)
    tiny = build_tiny_reader(ReaderConfig(), train_bpe_tokenizer(CORPUS * 4, vocab_size=400))
    stub_loader = classmethod(lambda cls, *a, **k: Stub())
    monkeypatch.setattr(retriever_module.MultimodalRetriever, "from_artifacts", stub_loader)
    monkeypatch.setattr(reader_models, "load_reader", lambda *a, **k: tiny)
    cfg = parse_args([f"samples_path={tmp_path / 'samples.parquet'}", f"reader_dir={tmp_path / 'reader'}",
                      f"context.router_dir={tmp_path / 'router'}", f"context.index_dir={tmp_path / 'index'}",
                      f"out_dir={tmp_path / 'eval'}", "name=stub-val", "device=cpu", "top_n=1"])
    result = main(cfg)
    written = json.loads((tmp_path / "eval" / "critical_layers.json").read_text())
    assert written == result
    assert written["n"] == 3 and written["skipped"] == {"not_closed_yes_no": 1, "undecodable_image": 0,
                                                        "no_retrieved_document": 1}
    assert [e["layer"] for e in written["per_layer"]] == [0, 1]
    best = max(written["per_layer"], key=lambda e: (e["abs_delta_gold"], -e["layer"]))
    assert written["layers"] == [best["layer"]] and written["criterion"] == "abs_delta_gold"
    assert set(written["baseline"]) == {"accuracy", "mean_p_gold"} and written["config"]["name"] == "stub-val"
    markdown = (tmp_path / "eval" / "critical_layers.md").read_text()
    assert "(stub-val)" in markdown and f"critical layers: {written['layers']}" in markdown
