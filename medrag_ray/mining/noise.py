"""The unrelated noisy image x_v* of MMed-RAG §2.3 (Eq. 2) and the pick of x'_v.

Two steps (MMed-RAG §2.3): the retriever picks the index image x'_v *least* similar to the target
image (:func:`least_similar`), then diffusion noise is added at step s (Eq. 2, :func:`add_diffusion_noise`):

    x_v* = sqrt(ξ̄_s) · x'_v + sqrt(1 − ξ̄_s) · ε,   ε ~ N(0, I)

with the appendix schedule ξ_t = sigmoid(l_t)·(0.5e-2 − 1e-5) + 1e-5, l_t = linspace(−6, 6, 1000)
(the betas of the public reference code).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

NOISE_STEPS = 1000
NOISE_KINDS = ("diffusion", "gaussian")


def xi_schedule(num_steps: int = NOISE_STEPS, low: float = 1e-5, high: float = 0.5e-2) -> np.ndarray:
    """ξ_t = sigmoid(linspace(−6, 6, T))·(high − low) + low, float64, shape (T,) (MMed-RAG appendix)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < low < high < 1.0:
        raise ValueError(f"need 0 < low < high < 1 for the noise schedule, got low={low}, high={high}")
    logits = np.linspace(-6.0, 6.0, num_steps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-logits)) * (high - low) + low


def _check_step(step: int, num_steps: int) -> None:
    if not 0 <= step <= num_steps - 1:
        raise ValueError(f"noise_step must be in [0, {num_steps - 1}], got {step}")


def signal_level(step: int, num_steps: int = NOISE_STEPS) -> float:
    """ξ̄_s = Π_{i=0..s} (1 − ξ_i): the fraction of signal variance left at step s (Eq. 2).

    The paper writes ξ̄_s = Π ξ_i. Read literally, with ξ between 1e-5 and 5e-3, that product underflows to
    ~0 after three steps, so x_v* would be pure noise at every step and the noise step would mean nothing.
    We follow the public reference code's DDPM reading instead, ξ̄ = Π(1 − ξ) (its ``alphas_cumprod``):
    ξ̄ ≈ 1 at step 0 and ≈ 0.08 at step 999.
    """
    _check_step(step, num_steps)
    return float(np.prod(1.0 - xi_schedule(num_steps)[: step + 1]))


def add_diffusion_noise(x: np.ndarray, step: int, rng: np.random.Generator, num_steps: int = NOISE_STEPS) -> np.ndarray:
    """Eq. 2: sqrt(ξ̄_s)·x + sqrt(1 − ξ̄_s)·ε with ε ~ N(0, 1) of x's shape; float32, not clipped."""
    level = signal_level(step, num_steps)
    eps = rng.standard_normal(np.shape(x))
    noisy = np.sqrt(level) * np.asarray(x, dtype=np.float64) + np.sqrt(1.0 - level) * eps
    return noisy.astype(np.float32)


def noisy_image(image: Image.Image, step: int, seed: int, kind: str = "diffusion") -> Image.Image:
    """x_v* as an image of the same mode and size as ``image``; deterministic in (image, step, seed, kind).

    Pixels are mapped to [−1, 1] ((x/255)·2 − 1). ``kind="diffusion"`` (the paper, default) applies Eq. 2 at
    ``step``; ``kind="gaussian"`` replaces the image by N(0, 1) noise clipped to [−1, 1], which is what the
    released reference trainer does (``step`` is validated but unused). The result is clipped to [−1, 1]
    and mapped back to uint8. Modes other than L / LA / RGB / RGBA are noised in RGB and converted back.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {kind!r}")
    _check_step(step, NOISE_STEPS)
    native = image.mode in ("L", "LA", "RGB", "RGBA")
    work = image if native else image.convert("RGB")
    x = np.asarray(work, dtype=np.float64) / 255.0 * 2.0 - 1.0
    rng = np.random.default_rng(seed)
    if kind == "diffusion":
        noised = add_diffusion_noise(x, step, rng)
    else:
        noised = rng.standard_normal(x.shape)
    pixels = np.rint((np.clip(noised, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(np.uint8)
    out = Image.frombytes(work.mode, work.size, np.ascontiguousarray(pixels).tobytes())
    return out if native else out.convert(image.mode)


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed in [0, 2**63), stable across processes: sha256 of f"{seed}:{sample_id}" (not hash())."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def least_similar(query: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Row index (B,) of the doc with the lowest cosine to each query; ties go to the lowest index.

    ``query`` (B, D) and ``docs`` (N, D) must be L2-normalised rows, so the dot product is the cosine.
    MMed-RAG §2.3: "we use the retriever to select an image x'_v with the lowest similarity to the target
    image". The caller supplies the image embeddings of the domain's index.
    """
    query, docs = np.asarray(query), np.asarray(docs)
    if query.ndim != 2 or docs.ndim != 2:
        raise ValueError(f"query and docs must be 2-D (B, D) and (N, D), got {query.shape} and {docs.shape}")
    if docs.shape[0] == 0:
        raise ValueError("docs is empty: need at least one index image to pick the least similar one")
    if query.shape[1] != docs.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} != docs dim {docs.shape[1]}: embed both with the same model")
    sims = query.astype(np.float64) @ docs.astype(np.float64).T
    return np.argmin(sims, axis=1)  # argmin returns the first (lowest) index among ties
