"""Dual encoder: tiny build, embeddings, save/load, and real open_clip checkpoints in the hf-hub layout."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from medrag_ray.models.common import CARD_FILE, ModelLoadError, read_card
from medrag_ray.models.dual_encoder import (
    DualEncoder,
    DualEncoderConfig,
    build_dual_encoder,
    load_dual_encoder,
    save_dual_encoder,
)
from tests.unit.conformance.builders import TEXTS, biomedclip_like, write_open_clip_hub_layout
from tests.unit.models.conftest import solid_images


@pytest.fixture(scope="module")
def encoder() -> DualEncoder:
    torch.manual_seed(0)
    return build_dual_encoder(DualEncoderConfig())


@pytest.fixture(scope="module")
def pixels(encoder: DualEncoder) -> torch.Tensor:
    return encoder.preprocess(solid_images([30, 120, 220]))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="image_size .* multiple of patch_size"):
        DualEncoderConfig(image_size=60, patch_size=8)
    with pytest.raises(ValueError, match="text_width .* multiple of text_heads"):
        DualEncoderConfig(text_width=66, text_heads=4)
    with pytest.raises(ValueError, match="embed_dim must be a positive integer"):
        DualEncoderConfig(embed_dim=0)
    with pytest.raises(ValueError, match="image_std must be > 0"):
        DualEncoderConfig(image_std=(0.2, 0.0, 0.2))


def test_config_dict_round_trip_and_unique_names() -> None:
    cfg = DualEncoderConfig(embed_dim=32, vision_layers=1)
    assert DualEncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.model_name == DualEncoderConfig(embed_dim=32, vision_layers=1).model_name
    assert cfg.model_name != DualEncoderConfig().model_name
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        DualEncoderConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_build_registers_with_open_clip(encoder: DualEncoder) -> None:
    cfg = encoder.config
    assert cfg is not None and encoder.model_id == cfg.model_name
    assert encoder.model_id in open_clip.list_models()
    assert encoder.embed_dim == cfg.embed_dim and encoder.image_size == cfg.image_size
    assert encoder.context_length == cfg.context_length
    assert encoder.logit_scale.item() == pytest.approx(1 / cfg.init_temperature, rel=1e-5)


def test_preprocess_shapes_any_input_mode(encoder: DualEncoder) -> None:
    images = solid_images([10, 200], size=50)
    batch = encoder.preprocess([images[0], images[1].convert("L")])
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    assert batch[0].mean() < batch[1].mean()  # dark stays darker than bright after normalization


@torch.no_grad()
def test_embeddings_are_normalized_and_distinct(encoder: DualEncoder, pixels: torch.Tensor) -> None:
    img = encoder.encode_image(pixels)
    txt = encoder.encode_text(TEXTS)
    assert img.shape == (3, 64) and txt.shape == (3, 64)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    cos_img = img @ img.T
    cos_txt = txt @ txt.T
    off_diag = ~torch.eye(3, dtype=torch.bool)
    assert (cos_img[off_diag] < 0.9999).all(), cos_img
    assert (cos_txt[off_diag] < 0.9999).all(), cos_txt
    raw = encoder.encode_image(pixels, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)


@torch.no_grad()
def test_batch_matches_single(encoder: DualEncoder, pixels: torch.Tensor) -> None:
    batch = encoder.encode_image(pixels)
    single = torch.cat([encoder.encode_image(pixels[i : i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-5)
    tb = encoder.encode_text(TEXTS)
    ts = torch.cat([encoder.encode_text([t]) for t in TEXTS])
    assert torch.allclose(tb, ts, atol=1e-5)


@torch.no_grad()
def test_similarity_and_forward(encoder: DualEncoder, pixels: torch.Tensor) -> None:
    img, txt, scale = encoder(pixels, encoder.tokenize(TEXTS))
    expected = scale * img @ txt.T
    assert torch.allclose(encoder.similarity(img, txt), expected)
    loss = open_clip.ClipLoss()(img, txt, scale)
    assert torch.isfinite(loss) and loss.item() > 0


def test_encode_image_rejects_unpreprocessed_input(encoder: DualEncoder) -> None:
    with pytest.raises(ValueError, match="use preprocess"):
        encoder.encode_image(torch.zeros(3, 64, 64))


@torch.no_grad()
def test_save_load_round_trip(encoder: DualEncoder, pixels: torch.Tensor, tmp_path: Path) -> None:
    save_dual_encoder(encoder, tmp_path / "de")
    files = {p.name for p in (tmp_path / "de").iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", CARD_FILE} <= files
    card = read_card(tmp_path / "de")
    assert card is not None and card.kind == "dual_encoder"
    assert DualEncoderConfig.from_dict(card.config) == encoder.config

    loaded = load_dual_encoder(tmp_path / "de")
    assert loaded.config == encoder.config and loaded.model_id == encoder.model_id
    assert loaded.preprocess_cfg == encoder.preprocess_cfg
    assert torch.allclose(loaded.encode_image(pixels), encoder.encode_image(pixels), atol=1e-6)
    assert torch.allclose(loaded.encode_text(TEXTS), encoder.encode_text(TEXTS), atol=1e-6)
    assert torch.equal(loaded.logit_scale, encoder.logit_scale)
    images = solid_images([90], size=70)
    assert torch.equal(loaded.preprocess(images), encoder.preprocess(images))


@torch.no_grad()
def test_bfloat16_build_and_load(encoder: DualEncoder, pixels: torch.Tensor, tmp_path: Path) -> None:
    save_dual_encoder(encoder, tmp_path / "de")
    half = load_dual_encoder(tmp_path / "de", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    emb = half.encode_image(pixels)
    assert emb.dtype == torch.bfloat16
    assert torch.allclose(emb.float(), encoder.encode_image(pixels), atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_cuda_auto_dtype(encoder: DualEncoder, pixels: torch.Tensor, tmp_path: Path) -> None:
    save_dual_encoder(encoder, tmp_path / "de")
    gpu = load_dual_encoder(tmp_path / "de", device="cuda", dtype="auto")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    img = gpu.encode_image(pixels).float().cpu()
    txt = gpu.encode_text(TEXTS).float().cpu()
    assert torch.allclose(img, encoder.encode_image(pixels), atol=0.05)
    assert torch.allclose(txt, encoder.encode_text(TEXTS), atol=0.05)


# ------------------------------------------------------------------------- real checkpoint layouts


@torch.no_grad()
def test_load_real_open_clip_hub_layout(tmp_path: Path) -> None:
    model_cfg = {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    torch.manual_seed(1)
    reference = open_clip.CLIP(**model_cfg).eval()
    write_open_clip_hub_layout(tmp_path / "hub", reference, model_cfg, preprocess_cfg)

    loaded = load_dual_encoder(tmp_path / "hub")
    assert loaded.config is None and loaded.model_id.startswith("local-dir:")
    assert loaded.embed_dim == 48 and loaded.image_size == 32 and loaded.context_length == 24
    assert (
        loaded.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
        and loaded.preprocess_cfg["interpolation"] == "bilinear"
    )
    pixels = loaded.preprocess(solid_images([40, 210], size=32))
    assert torch.allclose(
        loaded.encode_image(pixels), reference.encode_image(pixels, normalize=True), atol=1e-6
    )
    tokens = open_clip.SimpleTokenizer(context_length=24)(TEXTS)
    assert torch.allclose(loaded.encode_text(TEXTS), reference.encode_text(tokens, normalize=True), atol=1e-6)

    # Re-saving a real model keeps it loadable, now with a card but no tiny config.
    save_dual_encoder(loaded, tmp_path / "resaved")
    again = load_dual_encoder(tmp_path / "resaved")
    assert again.model_id == loaded.model_id and again.config is None
    assert torch.allclose(again.encode_image(pixels), loaded.encode_image(pixels), atol=1e-6)


@torch.no_grad()
def test_load_biomedclip_like_checkpoint_offline(tmp_path: Path) -> None:
    ckpt, bert_dir, reference = biomedclip_like(tmp_path)
    with pytest.raises(ModelLoadError, match="hf_text_config"):
        load_dual_encoder(ckpt)  # the BERT config is on the hub only: clear message, no hang

    loaded = load_dual_encoder(ckpt, hf_text_config_dir=bert_dir)
    pixels = loaded.preprocess(solid_images([60], size=32))
    assert torch.allclose(
        loaded.encode_image(pixels), reference.encode_image(pixels, normalize=True), atol=1e-6
    )
    tokens = loaded.tokenize(["a chest x-ray"])
    assert tokens.shape == (1, 16) and tokens[0, 0].item() == loaded.tokenizer.tokenizer.cls_token_id
    assert torch.allclose(
        loaded.encode_text(["a chest x-ray"]), reference.encode_text(tokens, normalize=True)
    )

    # Our save writes the text config beside the weights, so the copy loads with no extra argument.
    save_dual_encoder(loaded, tmp_path / "resaved")
    assert (tmp_path / "resaved" / "hf_text_config" / "config.json").is_file()
    again = load_dual_encoder(tmp_path / "resaved")
    assert torch.allclose(
        again.encode_text(["a chest x-ray"]), loaded.encode_text(["a chest x-ray"]), atol=1e-6
    )
    saved_cfg = json.loads((tmp_path / "resaved" / "open_clip_config.json").read_text())
    assert saved_cfg["model_cfg"]["text_cfg"]["hf_model_name"] == "example-org/bert-not-on-this-machine"


# ----------------------------------------------------------------------------------------- errors


def test_empty_directory_error_names_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_dual_encoder(tmp_path)
    message = str(info.value)
    assert "neither medrag_model.json nor open_clip_config.json" in message
    assert "save_dual_encoder" in message and "BiomedCLIP" in message


def test_missing_directory_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_dual_encoder(tmp_path / "nope")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_dual_encoder(tmp_path)


def test_weights_that_do_not_fit_the_config(encoder: DualEncoder, tmp_path: Path) -> None:
    save_dual_encoder(encoder, tmp_path / "de")
    config_path = tmp_path / "de" / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["model_cfg"]["embed_dim"] = 32  # the projection shapes no longer match the checkpoint
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not fit its open_clip_config.json"):
        load_dual_encoder(tmp_path / "de")


def test_directory_of_another_kind_is_refused(tmp_path: Path) -> None:
    from medrag_ray.models.common import ModelCard, write_card

    write_card(tmp_path, ModelCard(kind="reader"))
    with pytest.raises(ModelLoadError, match="holds a medrag-ray 'reader' model, not a 'dual_encoder'"):
        load_dual_encoder(tmp_path)
