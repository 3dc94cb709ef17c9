"""Shared tiny fixtures for the model tests: a report corpus, a trained tokenizer, synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

CORPUS = [
    "The chest x-ray shows a small left pleural effusion.",
    "No acute cardiopulmonary abnormality is seen on this radiograph.",
    "Is there cardiomegaly on the frontal view?",
    "The fundus photograph shows scattered drusen near the macula.",
    "Is there evidence of diabetic retinopathy in this fundus image?",
    "The histology slide shows glandular tissue with mild atypia.",
    "Mild cardiomegaly with clear lungs and no pneumothorax.",
    "Please answer the question based on the image and choose from the following two options: [yes, no].",
]


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return list(CORPUS) * 4


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus):
    from medrag_ray.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus, vocab_size=400)


def solid_images(values: list[int], size: int = 40, seed: int = 0) -> list[Image.Image]:
    """RGB images of roughly constant brightness ``value`` (with a little noise so no two are identical)."""
    rng = np.random.default_rng(seed)
    images = []
    for value in values:
        noise = rng.integers(-12, 13, size=(size, size, 3))
        pixels = np.clip(value + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images
