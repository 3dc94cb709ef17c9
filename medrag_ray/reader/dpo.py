"""RAG-based preference fine-tuning (RAG-PT, MMed-RAG §2.3) of the reader: DPO with LoRA and a frozen reference.

Data: :class:`~medrag_ray.data.schema.PreferencePair` rows (the output of ``jobs/mine_prefs.py``, or MMed-RAG's
released alignment files converted with ``jobs/convert_data.py``). A pair's two sides share the prompt (the
retrieval prompt x_t + x_r) and differ either in the image (D_cm: the same answer on x_v and on the noisy x_v*)
or in the answer (D_oa: the right and the wrong answer on x_v); :func:`side_inputs` builds each side's input.
A side marked noised uses the pair's stored x_v* (``noised_image_bytes``), or -- for released files, whose
trainer makes its own -- the pair's image noised by Eq. 2 with a per-pair seed.

Model: the reader with peft LoRA (:func:`~medrag_ray.reader.sft.add_lora`); the reference pi_ref is the same
model with its adapters disabled (the reference code's choice), so no second copy is held. Each step runs the
chosen and rejected sides of the batch as one forward pass of 2B rows for the policy and one, without gradient,
for the reference, and minimises :func:`~medrag_ray.losses.dpo.dpo_loss` (Eq. 3/4) on the summed answer-token
log-probabilities. Why our loop and not trl's ``DPOTrainer``: a D_cm pair has a different image per side, which
trl's single-image-per-prompt VLM collator cannot express, and our loop already brings Ray Train, DeepSpeed ZeRO,
per-epoch checkpoints, resume and worker-failure recovery.

Validation: DPO loss, reward accuracy and margin on held-out pairs, and how often the policy itself gives the
chosen side the higher log-probability (``val_policy_prefers_chosen``; before any training it is the reader's
own preference).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from medrag_ray.config import LoraSettings
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import PreferencePair, read_parquet
from medrag_ray.losses.dpo import dpo_loss, sequence_logps
from medrag_ray.mining.noise import noisy_image, sample_seed
from medrag_ray.models.reader import load_reader
from medrag_ray.reader.engine import collate, encode, pad_id, to_model, with_positions
from medrag_ray.reader.prompts import ReaderInput, single_image_input
from medrag_ray.reader.sft import add_lora, export_lora_reader

logger = logging.getLogger(__name__)

IMAGE_SIDE_KINDS = ("cm",)
"""Pair kinds whose sides differ in the image (stage 1 of RAG-PT); the others differ in the answer."""


def pair_kind(pair: PreferencePair) -> str:
    """``cm`` / ``oa1`` / ``oa2`` as mined; a released pair of unknown type is ``cm`` when a side's image is
    noised (the reference code's stage-1 selection, ``rejected_noised=1``) and ``oa`` otherwise."""
    if pair.pair_type != "unknown":
        return pair.pair_type
    return "cm" if pair.rejected_noised or pair.chosen_noised else "oa"


@dataclass(frozen=True)
class NoiseSettings:
    """How a noised side's image is made when the pair does not carry x_v* itself."""

    kind: str = "diffusion"
    step: int = 500
    seed: int = 0


def _clean_image(pair: PreferencePair) -> Image.Image:
    if pair.image_bytes is not None:
        return load_image(pair.image_bytes, name=f"pair {pair.id}")
    if pair.image_path:
        return load_image(pair.image_path, name=f"pair {pair.id} ({pair.image_path})")
    raise ValueError(
        f"pair {pair.id} has no image (image_available={pair.image_available}); DPO needs each pair's image: "
        "convert released alignment files with jobs/convert_data.py image_root=<image folder> embed_images=true"
    )


def side_images(pair: PreferencePair, noise: NoiseSettings) -> tuple[Image.Image, Image.Image]:
    """(chosen image, rejected image): the clean x_v, or x_v* on a side marked noised."""
    clean = _clean_image(pair)
    if not (pair.chosen_noised or pair.rejected_noised):
        return clean, clean
    if pair.noised_image_bytes is not None:
        noised = load_image(pair.noised_image_bytes, name=f"pair {pair.id} (noised image)")
    else:
        noised = noisy_image(clean, noise.step, sample_seed(noise.seed, pair.id), noise.kind)
    return (noised if pair.chosen_noised else clean), (noised if pair.rejected_noised else clean)


def side_inputs(pair: PreferencePair, noise: NoiseSettings) -> tuple[ReaderInput, ReaderInput]:
    """The reader inputs of the chosen and the rejected side (same prompt; the images per side)."""
    chosen_image, rejected_image = side_images(pair, noise)
    return single_image_input(chosen_image, pair.prompt), single_image_input(rejected_image, pair.prompt)


def read_pairs(path: str | Path, kinds: Sequence[str]) -> list[PreferencePair]:
    """The pairs of a Parquet file or directory whose :func:`pair_kind` is in ``kinds``, sorted by id."""
    pairs = [p for p in read_parquet(path, PreferencePair) if pair_kind(p) in kinds]
    return sorted(pairs, key=lambda p: p.id)


def split_pairs(
    pairs: Sequence[PreferencePair], val_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A seeded train/val split by the pair's sample id (both pairs of one sample fall on the same side)."""
    train, val = [], []
    for p in pairs:
        sample_id = p.id.rsplit("/", 1)[0]
        (val if np.random.default_rng(sample_seed(seed, sample_id)).random() < val_fraction else train).append(p)
    return train, val


class PairDataset(Dataset):
    """Yields ``(chosen, rejected)`` encoded sides (``labels`` mask everything but the answer)."""

    def __init__(self, pairs: Sequence[PreferencePair], processor: Any, noise: NoiseSettings) -> None:
        if not pairs:
            raise ValueError("PairDataset got no pairs; check pairs_path and the stage's pair kinds")
        self.pairs = list(pairs)
        self.processor = processor
        self.noise = noise

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        pair = self.pairs[i]
        chosen, rejected = side_inputs(pair, self.noise)
        return encode(self.processor, chosen, pair.chosen), encode(self.processor, rejected, pair.rejected)


def collate_pairs(items: Sequence[tuple[dict[str, Tensor], dict[str, Tensor]]], pad: int) -> dict[str, Tensor]:
    """One batch of 2B rows: the B chosen sides, then the B rejected sides."""
    return collate([c for c, _ in items] + [r for _, r in items], pad)


def pair_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed answer log-probabilities ``log pi(y|x)`` of the chosen and the rejected halves of ``batch``."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**with_positions(model, inputs)).logits
    logps = sequence_logps(logits, labels)
    half = labels.shape[0] // 2
    return logps[:half], logps[half:]


class ReaderDPOTask:
    """DPO of a reader directory on preference pairs; see the module docstring."""

    def __init__(
        self,
        name: str,
        reader_dir: str | Path,
        train_pairs: Sequence[PreferencePair],
        val_pairs: Sequence[PreferencePair],
        lora: LoraSettings,
        beta: float,
        noise: NoiseSettings = NoiseSettings(),
    ) -> None:
        if not train_pairs:
            raise ValueError(f"{name}: no training pairs; check pairs_path and the stage's pair kinds")
        if not beta > 0:
            raise ValueError(f"{name}: beta must be > 0, got {beta}")
        self.name = name
        self.reader_dir = str(reader_dir)
        self.train_pairs = list(train_pairs)
        self.val_pairs = list(val_pairs)
        self.lora = lora
        self.beta = beta
        self.noise = noise
        self.processor: Any = None
        self.pad = 0

    def build_model(self) -> nn.Module:
        model, self.processor = load_reader(self.reader_dir, device="cpu", dtype="float32")
        self.pad = pad_id(self.processor)
        return add_lora(model, self.lora).train()

    def train_dataset(self) -> PairDataset:
        if self.processor is None:
            raise RuntimeError("call build_model() before train_dataset()")
        return PairDataset(self.train_pairs, self.processor, self.noise)

    def collate(self, items: Sequence[tuple[dict[str, Tensor], dict[str, Tensor]]]) -> dict[str, Tensor]:
        return collate_pairs(items, self.pad)

    def dpo(self, model: nn.Module, batch: dict[str, Tensor]) -> Any:
        """The :class:`~medrag_ray.losses.dpo.DPOOutput` and the policy log-probabilities of one batch."""
        batch = to_model(model, batch)
        policy_chosen, policy_rejected = pair_logps(model, batch)
        with torch.no_grad(), model.disable_adapter():
            reference_chosen, reference_rejected = pair_logps(model, batch)
        out = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta)
        return out, policy_chosen.detach(), policy_rejected.detach()

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return self.dpo(model, batch)[0].loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 8) -> dict[str, float]:
        if not self.val_pairs:
            return {}
        was_training = model.training
        model.eval()
        dataset = PairDataset(self.val_pairs, self.processor, self.noise)
        losses, accuracy, margins, prefers = [], [], [], []
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            out, chosen, rejected = self.dpo(model, self.collate(items))
            n = len(items)
            losses.append(float(out.loss) * n)
            accuracy.append(float(out.reward_accuracy) * n)
            margins.append(float(out.reward_margin) * n)
            prefers.append(float((chosen > rejected).float().sum()))
        model.train(was_training)
        total = len(dataset)
        return {
            "val_loss": sum(losses) / total,
            "val_reward_accuracy": sum(accuracy) / total,
            "val_reward_margin": sum(margins) / total,
            "val_policy_prefers_chosen": sum(prefers) / total,
        }

    def export(self, model: nn.Module, directory: Path) -> None:
        export_lora_reader(
            model, self.processor, directory,
            {"base_reader": self.reader_dir, "beta": self.beta, "pairs": len(self.train_pairs)},
        )


def make_reader_dpo_task(
    name: str,
    reader_dir: str,
    data_dir: str,
    lora: LoraSettings,
    beta: float,
    noise: NoiseSettings,
) -> ReaderDPOTask:
    """Read ``train.parquet`` / ``val.parquet`` (PreferencePair rows) written by the job driver in ``data_dir``."""
    root = Path(data_dir)
    train = read_parquet(root / "train.parquet", PreferencePair)
    val_path = root / "val.parquet"
    val = read_parquet(val_path, PreferencePair) if val_path.is_file() else []
    return ReaderDPOTask(name, reader_dir, train, val, lora, beta, noise)
