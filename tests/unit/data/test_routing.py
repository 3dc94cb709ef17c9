"""The real-data domain-routing dataset: dedupe, held-out precedence, val carving, caps (fake and real data)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from medrag_ray.config import ConfigError, RoutingDataConfig
from medrag_ray.data.readers.common import hash_fraction
from medrag_ray.data.readers.pathvqa import pathvqa_split
from medrag_ray.data.routing import (
    ROUTING_SOURCES,
    RoutingDataset,
    build_routing_dataset,
    held_out_split,
    load_summary,
    pixel_hash,
    write_routing_dataset,
)
from medrag_ray.data.schema import SPLITS, Sample, read_parquet
from medrag_ray.data.synthetic import samples_name
from tests.conftest import require
from tests.unit.data.fake_shared import PNEUMONIA_SIZES, make_fake_shared

FAKE_SOURCES = ("vqa_rad", "medpix2", "pathvqa", "pneumoniamnist")


def by_source_split(ds: RoutingDataset) -> dict[tuple[str, str], list[Sample]]:
    out: dict[tuple[str, str], list[Sample]] = {}
    for split, rows in ds.samples.items():
        for s in rows:
            assert s.split == split
            out.setdefault((s.source, split), []).append(s)
    return out


def keys(rows: list[Sample]) -> set[str]:
    return {json.loads(s.meta)["key"] for s in rows}


@pytest.fixture(scope="module")
def fake_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_shared(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def fake_ds(fake_shared: Path) -> RoutingDataset:
    cfg = RoutingDataConfig(sources=FAKE_SOURCES, max_per_source_split=0, val_fraction=0.0)
    return build_routing_dataset(cfg, fake_shared)


def test_held_out_precedence() -> None:
    assert held_out_split(["train", "test"]) == "test"
    assert held_out_split({"val", "train"}) == "val"
    assert held_out_split(("train",)) == "train"
    with pytest.raises(ValueError, match="no split"):
        held_out_split([])


def test_pixel_hash_ignores_encoding_but_not_content() -> None:
    img = Image.new("RGB", (5, 4), (10, 20, 30))
    png, bmp = io.BytesIO(), io.BytesIO()
    img.save(png, format="PNG")
    img.save(bmp, format="BMP")
    assert pixel_hash(Image.open(png)) == pixel_hash(Image.open(bmp)) == pixel_hash(img)
    gray = Image.new("L", (5, 4), 77)
    assert pixel_hash(gray) == pixel_hash(Image.new("RGB", (5, 4), (77, 77, 77)))  # compared as RGB
    assert pixel_hash(img) != pixel_hash(Image.new("RGB", (5, 4), (10, 20, 31)))
    assert pixel_hash(img) != pixel_hash(Image.new("RGB", (4, 5), (10, 20, 30)))  # same bytes, other shape


def test_fake_vqa_rad_one_image_once_test_wins(fake_ds: RoutingDataset) -> None:
    groups = by_source_split(fake_ds)
    # v1 has train and test questions, v2 is also a MedPix (test) image -> both test; v5 duplicates v0.
    assert keys(groups[("vqa_rad", "test")]) == {"v1.png", "v2.png", "v4.png"}
    assert keys(groups[("vqa_rad", "train")]) == {"v0.png", "v3.png"}
    assert ("vqa_rad", "val") not in groups  # val_fraction=0
    v0 = next(s for s in groups[("vqa_rad", "train")] if s.id.endswith("v0.png"))
    meta = json.loads(v0.meta)
    assert meta["n_questions"] == 2 and meta["organ"] == "CHEST" and meta["split_rule"] == "official"
    v2 = next(s for s in groups[("vqa_rad", "test")] if s.id.endswith("v2.png"))
    assert json.loads(v2.meta)["official_splits"] == ["train", "test"]
    assert json.loads(v2.meta)["split_rule"] == "held_out_precedence"
    src = fake_ds.summary["sources"]["vqa_rad"]
    assert src["distinct_images"] == 6 and src["duplicates_dropped"] == 1 and src["moved_to_held_out"] == 2
    assert src["records"]["read"] == sum((2, 1, 1, 1, 1)) + 2


def test_fake_medpix_test_only_and_cross_source_duplicate_dropped(fake_ds: RoutingDataset, fake_shared: Path) -> None:
    groups = by_source_split(fake_ds)
    assert {sp for (src, sp) in groups if src == "medpix2"} == {"test"}
    medpix = groups[("medpix2", "test")]
    assert keys(medpix) == {"MPX0_synpic0.png", "MPX1_synpic1.png"}  # MPX2 is VQA-RAD's v2, kept there
    assert fake_ds.summary["sources"]["medpix2"]["duplicates_dropped"] == 1
    first = next(s for s in medpix if s.id.endswith("MPX0_synpic0.png"))
    assert first.text == "Axial CT number 0."
    assert first.image_bytes == (fake_shared / "medpix2" / "images" / "MPX0_synpic0.png").read_bytes()


def test_fake_pathvqa_keeps_the_readers_hash_split(fake_ds: RoutingDataset) -> None:
    rows = [s for split in SPLITS for s in fake_ds.samples[split] if s.source == "pathvqa"]
    got = {json.loads(s.meta)["key"]: s.split for s in rows}
    assert got == {f"p{i}.jpg": pathvqa_split(f"p{i}.jpg") for i in range(5)}


def test_fake_medmnist_duplicate_across_train_and_val_goes_to_val(fake_ds: RoutingDataset) -> None:
    groups = by_source_split(fake_ds)
    n = {sp: len(groups.get(("pneumoniamnist", sp), [])) for sp in SPLITS}
    assert n == {"train": PNEUMONIA_SIZES["train"] - 1, "val": PNEUMONIA_SIZES["val"], "test": PNEUMONIA_SIZES["test"]}
    assert "train/0" in keys(groups[("pneumoniamnist", "val")])
    assert "val/0" not in keys(groups[("pneumoniamnist", "val")])
    one = groups[("pneumoniamnist", "test")][0]
    assert Image.open(io.BytesIO(one.image_bytes)).size == (28, 28)  # kept at its size


def test_fake_every_sample_is_a_domain_label_and_no_image_twice(fake_ds: RoutingDataset) -> None:
    rows = [s for split in SPLITS for s in fake_ds.samples[split]]
    for s in rows:
        assert s.domain == ROUTING_SOURCES[s.source].domain
        assert s.answer == s.domain and s.answer_type == "label" and s.image_available and s.image_bytes
        assert json.loads(s.meta)["pixel_sha256"] == pixel_hash(Image.open(io.BytesIO(s.image_bytes)))
    pixels = Counter(json.loads(s.meta)["pixel_sha256"] for s in rows)
    assert max(pixels.values()) == 1
    assert len({s.id for s in rows}) == len(rows)
    assert fake_ds.counts() == {
        src: {sp: len(by_source_split(fake_ds).get((src, sp), [])) for sp in SPLITS} for src in FAKE_SOURCES
    }
    assert fake_ds.summary["counts"] == fake_ds.counts()


def test_val_carving_follows_the_image_hash(fake_shared: Path) -> None:
    ds = build_routing_dataset(
        RoutingDataConfig(sources=("vqa_rad", "pneumoniamnist"), max_per_source_split=0, val_fraction=0.6), fake_shared
    )
    vqa = [s for sp in ("train", "val") for s in ds.samples[sp] if s.source == "vqa_rad"]
    assert {json.loads(s.meta)["key"] for s in vqa} == {"v0.png", "v2.png", "v3.png"}  # v2 is train: no MedPix now
    for s in vqa:
        carved = hash_fraction("val:" + json.loads(s.meta)["pixel_sha256"]) < 0.6
        assert s.split == ("val" if carved else "train")
        assert json.loads(s.meta)["split_rule"] == ("carved_val" if carved else "official")
    assert ds.summary["sources"]["vqa_rad"]["carved_val"] == sum(s.split == "val" for s in vqa)
    # a source with its own val split is never carved
    assert ds.summary["sources"]["pneumoniamnist"]["carved_val"] == 0
    assert len([s for s in ds.samples["val"] if s.source == "pneumoniamnist"]) == PNEUMONIA_SIZES["val"]


def test_cap_is_a_deterministic_seeded_sample(fake_shared: Path) -> None:
    def train_keys(seed: int) -> list[str]:
        cfg = RoutingDataConfig(sources=("pneumoniamnist",), max_per_source_split=4, seed=seed)
        ds = build_routing_dataset(cfg, fake_shared)
        assert ds.counts()["pneumoniamnist"] == {"train": 4, "val": 4, "test": 4}
        assert ds.summary["sources"]["pneumoniamnist"]["available"]["train"] == PNEUMONIA_SIZES["train"] - 1
        return sorted(keys(ds.samples["train"]))

    assert train_keys(0) == train_keys(0)
    assert train_keys(0) != train_keys(1)


def test_max_image_side_downscales_large_images_only(fake_shared: Path) -> None:
    cfg = RoutingDataConfig(sources=("medpix2", "pneumoniamnist"), max_per_source_split=2, max_image_side=16)
    ds = build_routing_dataset(cfg, fake_shared)
    for s in ds.samples["test"]:
        size = Image.open(io.BytesIO(s.image_bytes)).size
        assert max(size) == 16
        meta = json.loads(s.meta)
        assert (meta["width"], meta["height"]) in ((36, 30), (28, 28))  # the original size, hashed before


def test_write_and_reload(fake_ds: RoutingDataset, tmp_path: Path) -> None:
    out = write_routing_dataset(fake_ds, tmp_path / "routing")
    summary = load_summary(out)
    for split in SPLITS:
        rows = read_parquet(out / samples_name(split), Sample)
        assert rows == fake_ds.samples[split]
        assert summary["files"][samples_name(split)]["rows"] == len(rows)
        digest = hashlib.sha256((out / samples_name(split)).read_bytes()).hexdigest()
        assert summary["files"][samples_name(split)]["sha256"] == digest
    with pytest.raises(FileExistsError, match="overwrite=true"):
        write_routing_dataset(fake_ds, out)


def test_missing_inputs_name_the_remedy(tmp_path: Path, fake_shared: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MEDRAG_SHARED_DATA"):
        build_routing_dataset(RoutingDataConfig(), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="drop retinamnist from data.sources"):
        build_routing_dataset(RoutingDataConfig(sources=("vqa_rad", "retinamnist")), fake_shared)
    with pytest.raises(ConfigError, match="data.sources"):
        RoutingDataConfig(sources=("vqa_rad", "mimic"))
    with pytest.raises(ConfigError, match="val_fraction"):
        RoutingDataConfig(val_fraction=1.0)


# ----------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_ds(shared_data: Path) -> RoutingDataset:
    for rel in ("vqa_rad/testset.json", "medpix2/descriptions_test.jsonl", "pathvqa/qa.jsonl"):
        require(shared_data, rel)
    for name in ("retinamnist", "pneumoniamnist", "dermamnist"):
        require(shared_data, "medmnist", f"{name}.npz")
    return build_routing_dataset(RoutingDataConfig(max_per_source_split=250), shared_data)


@pytest.mark.slow
@pytest.mark.needs_data
def test_real_no_image_twice_and_domains_per_source(real_ds: RoutingDataset) -> None:
    rows = [s for split in SPLITS for s in real_ds.samples[split]]
    byte_hashes = Counter(hashlib.sha256(s.image_bytes).hexdigest() for s in rows)
    assert max(byte_hashes.values()) == 1
    assert max(Counter(json.loads(s.meta)["pixel_sha256"] for s in rows).values()) == 1
    expected = {
        "vqa_rad": "radiology", "medpix2": "radiology", "pneumoniamnist": "radiology",
        "retinamnist": "ophthalmology", "pathvqa": "pathology", "dermamnist": "dermatology",
    }  # fmt: skip
    assert {s.source: s.domain for s in rows} == expected
    assert all(s.answer == s.domain and s.answer_type == "label" for s in rows)


@pytest.mark.slow
@pytest.mark.needs_data
def test_real_caps_splits_and_medpix_only_in_test(real_ds: RoutingDataset, shared_data: Path) -> None:
    counts = real_ds.counts()
    assert all(n <= 250 for by_split in counts.values() for n in by_split.values())
    assert counts["medpix2"] == {"train": 0, "val": 0, "test": 200}
    assert counts["dermamnist"] == {"train": 250, "val": 250, "test": 250}
    # every image a VQA-RAD test question uses is a test image (203 < the cap), none of them elsewhere
    test_images = {r["image_name"] for r in json.loads((shared_data / "vqa_rad" / "testset.json").read_text())}
    vqa = {sp: keys([s for s in real_ds.samples[sp] if s.source == "vqa_rad"]) for sp in SPLITS}
    assert vqa["test"] == test_images
    assert not (vqa["train"] | vqa["val"]) & test_images and vqa["train"] and vqa["val"]
    # PathVQA keeps the reader's hash split
    for sp in SPLITS:
        assert all(pathvqa_split(k) == sp for k in keys([s for s in real_ds.samples[sp] if s.source == "pathvqa"]))
    # RetinaMNIST has only 120 val images: the cap takes them all
    assert counts["retinamnist"]["val"] == 120 == real_ds.summary["sources"]["retinamnist"]["available"]["val"]
    # PneumoniaMNIST's images shared by train and val are val images
    assert real_ds.summary["sources"]["pneumoniamnist"]["moved_to_held_out"] > 0


def test_the_module_imports_first_in_a_fresh_process() -> None:
    """No import cycle with medrag_ray.config (whose default configs are built at import time)."""
    code = (
        "import medrag_ray.data.routing as r, medrag_ray.config as c; "
        "assert tuple(r.ROUTING_SOURCES) == c.ROUTING_SOURCE_NAMES"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
