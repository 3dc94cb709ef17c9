"""Pretraining of the tiny reader's vision tower on report findings: the stand-in for a pretrained CLIP tower.

A LLaVA-style reader starts from a vision tower pretrained on images (LLaVA-Med: CLIP ViT-L/14-336). The tiny
default reader's tower starts random, and learning to see the findings and to read which finding a question
asks *at the same time*, from one yes/no token per example, leaves the loss at ln 2 for thousands of steps
(measured in the closing notes of issue 4). So the pipeline first trains the tower alone, the way a vision
backbone is pretrained: multi-label binary cross-entropy on the findings each image's report states
(:func:`~medrag_ray.data.synthetic.parse_findings` over the domain's vocabulary: present, negated, or not
mentioned -- masked out). A linear head scores every patch feature the projector receives (the hidden state at
``vision_feature_layer``, CLS dropped: LLaVA's ``default`` feature selection) and the patch logits are pooled by
log-mean-exp, so small findings anywhere in the image (a few exudates) count, and the patch tokens the language
model later reads carry the findings where they are. The reader's language model and
projector are frozen here; ``pretrain_reader`` then trains the whole reader on questions.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from medrag_ray.data.readers.common import load_image
from medrag_ray.data.synthetic import parse_findings, vocabulary
from medrag_ray.models.reader import load_reader, save_reader
from medrag_ray.train.data import distinct_images

logger = logging.getLogger(__name__)

LABELS_FILE = "vision_labels.json"


@dataclass(frozen=True)
class FindingImage:
    """One distinct image with the findings its report states: ``labels`` maps ``domain/finding`` to present."""

    id: str
    domain: str
    image_bytes: bytes
    labels: dict[str, bool]


def label_names(domains: Sequence[str], kinds: Sequence[str]) -> list[str]:
    """``domain/finding`` for every finding of ``kinds`` in each domain's vocabulary (domains sorted)."""
    names = []
    for d in sorted(set(domains)):
        try:
            vocab = vocabulary(d)
        except ValueError as exc:
            raise ValueError(
                f"{exc}. Vision pretraining reads the findings of the synthetic generator's reports; a real reader "
                "starts from a pretrained vision tower and skips this step"
            ) from exc
        names.extend(f"{d}/{key}" for key, v in vocab.items() if v["kind"] in kinds)
    return names


def finding_images(path: str | Path, kinds: Sequence[str]) -> list[FindingImage]:
    """One :class:`FindingImage` per distinct image of a samples Parquet file (rows with a report text)."""
    out = []
    for s, data in distinct_images(Path(path), None, require_text=True):
        allowed = set(label_names([s.domain], kinds))
        found = {f"{s.domain}/{k}": v for k, v in parse_findings(s.text, s.domain).items() if v is not None}
        out.append(FindingImage(s.id, s.domain, data, {k: v for k, v in found.items() if k in allowed}))
    return out


def log_mean_exp(x: Tensor, dim: int) -> Tensor:
    """``log(mean(exp(x)))`` along ``dim``: between the mean and the max of ``x``, so a finding seen in a few
    patches gives a high image logit (multiple-instance pooling) while every patch still gets a gradient."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def masked_bce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean binary cross-entropy over the (example, finding) entries where ``mask`` is 1."""
    if logits.shape != targets.shape or logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask must match")
    n = mask.sum()
    if n == 0:
        raise ValueError("the batch has no labelled finding (mask is all zero); check the reports' vocabulary")
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * mask).sum() / n


class VisionFindingsModel(nn.Module):
    """The reader with a linear findings head on its pooled patch features; only the vision tower and the head
    train (the language model and projector are frozen and receive no gradient)."""

    def __init__(self, reader: nn.Module, labels: Sequence[str]) -> None:
        super().__init__()
        tower = getattr(getattr(reader, "model", None), "vision_tower", None)
        if tower is None:
            raise ValueError(
                f"{type(reader).__name__} has no model.vision_tower; vision pretraining is for the tiny LLaVA-style "
                "reader (a real VLM's vision tower is pretrained already)"
            )
        self.reader = reader
        self.labels = list(labels)
        self.feature_layer = int(reader.config.vision_feature_layer)
        for p in reader.parameters():
            p.requires_grad_(False)
        for p in tower.parameters():
            p.requires_grad_(True)
        self.head = nn.Linear(reader.config.vision_config.hidden_size, len(self.labels))

    @property
    def vision_tower(self) -> nn.Module:
        return self.reader.model.vision_tower

    def patch_features(self, pixel_values: Tensor) -> Tensor:
        """The patch features the projector receives, ``[B, patches, vision_hidden]``."""
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, 1:]

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Image-level finding logits ``[B, L]``: per-patch logits pooled by log-mean-exp (a smooth max)."""
        return log_mean_exp(self.head(self.patch_features(pixel_values)), dim=1)


class FindingImageDataset(Dataset):
    """Yields ``(pixel_values [3, S, S], targets [L], mask [L])`` over the label order ``labels``."""

    def __init__(self, images: Sequence[FindingImage], labels: Sequence[str], image_processor: Any) -> None:
        if not images:
            raise ValueError("FindingImageDataset got no images; check dataset_dir")
        self.images = list(images)
        self.index = {name: i for i, name in enumerate(labels)}
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.images)

    def targets(self, image: FindingImage) -> tuple[Tensor, Tensor]:
        targets, mask = torch.zeros(len(self.index)), torch.zeros(len(self.index))
        for name, present in image.labels.items():
            targets[self.index[name]], mask[self.index[name]] = float(present), 1.0
        return targets, mask

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        image = self.images[i]
        pil = load_image(image.image_bytes, name=f"sample {image.id}")
        pixels = self.image_processor(images=[pil], return_tensors="pt")["pixel_values"][0]
        return (pixels, *self.targets(image))


class ReaderVisionTask:
    """Multi-label findings pretraining of a reader's vision tower; see the module docstring."""

    def __init__(
        self,
        name: str,
        reader_dir: str | Path,
        train_images: Sequence[FindingImage],
        val_images: Sequence[FindingImage],
        labels: Sequence[str],
    ) -> None:
        if not train_images:
            raise ValueError(f"{name}: no training images; check dataset_dir")
        self.name = name
        self.reader_dir = str(reader_dir)
        self.train_images = list(train_images)
        self.val_images = list(val_images)
        self.labels = list(labels)
        self.processor: Any = None

    def build_model(self) -> nn.Module:
        reader, self.processor = load_reader(self.reader_dir, device="cpu", dtype="float32")
        return VisionFindingsModel(reader, self.labels).train()

    def train_dataset(self) -> FindingImageDataset:
        if self.processor is None:
            raise RuntimeError("call build_model() before train_dataset()")
        return FindingImageDataset(self.train_images, self.labels, self.processor.image_processor)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        param = next(p for p in model.parameters() if p.requires_grad)
        pixels, targets, mask = (t.to(param.device) for t in batch)
        logits = model(pixels.to(param.dtype)).float()
        return masked_bce(logits, targets, mask)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Sequence[FindingImage], batch_size: int = 64) -> np.ndarray:
        """Finding probabilities ``[N, L]``."""
        dataset = FindingImageDataset(images, self.labels, self.processor.image_processor)
        param = next(p for p in model.parameters() if p.requires_grad)
        rows = []
        for start in range(0, len(dataset), batch_size):
            pixels = torch.stack([dataset[i][0] for i in range(start, min(len(dataset), start + batch_size))])
            rows.append(torch.sigmoid(model(pixels.to(param.device, param.dtype)).float()).cpu().numpy())
        return np.concatenate(rows)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_images:
            return {}
        was_training = model.training
        model.eval()
        probs = self.predict(model, self.val_images)
        model.train(was_training)
        metrics = finding_accuracy(probs, self.val_images, self.labels)
        return {f"val_accuracy_{k}" if k != "macro" else "val_accuracy": v for k, v in metrics.items()}

    def export(self, model: nn.Module, directory: Path) -> None:
        assert isinstance(model, VisionFindingsModel)
        save_reader(model.reader, self.processor, directory)
        (directory / LABELS_FILE).write_text(json.dumps({"labels": self.labels}, indent=1) + "\n", encoding="utf-8")


def finding_accuracy(probs: np.ndarray, images: Sequence[FindingImage], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy (threshold 0.5) per label over the images that state it, and their unweighted mean (``macro``)."""
    out: dict[str, float] = {}
    for j, name in enumerate(labels):
        rows = [(i, im.labels[name]) for i, im in enumerate(images) if name in im.labels]
        if rows:
            out[name] = float(np.mean([(probs[i, j] > 0.5) == present for i, present in rows]))
    out["macro"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


def make_reader_vision_task(name: str, reader_dir: str, dataset_dir: str, kinds: Sequence[str]) -> ReaderVisionTask:
    """Train on ``samples_train.parquet``'s distinct images, validate on ``samples_val.parquet``'s (if present)."""
    root = Path(dataset_dir)
    train = finding_images(root / "samples_train.parquet", kinds)
    val_path = root / "samples_val.parquet"
    val = finding_images(val_path, kinds) if val_path.is_file() else []
    labels = label_names([im.domain for im in train], kinds)
    return ReaderVisionTask(name, reader_dir, train, val, labels)
