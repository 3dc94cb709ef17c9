"""The noisy image x_v* (MMed-RAG Eq. 2) and the least-similar pick of x'_v."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from PIL import Image

from medrag_ray.mining.noise import (
    NOISE_KINDS,
    NOISE_STEPS,
    add_diffusion_noise,
    least_similar,
    noisy_image,
    sample_seed,
    signal_level,
    xi_schedule,
)

LOW, HIGH = 1e-5, 0.5e-2


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _gradient_image(mode: str = "RGB", width: int = 16, height: int = 12) -> Image.Image:
    """A non-square image whose pixels differ along both axes (a transposition would show)."""
    yy, xx = np.mgrid[0:height, 0:width]
    plane = (xx * 13 + yy * 7) % 256
    if mode == "L":
        return Image.fromarray(plane.astype(np.uint8))
    rgb = np.stack([plane, (plane + 80) % 256, (255 - plane)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


# --- schedule ---------------------------------------------------------------------------------------------


def test_schedule_endpoints_and_monotone() -> None:
    xi = xi_schedule()
    assert xi.dtype == np.float64 and xi.shape == (NOISE_STEPS,)
    assert xi[0] == pytest.approx(_sigmoid(-6.0) * (HIGH - LOW) + LOW, rel=1e-12)
    assert xi[-1] == pytest.approx(_sigmoid(6.0) * (HIGH - LOW) + LOW, rel=1e-12)
    assert xi[0] == pytest.approx(2.2338389e-05, rel=1e-6)
    step = 12.0 / (NOISE_STEPS - 1)
    assert xi[500] == pytest.approx(_sigmoid(-6.0 + 500 * step) * (HIGH - LOW) + LOW, rel=1e-12)
    assert np.all(np.diff(xi) > 0)
    assert np.all((xi > LOW) & (xi < HIGH))
    # sigmoid(-l) + sigmoid(l) = 1 and linspace(-6, 6) is symmetric: xi_t + xi_{T-1-t} = high + low.
    np.testing.assert_allclose(xi + xi[::-1], HIGH + LOW, rtol=1e-12)


def test_schedule_custom_bounds_and_errors() -> None:
    xi = xi_schedule(num_steps=3, low=0.1, high=0.3)
    np.testing.assert_allclose(xi, [_sigmoid(-6) * 0.2 + 0.1, 0.2, _sigmoid(6) * 0.2 + 0.1], rtol=1e-12)
    with pytest.raises(ValueError, match="num_steps"):
        xi_schedule(num_steps=0)
    with pytest.raises(ValueError, match="low < high"):
        xi_schedule(low=0.5e-2, high=1e-5)


@pytest.mark.parametrize("step", [0, 1, 499, 999])
def test_signal_level_is_the_product_of_one_minus_xi(step: int) -> None:
    direct = 1.0
    for t in range(step + 1):
        direct *= 1.0 - (_sigmoid(-6.0 + t * 12.0 / (NOISE_STEPS - 1)) * (HIGH - LOW) + LOW)
    assert signal_level(step) == pytest.approx(direct, rel=1e-10)


def test_signal_level_values_and_monotone() -> None:
    assert signal_level(0) == pytest.approx(1.0 - 2.2338389e-05, rel=1e-9)
    assert 0.07 < signal_level(999) < 0.09  # not ~0 (the literal Π ξ reading would give ~1e-16 by step 3)
    levels = [signal_level(s) for s in range(0, NOISE_STEPS, 37)]
    assert all(a > b for a, b in zip(levels, levels[1:], strict=False))


@pytest.mark.parametrize("step", [-1, NOISE_STEPS])
def test_signal_level_rejects_out_of_range_step(step: int) -> None:
    with pytest.raises(ValueError, match=r"noise_step must be in \[0, 999\]"):
        signal_level(step)


# --- Eq. 2 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 100, 499, 999])
def test_diffusion_noise_moments(step: int) -> None:
    n, c = 1_000_000, 0.7
    out = add_diffusion_noise(np.full(n, c), step, np.random.default_rng(step))
    assert out.dtype == np.float32 and out.shape == (n,)
    level = signal_level(step)
    values = out.astype(np.float64)
    # Standard errors: mean sqrt((1-level)/n) <= 1e-3, variance (1-level)*sqrt(2/n) <= 1.5e-3; allow 6 sigma.
    assert values.mean() == pytest.approx(math.sqrt(level) * c, abs=6e-3 * math.sqrt(1 - level) + 1e-6)
    assert values.var() == pytest.approx(1 - level, abs=9e-3 * (1 - level) + 1e-7)


def test_diffusion_noise_is_not_clipped_and_keeps_shape() -> None:
    out = add_diffusion_noise(np.zeros((4, 5, 3)), 999, np.random.default_rng(0))
    assert out.shape == (4, 5, 3)
    big = add_diffusion_noise(np.full(10_000, 5.0), 0, np.random.default_rng(0))
    assert big.min() > 4.9  # nothing clipped to [-1, 1]


# --- noisy_image ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_noisy_image_deterministic_and_seed_sensitive(kind: str) -> None:
    img = _gradient_image()
    a = np.asarray(noisy_image(img, 500, seed=3, kind=kind))
    b = np.asarray(noisy_image(img, 500, seed=3, kind=kind))
    c = np.asarray(noisy_image(img, 500, seed=4, kind=kind))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_noisy_image_step_zero_is_almost_the_input() -> None:
    img = _gradient_image()
    out = noisy_image(img, 0, seed=1)
    assert out.mode == "RGB" and out.size == img.size
    diff = np.abs(np.asarray(out, dtype=np.int64) - np.asarray(img, dtype=np.int64))
    # noise std at step 0 is sqrt(2.2e-5) in [-1, 1] units = 0.6 grey level.
    assert diff.mean() < 1.0 and diff.max() <= 5


def test_noisy_image_late_step_destroys_the_image() -> None:
    img = _gradient_image(width=64, height=48)
    clean = np.asarray(img, dtype=np.float64)
    noisy = np.asarray(noisy_image(img, 999, seed=1), dtype=np.float64)
    assert np.abs(noisy - clean).mean() > 40


def test_grayscale_stays_grayscale() -> None:
    img = _gradient_image("L")
    out = noisy_image(img, 300, seed=0)
    assert out.mode == "L" and out.size == img.size
    near = np.asarray(noisy_image(img, 0, seed=0), dtype=np.int64)
    assert np.abs(near - np.asarray(img, dtype=np.int64)).max() <= 5


def test_rgba_and_palette_modes_are_kept() -> None:
    rgba = _gradient_image().convert("RGBA")
    assert noisy_image(rgba, 10, seed=0).mode == "RGBA"
    pal = _gradient_image().convert("P")
    out = noisy_image(pal, 10, seed=0)
    assert out.mode == "P" and out.size == pal.size


def test_gaussian_kind_ignores_the_image() -> None:
    a = Image.new("L", (200, 200), color=0)
    b = Image.new("L", (200, 200), color=255)
    out_a = np.asarray(noisy_image(a, 0, seed=9, kind="gaussian"))
    out_b = np.asarray(noisy_image(b, 0, seed=9, kind="gaussian"))
    assert np.array_equal(out_a, out_b)
    # Clipped N(0, 1): P(z >= 1) = P(z <= -1) = 0.1587 land on 255 / 0.
    assert (out_a == 255).mean() == pytest.approx(0.1587, abs=0.01)
    assert (out_a == 0).mean() == pytest.approx(0.1587, abs=0.01)


def test_noisy_image_errors() -> None:
    img = _gradient_image()
    with pytest.raises(ValueError, match=r"noise_kind must be one of \('diffusion', 'gaussian'\)"):
        noisy_image(img, 10, seed=0, kind="salt")
    with pytest.raises(ValueError, match="noise_step"):
        noisy_image(img, 1000, seed=0)


# --- seeds ------------------------------------------------------------------------------------------------


def test_sample_seed_is_a_stable_sha256_value() -> None:
    expected = int(hashlib.sha256(b"7:img_001").hexdigest()[:16], 16) // 2
    assert sample_seed(7, "img_001") == expected
    seeds = {sample_seed(s, sid) for s in (0, 1) for sid in ("a", "b", "c")}
    assert len(seeds) == 6
    assert all(0 <= s < 2**63 for s in seeds)


# --- least_similar ----------------------------------------------------------------------------------------


def test_least_similar_hand_example_with_tie() -> None:
    docs = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    query = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # cosines: q0 -> [1, 0, -1, -1, 0] (tie 2/3 -> 2); q1 -> [0, 1, 0, 0, -1]; q2 -> [.6, .8, -.6, -.6, -.8]
    np.testing.assert_array_equal(least_similar(query, docs), [2, 4, 4])


def test_least_similar_errors() -> None:
    with pytest.raises(ValueError, match="docs is empty"):
        least_similar(np.ones((1, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="query dim 3 != docs dim 4"):
        least_similar(np.ones((1, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="query and docs must be 2-D"):
        least_similar(np.ones(3), np.ones((2, 3)))
