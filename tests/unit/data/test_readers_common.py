"""The reader machinery without real data: yes/no rule, tags, splits, images, side files, error policy."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medrag_ray.data.readers import (
    MissingImageWriter,
    RawRecord,
    ReadContext,
    RejectWriter,
    load_image,
    normalize_yes_no,
    read_side_file,
    read_source,
    resolve_image_path,
    split_from_name,
    strip_image_tag,
    strip_leading_image_tag,
)
from medrag_ray.data.readers.common import encode_png, iter_json_array, iter_jsonl
from medrag_ray.data.readers.registry import SOURCE_NAMES, source_spec
from medrag_ray.data.schema import CorpusDoc, PreferencePair, ReadStats, RecordError, Sample


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("Yes.", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("YES", "yes"),
        ("Yes ", "yes"),
        ("No  ", "no"),
        ("  Yes.  ", "yes"),
        ("- No.", "no"),
        ("- Yes", "yes"),
        ("-No", "no"),
        ("No. (The summary indicates it is a future consideration.)", "no"),
        ("No (since the cardiomediastinal silhouette is reported as normal).", "no"),
        ("Yes  (based on the report implying clear lungs)", "yes"),
        ("No, the lungs are clear.", "no"),
        ("No; the report does not mention rib fractures.", "no"),
        ("No ('osseous structures are normal')", "no"),
        ("No answer can be provided as the report does not mention it.", None),
        ("No information provided, so the answer cannot be determined.", None),
        ("No mention of rib fractures was made in the report.", None),
        ("Not mentioned", None),
        ("Nope.", None),
        ("The report does not mention any masses, so the answer would be no.", None),
        ("This information is not provided, so I cannot provide a yes or no answer.", None),
        ("1. Does the chest X-ray show consolidation?", None),
        ("Borderline.", None),
        ("", None),
        ("   ", None),
    ],
)
def test_leading_yes_no_rule_on_messy_answers(answer: str, expected: str | None) -> None:
    assert normalize_yes_no(answer, mode="leading") == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("yes", "yes"), ("No", "no"), ("YES.", "yes"), (" no ", "no"), ("no hyperplasia", None),
     ("No, the lungs are clear.", None), ("yes and no", None), ("ct", None)],
)  # fmt: skip
def test_exact_yes_no_rule_keeps_open_answers_open(answer: str, expected: str | None) -> None:
    assert normalize_yes_no(answer, mode="exact") == expected


def test_normalize_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        normalize_yes_no("yes", mode="fuzzy")  # type: ignore[arg-type]


def test_image_tags() -> None:
    assert strip_image_tag("Has the patient glaucoma?\n<image>") == "Has the patient glaucoma?"
    assert strip_image_tag("Is it normal? \n<image>") == "Is it normal?"
    assert strip_image_tag(" \n<image>") == ""
    assert strip_leading_image_tag("<image>\nYou are provided with...\nQuestion: x?") == (
        "You are provided with...\nQuestion: x?"
    )
    assert strip_leading_image_tag("No tag <image> here") == "No tag <image> here"


@pytest.mark.parametrize(
    ("name", "split"),
    [("pathology_train", "train"), ("harvard_val_1000", "val"), ("iuxray_test", "test"), ("trainset", "train"),
     ("testset", "test"), ("descriptions_test", "test"), ("radiology_report", None), ("train_vs_test", None)],
)  # fmt: skip
def test_split_from_name(name: str, split: str | None) -> None:
    assert split_from_name(name) == split


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_returns_rgb_pixels(tmp_path: Path) -> None:
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    path = tmp_path / "g.png"
    path.write_bytes(_png_bytes(gray))
    for src in (path, str(path), path.read_bytes()):
        im = load_image(src)
        assert im.mode == "RGB" and im.size == (10, 12)
        arr = np.asarray(im)
        assert arr[3, 7].tolist() == [37, 37, 37]


def test_load_image_scales_16_bit_grayscale(tmp_path: Path) -> None:
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    out = np.asarray(load_image(path))[:, :, 0]
    assert out.tolist() == [[0, 64], [128, 255]]


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    good = _png_bytes(np.full((32, 32, 3), 200, dtype=np.uint8))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[: len(good) // 2])
    not_image = tmp_path / "note.jpg"
    not_image.write_text("not an image")
    for bad in (truncated, not_image):
        with pytest.raises(RecordError, match="cannot decode") as err:
            load_image(bad)
        assert str(bad) in str(err.value) and err.value.field_name == "image"
    with pytest.raises(RecordError, match="does not exist"):
        load_image(tmp_path / "absent.png")


def test_encode_png_round_trips() -> None:
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 256, (28, 28), dtype=np.uint8), rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)):
        back = np.asarray(Image.open(io.BytesIO(encode_png(arr))))
        assert np.array_equal(back, arr)
    one_channel = rng.integers(0, 256, (5, 6, 1), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(one_channel)))), one_channel[:, :, 0])


def test_resolve_image_path_tries_roots_in_order(tmp_path: Path) -> None:
    (tmp_path / "b" / "x").mkdir(parents=True)
    (tmp_path / "b" / "x" / "0.png").write_bytes(b"")
    path, found = resolve_image_path("x/0.png", [tmp_path / "a", tmp_path / "b"])
    assert found and path == (tmp_path / "b" / "x" / "0.png").absolute()
    path, found = resolve_image_path("x/1.png", [tmp_path / "a", None, tmp_path / "b"])
    assert not found and path == tmp_path / "a" / "x" / "1.png"
    path, found = resolve_image_path("x/1.png", [None, ""])
    assert not found and path == Path("x/1.png")


def test_jsonl_stream_marks_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": \n{"a": 3}\n\xff\xfe\n')
    raws = list(iter_jsonl(path))
    assert [r.location for r in raws] == ["line 1", "line 3", "line 4", "line 5"]
    assert [r.index for r in raws] == [0, 1, 2, 3]
    assert raws[0].data == {"a": 1} and raws[0].error is None
    assert raws[1].error is not None and "malformed JSON" in str(raws[1].error) and "line 3" in str(raws[1].error)
    assert raws[3].error is not None and "UTF-8" in str(raws[3].error)


def test_json_array_errors_are_file_level(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"a": 1},\n {"a": ]')
    (raw,) = list(iter_json_array(bad))
    assert raw.error is not None and "line 2" in raw.location and raw.index == -1
    obj = tmp_path / "obj.json"
    obj.write_text('{"a": 1}')
    (raw,) = list(iter_json_array(obj))
    assert raw.error is not None and "expected a JSON array" in str(raw.error)


def _doc(raw: RawRecord) -> CorpusDoc:
    data = raw.data
    if "text" not in data:
        raise RecordError("text", "is missing")
    return CorpusDoc(id=str(data["id"]), domain="radiology", split="train", source="t", text=data["text"].strip(),
                     image_path=data.get("image", ""))  # fmt: skip


def _raws(rows: list[dict]) -> list[RawRecord]:
    return [RawRecord(Path("/data/f.json"), f"record {i}", i, data=row) for i, row in enumerate(rows)]


def test_context_skip_mode_counts_writes_and_keeps_the_good(tmp_path: Path) -> None:
    rows = [{"id": 1, "text": "a"}, {"id": 2}, {"id": 1, "text": "dup"}, {"id": 3, "text": "c", "image": "x.png"},
            {"id": 4, "text": 5}]  # fmt: skip
    stats = ReadStats()
    with RejectWriter(tmp_path / "rej.jsonl") as rej, MissingImageWriter(tmp_path / "miss.jsonl") as miss:
        ctx = ReadContext("t", stats=stats, on_error="skip", rejects=rej, missing_images=miss)
        kept = list(ctx.records(_raws(rows), _doc))
    assert [d.id for d in kept] == ["1", "3"]
    assert (stats.read, stats.kept, stats.rejected, stats.missing_images) == (5, 2, 3, 1)
    assert stats.rejects_by_field == {"text": 1, "id": 1, "<record>": 1}
    rejects = read_side_file(tmp_path / "rej.jsonl")
    assert [(r["location"], r["field"]) for r in rejects] == [("record 1", "text"), ("record 2", "id"),
                                                               ("record 4", "<record>")]  # fmt: skip
    assert all(r["file"] == "/data/f.json" for r in rejects)
    assert "duplicate id '1'" in rejects[1]["reason"] and "record 0" in rejects[1]["reason"]
    assert json.loads(rejects[0]["raw"]) == {"id": 2}
    assert read_side_file(tmp_path / "miss.jsonl") == [
        {"source": "t", "file": "/data/f.json", "location": "record 3", "id": "3", "image_path": "x.png"}
    ]


def test_context_raise_mode_names_file_location_field() -> None:
    ctx = ReadContext("t")
    with pytest.raises(RecordError) as err:
        list(ctx.records(_raws([{"id": 1, "text": "a"}, {"id": 2}]), _doc))
    assert err.value.field_name == "text"
    assert str(err.value).startswith("/data/f.json, record 1: field 'text': is missing")
    assert "skip_bad" in str(err.value)


def test_context_limit_counts_kept_records() -> None:
    stats = ReadStats()
    ctx = ReadContext("t", stats=stats, on_error="skip", limit=2)
    rows = [{"id": 1, "text": "a"}, {"id": 2}, {"id": 3, "text": "b"}, {"id": 4, "text": "c"}]
    assert [d.id for d in ctx.records(_raws(rows), _doc)] == ["1", "3"]
    assert (stats.read, stats.kept, stats.rejected) == (3, 2, 1)


def test_context_validates_options() -> None:
    with pytest.raises(ValueError, match="on_error"):
        ReadContext("t", on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        ReadContext("t", limit=-1)


def test_registry_names_classes_and_option_check(tmp_path: Path) -> None:
    assert set(SOURCE_NAMES) == {
        "mmed_rag_retriever", "mmed_rag_alignment", "mmed_rag_vqa", "mmed_rag_report", "vqa_rad", "pathvqa",
        "medpix", "medpix_corpus", "medpix_cases", "medmnist",
    }  # fmt: skip
    assert source_spec("mmed_rag_alignment").record_cls is PreferencePair
    assert source_spec("mmed_rag_retriever").record_cls is CorpusDoc
    assert source_spec("medpix_cases").record_cls is CorpusDoc
    assert source_spec("medmnist").record_cls is Sample
    assert "image_root" not in source_spec("medmnist").options()
    with pytest.raises(TypeError, match="does not take option"):
        read_source("medmnist", tmp_path, image_root=tmp_path)
    with pytest.raises(KeyError, match="unknown source"):
        read_source("chexpert", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source("pathvqa", tmp_path / "nope")
    with pytest.raises(ValueError, match="split"):
        read_source("mmed_rag_vqa", tmp_path, split="holdout")
    with pytest.raises(ValueError, match="domain"):
        read_source("mmed_rag_vqa", tmp_path, domain="cardiology")
