"""Vision-tower pretraining of the tiny reader: labels from reports, the masked loss, what trains, export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medrag_ray.config import SyntheticDataConfig, TrainLoopConfig
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.data.synthetic import generate, vocabulary, write_dataset
from medrag_ray.models.reader import ReaderConfig, build_tiny_reader, load_reader, save_reader
from medrag_ray.models.tokenizer import train_bpe_tokenizer
from medrag_ray.reader.vision_pretrain import (
    LABELS_FILE,
    FindingImage,
    FindingImageDataset,
    VisionFindingsModel,
    finding_accuracy,
    finding_images,
    label_names,
    make_reader_vision_task,
    masked_bce,
)
from medrag_ray.train.loop import LocalCoordinator, train
from tests.unit.models.conftest import CORPUS

DOMAINS = ("radiology", "pathology")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SyntheticDataConfig(
        domains=DOMAINS, n_per_domain=100, n_phenotypes=3, image_size=32, split_fractions=(0.6, 0.3, 0.1), seed=3
    )
    return write_dataset(generate(cfg), tmp_path_factory.mktemp("vision") / "data")


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(CORPUS * 4, vocab_size=400)
    model, processor = build_tiny_reader(ReaderConfig(image_size=32, patch_size=8), tokenizer)
    return save_reader(model, processor, tmp_path_factory.mktemp("vision") / "reader")


def test_label_names_are_the_vocabulary_findings_of_the_kinds() -> None:
    visible = label_names(["radiology", "pathology", "radiology"], ["visible"])
    expected = [f"pathology/{k}" for k, v in vocabulary("pathology").items() if v["kind"] == "visible"]
    expected += [f"radiology/{k}" for k, v in vocabulary("radiology").items() if v["kind"] == "visible"]
    assert visible == expected and "radiology/cardiomegaly" in visible
    both = label_names(["radiology"], ["visible", "subtle"])
    assert len(both) == len(vocabulary("radiology")) and "radiology/nodule" in both
    with pytest.raises(ValueError, match="pretrained vision tower"):
        label_names(["chest_ct"], ["visible"])


def test_finding_images_read_the_case_findings_from_the_reports(dataset_dir: Path) -> None:
    path = dataset_dir / "samples_train.parquet"
    images = finding_images(path, ["visible"])
    samples = read_parquet(path, Sample)
    cases = {json.loads(s.meta)["case_id"]: s for s in samples}
    assert len(images) == len(cases)  # one per distinct image, not one per question
    for im in images:
        meta = json.loads(next(s for s in samples if s.id == im.id).meta)
        truth = {f"{im.domain}/{k}": v for k, v in meta["findings"].items()}
        visible = set(label_names([im.domain], ["visible"]))
        assert im.labels == {k: v for k, v in truth.items() if k in visible}
    assert {v for im in images for v in im.labels.values()} == {True, False}


def test_masked_bce_by_hand_and_masked_entries_do_not_count() -> None:
    logits = torch.tensor([[2.0, -1.0, 5.0], [0.0, 3.0, -4.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    by_hand = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0)) + math.log(2.0) + math.log1p(math.exp(-4.0))) / 4
    assert masked_bce(logits, targets, mask).item() == pytest.approx(by_hand, rel=1e-6)
    moved = logits.clone()
    moved[0, 2], moved[1, 1] = -30.0, -30.0  # masked entries
    assert masked_bce(moved, targets, mask).item() == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="no labelled finding"):
        masked_bce(logits, targets, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="must match"):
        masked_bce(logits, targets[:1], mask)


def test_dataset_targets_follow_the_label_order() -> None:
    labels = ["radiology/a", "radiology/b", "radiology/c"]
    image = FindingImage("x", "radiology", b"", {"radiology/c": True, "radiology/a": False})
    targets, mask = FindingImageDataset([image], labels, None).targets(image)
    assert targets.tolist() == [0.0, 0.0, 1.0] and mask.tolist() == [1.0, 0.0, 1.0]


def test_head_reads_what_the_projector_receives_and_only_the_tower_trains(reader_dir: Path) -> None:
    reader, processor = load_reader(reader_dir)
    model = VisionFindingsModel(reader, ["radiology/a", "radiology/b"])
    pixels = torch.randn(3, 3, 32, 32)
    seen: list[torch.Tensor] = []
    hook = reader.model.multi_modal_projector.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        reader.model.get_image_features(pixel_values=pixels)
        patches = model.patch_features(pixels)
        logits = model(pixels)
    hook.remove()
    assert torch.allclose(patches, seen[0], atol=1e-6)
    per_patch = model.head(patches)  # [B, P, L]: pooled by log-mean-exp, between the mean and the max
    assert torch.allclose(logits, torch.logsumexp(per_patch, 1) - math.log(per_patch.shape[1]), atol=1e-6)
    assert torch.all(per_patch.mean(1) <= logits + 1e-6) and torch.all(logits <= per_patch.amax(1) + 1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tower = {n for n in trainable if n.startswith("reader.model.vision_tower.")}
    assert tower and trainable - tower == {"head.weight", "head.bias"}
    model(pixels).sum().backward()
    assert all(p.grad is None for n, p in reader.named_parameters() if "vision_tower" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reader.model.vision_tower.parameters())
    with pytest.raises(ValueError, match="vision_tower"):
        VisionFindingsModel(torch.nn.Linear(2, 2), ["a"])


def test_finding_accuracy_by_hand() -> None:
    labels = ["d/a", "d/b"]
    images = [
        FindingImage("1", "d", b"", {"d/a": True, "d/b": False}),
        FindingImage("2", "d", b"", {"d/a": False}),
        FindingImage("3", "d", b"", {"d/a": True, "d/b": True}),
    ]
    probs = np.array([[0.9, 0.2], [0.7, 0.99], [0.6, 0.1]])
    acc = finding_accuracy(probs, images, labels)
    assert acc["d/a"] == pytest.approx(2 / 3) and acc["d/b"] == pytest.approx(1 / 2)
    assert acc["macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_training_learns_the_findings_and_exports_a_reader(dataset_dir: Path, reader_dir: Path, tmp_path: Path) -> None:
    task = make_reader_vision_task("vision", str(reader_dir), str(dataset_dir), ["visible"])
    assert task.labels == label_names(DOMAINS, ["visible"]) and task.val_images
    settings = TrainLoopConfig(epochs=30, batch_size=16, lr=3e-3, weight_decay=0.0, warmup_fraction=0.05, zero_stage=0)
    coordinator = LocalCoordinator(tmp_path / "run")
    state = train(task, settings, coordinator)
    history = state["history"]
    assert history[-1]["val_accuracy"] > 0.7, history  # chance is ~0.5 (visible prevalence 0.5)
    assert history[-1]["val_accuracy"] > history[0]["val_accuracy"] + 0.1
    exported = coordinator.latest() / "model"
    assert json.loads((exported / LABELS_FILE).read_text())["labels"] == task.labels
    after, _ = load_reader(exported)
    before, _ = load_reader(reader_dir)
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    changed = {n for n in b if not torch.equal(b[n], a[n])}
    assert changed and all("vision_tower" in n for n in changed)
    assert len(changed) > 0.5 * sum("vision_tower" in n for n in b)
