"""A tiny synthetic dataset and a tiny init encoder on disk, shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_DOMAINS = ("radiology", "pathology")


def make_tiny_training_dir(root: Path) -> tuple[Path, Path]:
    """``(dataset_dir, init_encoder_dir)`` under ``root``: 2 domains x 24 cases at 32 px, a tiny CLIP."""
    from medrag_ray.config import SyntheticDataConfig
    from medrag_ray.data.synthetic import generate, write_dataset
    from medrag_ray.models.configs import DualEncoderConfig
    from medrag_ray.models.dual_encoder import build_dual_encoder, save_dual_encoder
    from medrag_ray.utils import seed_everything

    dataset_dir, encoder_dir = root / "data", root / "encoder"
    cfg = SyntheticDataConfig(domains=TINY_DOMAINS, n_per_domain=24, n_phenotypes=3, image_size=32, seed=0)
    write_dataset(generate(cfg), dataset_dir)
    seed_everything(0)
    encoder_cfg = DualEncoderConfig(
        embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=1, text_width=32, text_layers=1,
        text_heads=2, context_length=64,
    )
    save_dual_encoder(build_dual_encoder(encoder_cfg), encoder_dir)
    return dataset_dir, encoder_dir


@pytest.fixture(scope="session")
def tiny_training_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny_training_dir(tmp_path_factory.mktemp("tiny_training"))
