"""The readers on the real files in ../shared/data: every record read, values checked against the raw files."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medrag_ray.data.readers import (
    EMPTY_QUESTIONS,
    MEDMNIST_SPECS,
    MMED_RAG_DATASET_DOMAINS,
    UNPARSEABLE,
    MissingImageWriter,
    iter_medmnist,
    iter_medpix,
    iter_medpix_cases,
    iter_medpix_corpus,
    iter_mmed_rag_alignment,
    iter_mmed_rag_report,
    iter_mmed_rag_retriever,
    iter_mmed_rag_vqa,
    iter_pathvqa,
    iter_vqa_rad,
    load_image,
    pathvqa_split,
    read_side_file,
)
from medrag_ray.data.schema import DOMAINS, ReadStats
from tests.conftest import require

pytestmark = pytest.mark.needs_data


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _independent_yes_no(answer: str) -> str | None:
    """The leading yes/no rule, re-derived by scanning characters (not the reader's regex)."""
    text = answer.strip()
    while text.startswith("-"):
        text = text[1:].strip()
    word = ""
    for ch in text:
        if not ch.isalpha():
            break
        word += ch
    if word.lower() not in ("yes", "no"):
        return None
    rest = text[len(word) :]
    if rest and (rest[0].isalnum() or rest[0] in "_'’-"):
        return None
    after_space = rest.lstrip()
    if after_space != rest and after_space and (after_space[0].isalnum() or after_space[0] == "_"):
        return None
    return word.lower()


def _mmed(shared: Path) -> Path:
    return require(shared, "mmed_rag")


# ------------------------------------------------------------------------------------- MMed-RAG


def test_every_mmed_rag_file_is_covered_by_a_reader(shared_data: Path) -> None:
    root = _mmed(shared_data)
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    covered = {f for f in files if f.startswith(("training/retriever/", "training/alignment/"))
               and f.endswith(".json")}  # fmt: skip
    covered |= {f for f in files if f.startswith("test/vqa/") and f.endswith(".jsonl")}
    covered |= {f for f in files if f.startswith("test/report/") and f.endswith(".json")}
    assert files == covered and len(files) == 18


def test_mmed_rag_retriever_files(shared_data: Path) -> None:
    root = _mmed(shared_data) / "training" / "retriever"
    files = sorted(root.rglob("*.json"))
    assert len(files) == 5
    for file in files:
        raw = json.loads(file.read_text())
        stats = ReadStats()
        docs = list(iter_mmed_rag_retriever(file, stats=stats))
        assert len(docs) == len(raw) == stats.read == stats.kept and stats.rejected == 0
        assert len({d.id for d in docs}) == len(docs)
        assert stats.missing_images == len(raw)  # images are not shipped
        expected_split = "train" if "train" in file.stem else "val"
        for doc, rec in zip(docs, raw, strict=True):
            assert doc.domain == file.parent.name and doc.split == expected_split
            assert doc.text == (rec.get("report") or rec.get("caption")).strip()
            images = rec.get("image_path", rec.get("image"))
            images = [images] if isinstance(images, str) else images
            meta = json.loads(doc.meta)
            assert meta["images"] == images and meta["source_id"] == str(rec["id"])
            assert not doc.image_available and doc.image_path.endswith(images[0])
            if rec.get("image_root"):  # the authors' root is the only one known without image_root=
                assert doc.image_path == f"{rec['image_root']}/{images[0]}"


def test_mmed_rag_retriever_domains_and_mixed_sources(shared_data: Path) -> None:
    docs = list(iter_mmed_rag_retriever(_mmed(shared_data) / "training" / "retriever"))
    assert Counter(d.domain for d in docs) == {"radiology": 6069, "pathology": 7000, "ophthalmology": 1000}
    pathology = [json.loads(d.meta)["text_field"] for d in docs if d.domain == "pathology"]
    assert Counter(pathology) == {"report": 3000, "caption": 4000}
    radiology_lists = Counter(len(json.loads(d.meta)["images"]) for d in docs if d.domain == "radiology")
    assert radiology_lists == {1: 4000, 2: 2069}


def test_mmed_rag_alignment_files(shared_data: Path) -> None:
    files = sorted((_mmed(shared_data) / "training" / "alignment").rglob("*.json"))
    assert len(files) == 3
    for file in files:
        raw = json.loads(file.read_text())
        stats = ReadStats()
        pairs = list(iter_mmed_rag_alignment(file, stats=stats))
        assert len(pairs) == len(raw) and stats.rejected == 0
        assert len({p.id for p in pairs}) == len(pairs)
        for pair, rec in zip(pairs, raw, strict=True):
            human = rec["conversations"][0]["value"]
            assert pair.domain == file.parent.name
            assert pair.pair_type == ("cm" if rec["rejected_noised"] == 1 else "unknown")
            assert pair.rejected_noised == rec["rejected_noised"] and pair.chosen_noised == 0
            assert human.startswith("<image>\n") and pair.prompt == human[len("<image>\n") :]
            assert json.loads(pair.meta)["prompt_raw"] == human
            assert pair.chosen == rec["conversations"][1]["value"]
            assert pair.rejected == rec["rejected_conversations"][1]["value"]
            assert json.loads(pair.meta)["source_id"] == rec["id"]
    cm = Counter(p.pair_type for f in files for p in iter_mmed_rag_alignment(f))
    assert cm == {"cm": 142 + 824 + 233, "unknown": 285 + 1030 + 468}


def test_mmed_rag_vqa_files(shared_data: Path) -> None:
    files = sorted((_mmed(shared_data) / "test" / "vqa").glob("*.jsonl"))
    assert [f.stem for f in files] == ["harvard_test", "iuxray_test", "mimic_test", "pmc-oa_test", "quilt-1m_test"]
    total_unparseable = 0
    for file in files:
        raw = _json_lines(file)
        stats = ReadStats()
        samples = list(iter_mmed_rag_vqa(file, stats=stats))
        assert len(samples) == len(raw) and stats.rejected == 0
        assert len({s.id for s in samples}) == len(samples)
        unparseable = sum(_independent_yes_no(r["answer"]) is None for r in raw)
        empty_q = sum(not any(c.isalnum() for c in r["question"].replace("<image>", "")) for r in raw)
        assert stats.counters.get(UNPARSEABLE, 0) == unparseable
        assert stats.counters.get(EMPTY_QUESTIONS, 0) == empty_q
        total_unparseable += unparseable
        domain = MMED_RAG_DATASET_DOMAINS[file.stem.removesuffix("_test")]
        for sample, rec in zip(samples, raw, strict=True):
            meta = json.loads(sample.meta)
            assert sample.domain == domain and sample.split == "test"
            assert meta["answer_raw"] == rec["answer"] and meta["question_raw"] == rec["question"]
            assert "<image>" not in sample.question and sample.text == rec["report"].strip()
            expected = _independent_yes_no(rec["answer"])
            has_question = any(c.isalnum() for c in sample.question)
            assert meta["question_empty"] is (not has_question)
            if expected is not None and has_question:
                assert (sample.answer, sample.answer_type) == (expected, "closed")
            elif sample.answer_type == "open":
                assert expected is None and sample.answer == rec["answer"].strip()
            else:
                assert sample.answer_type == "" and (not has_question or not sample.answer)
    # The hand-checked figures: pmc-oa and quilt-1m are clean, iuxray carries most of the mess.
    assert total_unparseable == 90


def test_mmed_rag_vqa_known_messy_rows(shared_data: Path) -> None:
    file = require(shared_data, "mmed_rag", "test", "vqa", "iuxray_test.jsonl")
    by_qid = {json.loads(s.meta)["question_id"]: s for s in iter_mmed_rag_vqa(file)}
    assert by_qid["124"].answer_type == "" and by_qid["124"].answer == ""  # empty answer
    assert by_qid["499"].question == "" and by_qid["499"].answer_type == ""  # only "<image>"
    assert by_qid["2496"].question == ")" and by_qid["2496"].answer_type == ""
    dashed = [s for s in by_qid.values() if json.loads(s.meta)["answer_raw"].startswith("- ")]
    parsed = Counter(s.answer for s in dashed if s.answer_type == "closed")
    raw_dashed = Counter(json.loads(s.meta)["answer_raw"].split()[1].strip(".,(").lower() for s in dashed)
    assert parsed == {"no": 28, "yes": 25} and raw_dashed["no"] == 28 and raw_dashed["yes"] == 25
    # "- Can focal consolidation be seen ...? No" echoes the question: not a yes/no answer.
    echoes = [s for s in dashed if s.answer_type != "closed"]
    assert echoes and all(s.answer_type == "open" and "?" in s.answer for s in echoes)


def test_mmed_rag_report_files(shared_data: Path) -> None:
    files = sorted((_mmed(shared_data) / "test" / "report").glob("*.json"))
    assert len(files) == 5
    for file in files:
        raw = json.loads(file.read_text())
        stats = ReadStats()
        samples = list(iter_mmed_rag_report(file, stats=stats))
        assert len(samples) == len(raw) and stats.rejected == 0 and stats.missing_images == len(raw)
        assert len({s.id for s in samples}) == len(samples)
        domain = MMED_RAG_DATASET_DOMAINS[file.stem.removesuffix("_test")]
        for sample, rec in zip(samples, raw, strict=True):
            assert sample.domain == domain and sample.answer_type == "report" and sample.split == "test"
            assert sample.text == (rec.get("report") or rec.get("caption")).strip()
    quilt = next(iter_mmed_rag_report(_mmed(shared_data) / "test" / "report" / "quilt-1m_test.json"))
    meta = json.loads(quilt.meta)
    assert quilt.id == "mmed_rag/quilt-1m_test/test_0" and meta["unnamed_index"] == "1006600"
    assert meta["source_split"] == "val"


def test_mmed_rag_images_resolve_against_image_root(shared_data: Path, tmp_path: Path) -> None:
    """With the images present under image_root, records point at them and the rest are listed missing."""
    file = require(shared_data, "mmed_rag", "test", "vqa", "iuxray_test.jsonl")
    jpg = require(shared_data, "vqa_rad", "images", "synpic54610.jpg")
    first = _json_lines(file)[0]["image"]  # CXR3030_IM-1405/0.png
    (tmp_path / "imgs" / Path(first).parent).mkdir(parents=True)
    shutil.copy(jpg, tmp_path / "imgs" / first)
    stats = ReadStats()
    with MissingImageWriter(tmp_path / "missing.jsonl") as missing:
        samples = list(iter_mmed_rag_vqa(file, image_root=tmp_path / "imgs", stats=stats, missing_images=missing,
                                         limit=30))  # fmt: skip
    available = [s for s in samples if s.image_available]
    assert len(available) == sum(json.loads(s.meta)["images"][0] == first for s in samples) >= 1
    assert all(Path(s.image_path) == (tmp_path / "imgs" / first).absolute() for s in available)
    listed = read_side_file(tmp_path / "missing.jsonl")
    assert stats.missing_images == len(listed) == 30 - len(available)
    assert {row["id"] for row in listed} == {s.id for s in samples if not s.image_available}
    assert all(row["image_path"].startswith(str(tmp_path / "imgs")) for row in listed)
    assert load_image(available[0].image_path).size == Image.open(jpg).size


# --------------------------------------------------------------------------------------- VQA-RAD


@pytest.mark.slow
def test_vqa_rad(shared_data: Path) -> None:
    root = require(shared_data, "vqa_rad")
    train, test = json.loads((root / "trainset.json").read_text()), json.loads((root / "testset.json").read_text())
    stats = ReadStats()
    samples = list(iter_vqa_rad(root, stats=stats))
    assert len(samples) == len(train) + len(test) == 3515
    assert (stats.rejected, stats.missing_images) == (0, 0)
    assert Counter(s.split for s in samples) == {"train": len(train), "test": len(test)}
    assert all(s.domain == "radiology" and s.image_available for s in samples)
    assert samples[0].id == f"vqa_rad/{train[0]['qid']}"
    for sample, rec in zip(samples, train + test, strict=True):
        yes_no = str(rec["answer"]).strip().lower() in ("yes", "no")
        assert sample.answer_type == ("closed" if yes_no else "open")
        assert sample.answer == (str(rec["answer"]).strip().lower() if yes_no else str(rec["answer"]).strip())
        meta = json.loads(sample.meta)
        assert (meta["organ"], meta["question_type"], meta["phrase_type"]) == (
            rec["image_organ"], rec["question_type"], rec["phrase_type"])  # fmt: skip
    closed_test = [s for s in samples if s.split == "test" and s.answer_type == "closed"]
    assert len(closed_test) == 251 and {s.answer for s in closed_test} == {"yes", "no"}
    _check_real_pixels([s.image_path for s in samples[:: len(samples) // 4]])


def _check_real_pixels(paths: list[str]) -> None:
    """The reader's decode equals an independent PIL decode, and the images are real (not blank)."""
    for path in paths:
        ours = np.asarray(load_image(path))
        ref = np.asarray(Image.open(path).convert("RGB"))
        assert ours.shape == ref.shape and ours.shape[0] >= 64 and ours.shape[1] >= 64
        assert np.array_equal(ours[::17, ::13], ref[::17, ::13])
        assert ours.std() > 10


# ---------------------------------------------------------------------------------------- PathVQA


@pytest.mark.slow
def test_pathvqa(shared_data: Path) -> None:
    file = require(shared_data, "pathvqa", "qa.jsonl")
    raw = _json_lines(file)
    stats = ReadStats()
    samples = list(iter_pathvqa(file, stats=stats))
    assert len(samples) == len(raw) == 8168 and (stats.rejected, stats.missing_images) == (0, 0)
    assert len({s.id for s in samples}) == len(samples)
    closed = [s for s in samples if s.answer_type == "closed"]
    assert len(closed) == sum(str(r["answer"]).strip().lower() in ("yes", "no") for r in raw) == 4463
    assert sum(s.answer == "no hyperplasia" and s.answer_type == "open" for s in samples) == 1
    splits_per_image: dict[str, set[str]] = {}
    for sample, rec in zip(samples, raw, strict=True):
        splits_per_image.setdefault(rec["image"], set()).add(sample.split)
        assert sample.split == pathvqa_split(rec["image"])
    assert all(len(s) == 1 for s in splits_per_image.values()), "an image is in two splits"
    image_splits = Counter(next(iter(s)) for s in splits_per_image.values())
    n = len(splits_per_image)
    assert n == 610 and 0.72 < image_splits["train"] / n < 0.88
    assert 0.05 < image_splits["val"] / n < 0.15 and 0.05 < image_splits["test"] / n < 0.15
    _check_real_pixels(sorted({s.image_path for s in samples})[:: 150])


def test_pathvqa_split_is_a_function_of_the_image_name() -> None:
    names = [f"images/{i:040x}.jpg" for i in range(2000)]
    splits = [pathvqa_split(n) for n in names]
    assert splits == [pathvqa_split(n.replace("images/", "/elsewhere/")) for n in names]
    counts = Counter(splits)
    assert 1500 < counts["train"] < 1700 and 130 < counts["val"] < 270 and 130 < counts["test"] < 270
    assert pathvqa_split(names[0], (0.0, 0.0, 1.0)) == "test"
    with pytest.raises(ValueError, match="fractions"):
        pathvqa_split(names[0], (0.5, 0.2, 0.2))


# ----------------------------------------------------------------------------------------- MedPix


def test_medpix(shared_data: Path) -> None:
    root = require(shared_data, "medpix2")
    raw = _json_lines(root / "descriptions_test.jsonl")
    stats = ReadStats()
    samples = list(iter_medpix(root, stats=stats))
    assert len(samples) == len(raw) == 200 and (stats.rejected, stats.missing_images) == (0, 0)
    docs = list(iter_medpix_corpus(root, check_images=False))
    assert [d.id for d in docs] == [s.id for s in samples] == [f"medpix2/{r['image']}" for r in raw]
    for sample, doc, rec in zip(samples, docs, raw, strict=True):
        assert sample.answer_type == "report" and sample.split == "test" == doc.split
        assert sample.text == doc.text == rec["Description"]["Caption"].strip()
        meta = json.loads(doc.meta)
        assert meta["modality"] == rec["Description"]["Modality"] and meta["plane"] == rec["Description"]["Plane"]
        assert meta["location"] == rec["Location"] and meta["sex"] == rec["Description"]["Sex"]
        assert meta["age"] == rec["Description"]["Age"] and meta["case_id"] == rec["U_id"]
        assert Path(sample.image_path).name == f"{rec['image']}.png" and sample.image_available
    assert {s.split for s in iter_medpix(root, split="train", limit=5)} == {"train"}
    _check_real_pixels([s.image_path for s in samples[::50]])


def test_medpix_cases(shared_data: Path) -> None:
    root = require(shared_data, "medpix2")
    raw = _json_lines(root / "data_test.jsonl")
    cases = list(iter_medpix_cases(root))
    assert len(cases) == len(raw) == 69
    for case, rec in zip(cases, raw, strict=True):
        meta = json.loads(case.meta)
        assert case.id == f"medpix2/case/{rec['U_id']}" and meta["images"] == rec["TAC"] + rec["MRI"]
        assert Path(case.image_path).name == f"{(rec['TAC'] + rec['MRI'])[0]}.png" and case.image_available
        for key, heading in (("History", "History"), ("Findings", "Findings"), ("Case Diagnosis", "Diagnosis")):
            if (rec["Case"][key] or "").strip():
                assert f"{heading}: {rec['Case'][key].strip()}" in case.text
        assert meta["diagnosis"] == rec["Case"]["Case Diagnosis"].strip()
    images = {i for c in cases for i in json.loads(c.meta)["images"]}
    described = {json.loads(d.meta)["image_id"] for d in iter_medpix_corpus(root, check_images=False)}
    assert images == described


# --------------------------------------------------------------------------------------- MedMNIST


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "domain", "label_checks"),
    [
        ("retinamnist", "ophthalmology", {0: "DR grade 0", 4: "DR grade 4"}),
        ("pneumoniamnist", "radiology", {0: "normal", 1: "pneumonia"}),
        ("dermamnist", "dermatology", {0: "actinic keratoses and intraepithelial carcinoma", 4: "melanoma",
                                        5: "melanocytic nevi", 6: "vascular lesions"}),
    ],
)  # fmt: skip
def test_medmnist(shared_data: Path, name: str, domain: str, label_checks: dict[int, str]) -> None:
    file = require(shared_data, "medmnist", f"{name}.npz")
    npz = np.load(file)
    stats = ReadStats()
    samples = list(iter_medmnist(file, stats=stats))
    sizes = {s: len(npz[f"{s}_labels"]) for s in ("train", "val", "test")}
    assert Counter(s.split for s in samples) == sizes and stats.rejected == 0
    assert len(samples) == stats.kept == sum(sizes.values())
    assert all(s.domain == domain and s.answer_type == "label" and s.image_available for s in samples)
    spec = MEDMNIST_SPECS[name]
    for label, class_name in label_checks.items():
        assert spec.classes[label] == class_name
    offsets = {"train": 0, "val": sizes["train"], "test": sizes["train"] + sizes["val"]}
    for split in ("train", "val", "test"):
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].ravel()
        for i in (0, len(images) // 2, len(images) - 1):
            sample = samples[offsets[split] + i]
            assert sample.id == f"medmnist/{name}/{split}/{i}"
            assert sample.answer == spec.classes[labels[i]] and json.loads(sample.meta)["label"] == labels[i]
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample.image_bytes))), images[i])
            assert sample.text.endswith(f"{spec.descriptions[labels[i]]}.")
            assert load_image(sample.image_bytes).size == (28, 28)
    answers = Counter(s.answer for s in samples)
    all_labels = np.concatenate([npz[f"{s}_labels"].ravel() for s in ("train", "val", "test")])
    assert answers == {spec.classes[k]: int(v) for k, v in enumerate(np.bincount(all_labels)) if v}
    assert domain in DOMAINS
