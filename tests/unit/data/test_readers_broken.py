"""Broken inputs written to tmp_path: every error names file, line/record and field; skip mode keeps the good."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medrag_ray.data.readers import (
    EMPTY_QUESTIONS,
    UNPARSEABLE,
    MissingImageWriter,
    RejectWriter,
    iter_medmnist,
    iter_medpix,
    iter_mmed_rag_alignment,
    iter_mmed_rag_retriever,
    iter_mmed_rag_vqa,
    iter_pathvqa,
    iter_vqa_rad,
    read_side_file,
)
from medrag_ray.data.schema import ReadStats, RecordError


def _png(color: int = 120, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _qa(image: str, question: str = "is there necrosis?", answer: str = "yes") -> str:
    return json.dumps({"image": image, "question": question, "answer": answer, "answer_type": "CLOSED",
                       "question_type": "YESNO"})  # fmt: skip


@pytest.fixture()
def pathvqa_dir(tmp_path: Path) -> Path:
    images = tmp_path / "pathvqa" / "images"
    images.mkdir(parents=True)
    (images / "good.png").write_bytes(_png())
    (images / "other.png").write_bytes(_png(30))
    jpeg = _jpeg()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "text.jpg").write_text("this is not an image")
    return tmp_path / "pathvqa"


BROKEN_LINES: list[tuple[str, str, str]] = [
    # (line, field, words in the reason)
    ('{"image": "images/good.png", "question": "is it?", "answer": "yes"', "<json>", "malformed JSON"),
    (json.dumps({"image": "images/good.png", "answer": "no"}), "question", "is missing"),
    (_qa("images/good.png", question="   "), "question", "is empty"),
    (_qa("images/truncated.jpg"), "image", "truncated"),
    (_qa("images/text.jpg"), "image", "cannot decode"),
]


@pytest.mark.parametrize(("line", "field", "words"), BROKEN_LINES)
def test_raise_mode_names_file_line_and_field(pathvqa_dir: Path, line: str, field: str, words: str) -> None:
    file = _write_jsonl(pathvqa_dir / "qa.jsonl", [_qa("images/good.png"), line, _qa("images/other.png")])
    with pytest.raises(RecordError) as err:
        list(iter_pathvqa(file))
    message = str(err.value)
    assert err.value.field_name == field
    assert message.startswith(f"{file}, line 2: field '{field}': ") and words in message
    if field == "image":
        assert str(pathvqa_dir / "images") in message  # the unreadable image file is named too


def test_skip_mode_rejects_exactly_the_bad_lines(pathvqa_dir: Path, tmp_path: Path) -> None:
    good = [_qa("images/good.png"), _qa("images/other.png", "is it benign?", "no"), _qa("images/good.png", "what?",
            "necrosis")]  # fmt: skip
    missing = _qa("images/absent.png")
    lines = [good[0], *[b[0] for b in BROKEN_LINES], missing, good[1], "", good[2]]
    file = _write_jsonl(pathvqa_dir / "qa.jsonl", lines)
    stats = ReadStats()
    with RejectWriter(tmp_path / "rejects.jsonl") as rej, MissingImageWriter(tmp_path / "missing.jsonl") as miss:
        samples = list(iter_pathvqa(file, stats=stats, on_error="skip", rejects=rej, missing_images=miss))
    # every good record and the one with a missing image are kept
    assert [s.question for s in samples] == ["is there necrosis?", "is there necrosis?", "is it benign?", "what?"]
    assert [s.image_available for s in samples] == [True, False, True, True]
    assert [(s.answer, s.answer_type) for s in samples] == [("yes", "closed")] * 2 + [("no", "closed"),
                                                                                      ("necrosis", "open")]  # fmt: skip
    assert (stats.read, stats.kept, stats.rejected, stats.missing_images) == (9, 4, 5, 1)
    assert stats.rejects_by_field == {"<json>": 1, "question": 2, "image": 2}
    rejects = read_side_file(tmp_path / "rejects.jsonl")
    assert [r["location"] for r in rejects] == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    assert [r["field"] for r in rejects] == [b[1] for b in BROKEN_LINES]
    for row, (line, _field, words) in zip(rejects, BROKEN_LINES, strict=True):
        assert row["file"] == str(file) and words in row["reason"] and row["raw"] == line
        assert row["source"] == "pathvqa"
    (miss_row,) = read_side_file(tmp_path / "missing.jsonl")
    assert miss_row["location"] == "line 7" and miss_row["image_path"].endswith("images/absent.png")


def test_unknown_domain_folder(tmp_path: Path) -> None:
    root = tmp_path / "retriever"
    good = [{"id": "a", "report": "Normal chest.", "image_path": ["a/0.png", "a/1.png"]},
            {"id": 7, "caption": "H&E stain.", "image": "b.jpg"}]  # fmt: skip
    (root / "radiology").mkdir(parents=True)
    (root / "radiology" / "rad_train.json").write_text(json.dumps(good))
    (root / "cardiology").mkdir()
    (root / "cardiology" / "cardio_train.json").write_text(json.dumps(good))
    with pytest.raises(RecordError) as err:
        list(iter_mmed_rag_retriever(root))
    assert err.value.field_name == "domain" and "'cardiology'" in str(err.value)
    assert str(err.value).startswith(f"{root / 'cardiology' / 'cardio_train.json'}, record 0: field 'domain'")
    stats = ReadStats()
    with RejectWriter(tmp_path / "rej.jsonl") as rej:
        docs = list(iter_mmed_rag_retriever(root, stats=stats, on_error="skip", rejects=rej))
    assert [d.id for d in docs] == ["mmed_rag/rad_train/a", "mmed_rag/rad_train/7"]
    assert [d.text for d in docs] == ["Normal chest.", "H&E stain."] and {d.domain for d in docs} == {"radiology"}
    rejects = read_side_file(tmp_path / "rej.jsonl")
    assert [(r["field"], r["location"]) for r in rejects] == [("domain", "record 0"), ("domain", "record 1")]
    assert stats.rejects_by_field == {"domain": 2} and stats.missing_images == 2
    assert [d.domain for d in iter_mmed_rag_retriever(root / "cardiology", domain="pathology")] == ["pathology"] * 2


def test_retriever_record_problems(tmp_path: Path) -> None:
    file = tmp_path / "pathology" / "p_val.json"
    file.parent.mkdir()
    rows = [{"id": 1, "image": "x.jpg"}, {"id": 2, "report": "ok", "image_path": []}, {"report": "no id", "image": "y"},
            {"id": 3, "report": "fine", "image": "z.jpg", "image_root": "/nowhere"}, "not an object"]  # fmt: skip
    file.write_text(json.dumps(rows))
    stats = ReadStats()
    with RejectWriter(tmp_path / "rej.jsonl") as rej:
        docs = list(iter_mmed_rag_retriever(file, stats=stats, on_error="skip", rejects=rej))
    assert [(d.id, d.split, d.image_path) for d in docs] == [("mmed_rag/p_val/3", "val", "/nowhere/z.jpg")]
    rejects = read_side_file(tmp_path / "rej.jsonl")
    assert [(r["location"], r["field"]) for r in rejects] == [
        ("record 0", "report"), ("record 1", "image_path"), ("record 2", "id"), ("record 4", "<record>")
    ]  # fmt: skip
    assert "'report' or 'caption'" in rejects[0]["reason"]


def test_malformed_json_array_file(tmp_path: Path) -> None:
    file = tmp_path / "radiology" / "r_train.json"
    file.parent.mkdir()
    file.write_text('[{"id": 1, "report": "a", "image": "x"},\n {"id": 2, "report": "b" "image": "y"}]')
    with pytest.raises(RecordError, match=r"line 2 column \d+: field '<json>': malformed JSON"):
        list(iter_mmed_rag_retriever(file))
    stats = ReadStats()
    assert list(iter_mmed_rag_retriever(file, stats=stats, on_error="skip")) == []
    assert (stats.read, stats.rejected) == (1, 1)


def test_mmed_rag_vqa_messy_answers(tmp_path: Path) -> None:
    answers = ["Yes.", "- No.", "No. (Because prominent radial retinal folds are also mentioned.)", "Yes  ",
               "No, the lungs are clear.", "No answer can be provided as the report does not mention it.",
               "The report does not mention it, so likely no.", ""]  # fmt: skip
    rows = [json.dumps({"question_id": i + 1, "question": f"Is finding {i} present? \n<image>", "answer": a,
                        "image": f"CXR{i}/0.png", "report": "Lungs are clear."})
            for i, a in enumerate(answers)]  # fmt: skip
    rows.append(json.dumps({"question_id": 99, "question": " \n<image>", "answer": "Yes", "image": "c.png",
                            "report": "r"}))  # fmt: skip
    file = _write_jsonl(tmp_path / "vqa" / "iuxray_test.jsonl", rows)
    stats = ReadStats()
    samples = list(iter_mmed_rag_vqa(file, stats=stats))
    assert [(s.answer, s.answer_type) for s in samples] == [
        ("yes", "closed"), ("no", "closed"), ("no", "closed"), ("yes", "closed"), ("no", "closed"),
        ("No answer can be provided as the report does not mention it.", "open"),
        ("The report does not mention it, so likely no.", "open"), ("", ""), ("yes", ""),
    ]  # fmt: skip
    assert stats.counters == {UNPARSEABLE: 3, EMPTY_QUESTIONS: 1}
    assert samples[0].question == "Is finding 0 present?" and samples[0].domain == "radiology"
    assert [json.loads(s.meta)["answer_raw"] for s in samples[: len(answers)]] == answers


def test_mmed_rag_vqa_unknown_dataset_and_missing_fields(tmp_path: Path) -> None:
    row = {"question_id": 1, "question": "Is it normal?\n<image>", "answer": "Yes", "image": "a.png"}
    file = _write_jsonl(tmp_path / "chexpert_test.jsonl", [json.dumps(row)])
    with pytest.raises(RecordError, match=r"line 1: field 'domain': dataset 'chexpert'"):
        list(iter_mmed_rag_vqa(file))
    assert next(iter_mmed_rag_vqa(file, domain="radiology")).answer == "yes"
    bad = _write_jsonl(tmp_path / "mimic_test.jsonl", [json.dumps({**row, "answer": None}),
                                                       json.dumps({k: v for k, v in row.items() if k != "question"})])
    stats = ReadStats()
    assert list(iter_mmed_rag_vqa(bad, stats=stats, on_error="skip")) == []
    assert stats.rejects_by_field == {"answer": 1, "question": 1}


def _pair(**over: object) -> dict:
    base = {
        "id": "x", "image": "CXR1/0.png", "rejected_noised": 1,
        "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Clear."}],
        "rejected_conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Bad."}],
    }  # fmt: skip
    base.update(over)
    return base


def test_alignment_problems(tmp_path: Path) -> None:
    file = tmp_path / "radiology" / "radiology_report.json"
    file.parent.mkdir()
    rows = [
        _pair(),
        _pair(rejected_noised=0, chosen_noised=1),
        _pair(rejected_conversations=None),
        _pair(conversations=[{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]),
        _pair(rejected_noised=2),
        _pair(rejected_conversations=[{"from": "human", "value": "<image>\nOther."}, {"from": "gpt", "value": "z"}]),
        _pair(conversations=[{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "Clear."}],
              rejected_conversations=[{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "B"}]),
        _pair(image=None),
    ]  # fmt: skip
    file.write_text(json.dumps(rows))
    stats = ReadStats()
    with RejectWriter(tmp_path / "rej.jsonl") as rej:
        pairs = list(iter_mmed_rag_alignment(file, stats=stats, on_error="skip", rejects=rej))
    assert [(p.id, p.pair_type, p.chosen_noised, p.rejected_noised) for p in pairs] == [
        ("mmed_rag/radiology_report/0", "cm", 0, 1), ("mmed_rag/radiology_report/1", "unknown", 1, 0)
    ]  # fmt: skip
    assert pairs[0].prompt == "Describe." and pairs[0].chosen == "Clear." and pairs[0].rejected == "Bad."
    rejects = read_side_file(tmp_path / "rej.jsonl")
    assert [(r["location"], r["field"]) for r in rejects] == [
        ("record 2", "rejected_conversations"), ("record 3", "conversations"), ("record 4", "rejected_noised"),
        ("record 5", "rejected_conversations"), ("record 6", "conversations"), ("record 7", "image"),
    ]  # fmt: skip


def test_vqa_rad_empty_question_and_missing_image_name(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(_jpeg())
    rows = [{"qid": 1, "image_name": "a.jpg", "question": "Is this a CT?", "answer": "No", "answer_type": "CLOSED"},
            {"qid": 2, "image_name": "a.jpg", "question": "", "answer": "yes", "answer_type": "CLOSED"},
            {"qid": 3, "question": "Where?", "answer": 3, "answer_type": "OPEN"}]  # fmt: skip
    (tmp_path / "testset.json").write_text(json.dumps(rows))
    with pytest.raises(RecordError) as err:
        list(iter_vqa_rad(tmp_path))
    assert str(err.value).startswith(f"{tmp_path / 'testset.json'}, record 1: field 'question': is empty")
    stats = ReadStats()
    samples = list(iter_vqa_rad(tmp_path, stats=stats, on_error="skip"))
    assert [(s.id, s.split, s.answer, s.answer_type) for s in samples] == [("vqa_rad/1", "test", "no", "closed")]
    assert stats.rejects_by_field == {"question": 1, "image_name": 1}


def test_medpix_missing_caption(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "MPX1_synpic1.png").write_bytes(_png())
    good = {"U_id": "MPX1", "image": "MPX1_synpic1", "Type": "CT", "Description": {"Caption": "Mass.", "Age": "5"}}
    bad = {"U_id": "MPX1", "image": "MPX1_synpic2", "Type": "CT", "Description": {"Caption": None}}
    file = _write_jsonl(tmp_path / "descriptions_test.jsonl", [json.dumps(good), json.dumps(bad)])
    with pytest.raises(RecordError, match=r"line 2: field 'Caption': is missing"):
        list(iter_medpix(file))
    (sample,) = iter_medpix(tmp_path, on_error="skip")
    assert sample.text == "Mass." and sample.image_available and sample.split == "test"


def test_medmnist_bad_labels_and_unknown_dataset(tmp_path: Path) -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=images, train_labels=np.array([[0], [5], [1]]),
             val_images=images)  # fmt: skip
    stats = ReadStats()
    with RejectWriter(tmp_path / "rej.jsonl") as rej:
        samples = list(iter_medmnist(tmp_path / "pneumoniamnist.npz", stats=stats, on_error="skip", rejects=rej))
    assert [s.answer for s in samples] == ["normal", "pneumonia"]
    rejects = read_side_file(tmp_path / "rej.jsonl")
    assert [(r["location"], r["field"]) for r in rejects] == [("train_images[1]", "train_labels"),
                                                               ("val_labels", "val_labels")]  # fmt: skip
    np.savez(tmp_path / "organamnist.npz", train_images=images, train_labels=np.array([[0], [1], [2]]))
    with pytest.raises(RecordError, match="unknown MedMNIST dataset 'organamnist'"):
        list(iter_medmnist(tmp_path / "organamnist.npz"))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    stats = ReadStats()
    assert list(iter_medmnist(tmp_path / "broken.npz", stats=stats, on_error="skip")) == []
    assert stats.rejects_by_field == {"<npz>": 1}
