"""Tiny LLaVA reader: processor expansion, forward/generate, trainability, save/load, real HF directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from medrag_ray.models.common import ModelLoadError, read_card
from medrag_ray.models.reader import (
    ReaderConfig,
    attention_implementation,
    build_tiny_reader,
    load_reader,
    reader_config_from_model,
    save_reader,
)
from medrag_ray.models.tokenizer import answer_token_ids, format_answer, format_prompt
from tests.unit.models.conftest import solid_images

PROMPTS = [
    format_prompt("Is there a pleural effusion?"),
    format_prompt("Is the heart enlarged on this view?"),
]


@pytest.fixture(scope="module")
def reader(tiny_tokenizer):
    torch.manual_seed(0)
    return build_tiny_reader(ReaderConfig(), tiny_tokenizer)


@pytest.fixture(scope="module")
def batch(reader):
    _, processor = reader
    return processor(images=solid_images([40, 200], size=45), text=PROMPTS, return_tensors="pt", padding=True)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="image_size .* multiple of patch_size"):
        ReaderConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="max_length .* image tokens"):
        ReaderConfig(image_size=64, patch_size=4, max_length=200)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        ReaderConfig(vision_feature_layer=-4)
    with pytest.raises(ValueError, match="projector_act"):
        ReaderConfig(projector_act="tanh")
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        ReaderConfig.from_dict({"depth": 3})


@pytest.mark.parametrize(("image_size", "patch_size"), [(32, 8), (48, 16)])
def test_processor_expands_image_token(tiny_tokenizer, image_size: int, patch_size: int) -> None:
    cfg = ReaderConfig(image_size=image_size, patch_size=patch_size)
    _, processor = build_tiny_reader(cfg, tiny_tokenizer)
    enc = processor(images=solid_images([10, 90], size=57), text=PROMPTS, return_tensors="pt", padding=True)
    assert cfg.num_image_tokens == (image_size // patch_size) ** 2
    counts = (enc["input_ids"] == tiny_tokenizer.image_token_id).sum(dim=1)
    assert counts.tolist() == [cfg.num_image_tokens] * 2
    assert enc["pixel_values"].shape == (2, 3, image_size, image_size)
    # Left padding: the shorter prompt is padded at the start, every row ends with the prompt's last token.
    assert (enc["input_ids"][:, -1] == enc["input_ids"][0, -1]).all()


def test_forward_gives_logits_over_vocab(reader, batch, tiny_tokenizer) -> None:
    model, _ = reader
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tiny_tokenizer))
    assert torch.isfinite(out.logits).all()
    # The image matters: changing the pixels changes the next-token distribution.
    other = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    with torch.no_grad():
        swapped = model(**other).logits
    assert not torch.allclose(swapped[:, -1], out.logits[:, -1])


def test_generate_produces_tokens(reader, batch, tiny_tokenizer) -> None:
    model, _ = reader
    n_prompt = batch["input_ids"].shape[1]
    with torch.no_grad():
        first = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        second = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert first.shape == (2, n_prompt + 5)
    assert torch.equal(first[:, :n_prompt], batch["input_ids"])
    new = first[:, n_prompt:]
    assert ((new >= 0) & (new < len(tiny_tokenizer))).all()
    assert torch.equal(first, second)  # greedy is deterministic
    # Greedy step 1 is the argmax of the forward pass's last logits.
    with torch.no_grad():
        last = model(**batch).logits[:, -1].argmax(-1)
    assert torch.equal(new[:, 0], last)


@pytest.mark.slow
def test_loss_decreases_when_overfitting_one_example(tiny_tokenizer) -> None:
    torch.manual_seed(1)
    model, processor = build_tiny_reader(ReaderConfig(), tiny_tokenizer)
    prompt = format_prompt("Is there a pleural effusion?")
    enc = processor(
        images=solid_images([120], size=32), text=[prompt + format_answer("yes")], return_tensors="pt"
    )
    n_prompt = len(processor(images=solid_images([120], size=32), text=[prompt])["input_ids"][0])
    labels = enc["input_ids"].clone()
    labels[:, :n_prompt] = -100  # learn the answer only
    yes_id, no_id = answer_token_ids(tiny_tokenizer)
    assert labels[0, n_prompt].item() == yes_id

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.2 * losses[0], losses
    with torch.no_grad():
        logits = model(**{k: v[:, :n_prompt] if k != "pixel_values" else v for k, v in enc.items()}).logits
    assert logits[0, -1, yes_id] > logits[0, -1, no_id]  # what yes/no scoring will read


def test_save_load_round_trip(reader, batch, tmp_path: Path) -> None:
    model, processor = reader
    save_reader(model, processor, tmp_path / "reader")
    card = read_card(tmp_path / "reader")
    assert card is not None and card.kind == "reader"
    assert ReaderConfig.from_dict(card.config) == ReaderConfig() == reader_config_from_model(model)

    loaded, loaded_processor = load_reader(tmp_path / "reader")
    assert isinstance(loaded, LlavaForConditionalGeneration)
    enc = loaded_processor(
        images=solid_images([40, 200], size=45), text=PROMPTS, return_tensors="pt", padding=True
    )
    assert torch.equal(enc["input_ids"], batch["input_ids"])
    assert torch.allclose(enc["pixel_values"], batch["pixel_values"])
    with torch.no_grad():
        assert torch.allclose(loaded(**enc).logits, model(**batch).logits, atol=1e-5)
    assert loaded_processor.tokenizer.image_token == "<image>"
    assert loaded_processor.tokenizer.padding_side == "left"
    assert answer_token_ids(loaded_processor.tokenizer) == answer_token_ids(processor.tokenizer)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}
    assert loaded_processor.apply_chat_template([user], add_generation_prompt=True) == format_prompt("Q?")


def test_load_a_directory_written_by_transformers(tiny_tokenizer, tmp_path: Path) -> None:
    """The 'real weights' path: an HF-format VLM directory with no medrag_model.json."""
    torch.manual_seed(2)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=48,
            patch_size=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=3,
            num_key_value_heads=1,
            max_position_embeddings=128,
            pad_token_id=tiny_tokenizer.pad_token_id,
        ),
        image_token_id=tiny_tokenizer.image_token_id,
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}),
        tokenizer=tiny_tokenizer,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    assert read_card(tmp_path / "hf") is None

    loaded, loaded_processor = load_reader(tmp_path / "hf")
    enc = loaded_processor(
        images=solid_images([70, 180], size=50), text=PROMPTS, return_tensors="pt", padding=True
    )
    assert ((enc["input_ids"] == tiny_tokenizer.image_token_id).sum(1) == 9).all()
    with torch.no_grad():
        assert torch.allclose(loaded(**enc).logits, model(**enc).logits, atol=1e-5)
    assert reader_config_from_model(loaded) is None  # GQA (kv heads 1) is not a ReaderConfig shape
    save_reader(loaded, loaded_processor, tmp_path / "resaved")
    resaved = read_card(tmp_path / "resaved")
    assert resaved is not None and resaved.config is None and resaved.extra["model_type"] == "llava"


def test_bfloat16_reader(tiny_tokenizer, batch, reader) -> None:
    model, _ = reader
    torch.manual_seed(0)
    half, _ = build_tiny_reader(ReaderConfig(), tiny_tokenizer, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    half.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = half(**batch).logits
        reference = model(**batch).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float().argmax(-1) == reference.argmax(-1)).float().mean() > 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_dtype_is_bfloat16(reader, batch, tmp_path: Path) -> None:
    model, processor = reader
    save_reader(model, processor, tmp_path / "reader")
    gpu, _ = load_reader(tmp_path / "reader", device="cuda", dtype="auto")
    assert gpu.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    with torch.no_grad():
        logits = gpu(**{k: v.to("cuda") for k, v in batch.items()}).logits.float().cpu()
        reference = model(**batch).logits
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.8
    out = gpu.generate(**{k: v.to("cuda") for k, v in batch.items()}, max_new_tokens=3, min_new_tokens=3)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_load_errors(tiny_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_reader(tmp_path)
    assert "neither medrag_model.json nor config.json" in str(info.value)
    assert "save_reader" in str(info.value) and "Qwen2-VL" in str(info.value)
    from medrag_ray.models.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["a tiny corpus", "of two texts"], vocab_size=300, out_dir=tmp_path / "tok")
    with pytest.raises(ModelLoadError, match="'tokenizer' model, not a 'reader'"):
        load_reader(tmp_path / "tok")


def test_tokenizer_without_image_token_is_refused() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(vocab={"a": 0, "<pad>": 1}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")
    with pytest.raises(ValueError, match="no image_token.*train_bpe_tokenizer"):
        build_tiny_reader(ReaderConfig(), plain)


def test_attention_is_sdpa_unless_flash_attention_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from medrag_ray.models import reader as reader_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(reader_module, "is_flash_attn_2_available", lambda: False)
    assert attention_implementation(cuda, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(reader_module, "is_flash_attn_2_available", lambda: True)
    assert attention_implementation(cuda, torch.bfloat16) == "flash_attention_2"
    assert attention_implementation(cuda, torch.float32) == "sdpa"  # flash-attention has no float32 kernels
    assert attention_implementation(cpu, torch.bfloat16) == "sdpa"


def test_a_reader_that_cannot_run_flash_attention_loads_with_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_tokenizer
) -> None:
    from medrag_ray.models import reader as reader_module

    model, processor = build_tiny_reader(ReaderConfig(), tiny_tokenizer)
    save_reader(model, processor, tmp_path / "r")
    monkeypatch.setattr(reader_module, "attention_implementation", lambda device, dtype: "flash_attention_2")
    loaded, _ = load_reader(tmp_path / "r")  # flash_attn is not installed here: transformers refuses it
    assert loaded.config.get_text_config()._attn_implementation == "sdpa"
