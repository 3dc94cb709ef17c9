"""A tiny dual encoder for the embedding / index-store tests (unit and integration)."""

from __future__ import annotations

from pathlib import Path

import torch

from medrag_ray.models.configs import DualEncoderConfig
from medrag_ray.models.dual_encoder import build_dual_encoder, save_dual_encoder

TINY = DualEncoderConfig(
    embed_dim=16,
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=1,
    vision_head_width=16,
    text_width=32,
    text_layers=1,
    text_heads=2,
    context_length=32,
)


def save_tiny_encoder(directory: Path, seed: int = 0, cfg: DualEncoderConfig = TINY) -> Path:
    """Build a randomly initialised tiny CLIP (seeded) and save it to ``directory``."""
    torch.manual_seed(seed)
    return save_dual_encoder(build_dual_encoder(cfg), directory)
