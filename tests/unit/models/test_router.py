"""Domain router F(x_v): logits/argmax, trainability of head and tower, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medrag_ray.models.common import ModelLoadError, read_card
from medrag_ray.models.dual_encoder import DualEncoderConfig, build_dual_encoder, save_dual_encoder
from medrag_ray.models.router import DomainRouter, build_router, load_router, router_from_encoder, save_router
from tests.unit.models.conftest import solid_images

DOMAINS = ("radiology", "pathology")
SMALL = DualEncoderConfig(image_size=32, patch_size=8, vision_width=64, vision_layers=2, embed_dim=32)


@pytest.fixture()
def router() -> DomainRouter:
    torch.manual_seed(0)
    return build_router(SMALL, DOMAINS)


def test_forward_shape_and_predict_is_argmax(router: DomainRouter) -> None:
    images = solid_images([20, 60, 140, 230], size=36)
    pixels = router.preprocess(images)
    with torch.no_grad():
        logits = router(pixels)
    assert logits.shape == (4, 2)
    predictions = router.predict(images, batch_size=3)  # two batches
    probs = torch.softmax(logits, dim=-1)
    for row, (domain, conf) in enumerate(predictions):
        assert domain == DOMAINS[int(probs[row].argmax())]
        assert conf == pytest.approx(float(probs[row].max()), abs=1e-6)
        assert 0.5 <= conf <= 1.0
    assert router.predict(pixels) == predictions  # preprocessed pixels work too


def test_predictions_from_logits_uses_domain_order(router: DomainRouter) -> None:
    logits = torch.tensor([[0.0, 2.0], [3.0, -1.0]])
    (d0, c0), (d1, c1) = router.predictions_from_logits(logits)
    assert (d0, d1) == ("pathology", "radiology")
    assert c0 == pytest.approx(torch.softmax(torch.tensor([0.0, 2.0]), 0)[1].item())
    assert c1 == pytest.approx(torch.softmax(torch.tensor([3.0, -1.0]), 0)[0].item())


def test_sgd_separates_bright_from_dark_through_head_and_tower(router: DomainRouter) -> None:
    dark = solid_images([25, 35, 45, 55, 30, 50], size=32, seed=1)
    bright = solid_images([200, 210, 220, 230, 205, 225], size=32, seed=2)
    pixels = router.preprocess(dark + bright)
    labels = torch.tensor([DOMAINS.index("radiology")] * 6 + [DOMAINS.index("pathology")] * 6)
    head_before = router.head.weight.detach().clone()
    tower_before = router.encoder.visual.conv1.weight.detach().clone()

    router.train()
    opt = torch.optim.SGD(router.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(router(pixels), labels)
        loss.backward()
        assert router.encoder.visual.conv1.weight.grad.abs().sum() > 0  # gradient reaches the tower
        opt.step()
        losses.append(loss.item())
    router.eval()

    predicted = [d for d, _ in router.predict(pixels)]
    expected = [DOMAINS[i] for i in labels.tolist()]
    assert predicted == expected, (losses, predicted)
    assert losses[-1] < losses[0]
    assert not torch.allclose(router.head.weight, head_before)
    assert not torch.allclose(router.encoder.visual.conv1.weight, tower_before)


def test_save_load_round_trip(router: DomainRouter, tmp_path: Path) -> None:
    with torch.no_grad():
        router.head.bias.copy_(torch.tensor([0.3, -0.3]))  # not the init: the head must really be saved
    save_router(router, tmp_path / "router")
    card = read_card(tmp_path / "router")
    assert card is not None and card.kind == "router" and card.extra["domains"] == list(DOMAINS)
    assert DualEncoderConfig.from_dict(card.config["encoder"]) == SMALL

    loaded = load_router(tmp_path / "router")
    assert loaded.domains == DOMAINS and loaded.encoder.config == SMALL
    pixels = router.preprocess(solid_images([10, 100, 250], size=32))
    with torch.no_grad():
        assert torch.allclose(loaded(pixels), router(pixels), atol=1e-6)
    assert loaded.predict(pixels) == router.predict(pixels)


def test_router_on_a_loaded_encoder(tmp_path: Path) -> None:
    from medrag_ray.models.dual_encoder import load_dual_encoder

    torch.manual_seed(3)
    save_dual_encoder(build_dual_encoder(SMALL), tmp_path / "enc")
    encoder = load_dual_encoder(tmp_path / "enc")
    routed = router_from_encoder(encoder, ("radiology", "ophthalmology", "pathology"))
    pixels = encoder.preprocess(solid_images([50, 150], size=32))
    with torch.no_grad():
        feats = routed.features(pixels)
        assert torch.allclose(feats, encoder.encode_image(pixels))
        assert torch.allclose(routed(pixels), routed.head(feats))


@pytest.mark.parametrize(
    ("domains", "needle"),
    [
        (("radiology",), "at least 2"),
        (("radiology", "radiology"), "distinct"),
        (("radiology", "cardio"), "unknown"),
    ],
)
def test_domain_validation(domains: tuple[str, ...], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        build_router(SMALL, domains)


def test_load_errors(router: DomainRouter, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no medrag_model.json.*save_router"):
        load_router(tmp_path)
    save_dual_encoder(router.encoder, tmp_path / "enc")
    with pytest.raises(ModelLoadError, match="'dual_encoder' model, not a 'router'"):
        load_router(tmp_path / "enc")


def test_calibration_is_applied_saved_and_loaded(router: DomainRouter, tmp_path: Path) -> None:
    logits = torch.tensor([[0.0, 2.0], [0.0, 0.2]])
    router.set_calibration(2.0, 0.6)
    (d0, c0), (d1, c1) = router.predictions_from_logits(logits)
    assert d0 == "pathology" and c0 == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())  # softmax(z / 2)
    assert d1 == "unknown" and c1 == pytest.approx(torch.sigmoid(torch.tensor(0.1)).item())  # 0.525 < 0.6
    save_router(router, tmp_path / "router")
    loaded = load_router(tmp_path / "router")
    assert (loaded.temperature, loaded.unknown_threshold) == (2.0, 0.6)
    assert loaded.predictions_from_logits(logits) == router.predictions_from_logits(logits)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        router.set_calibration(0.0, 0.0)
    with pytest.raises(ValueError, match="unknown_threshold must be in"):
        router.set_calibration(1.0, 1.0)
