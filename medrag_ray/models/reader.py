"""The reader: a LLaVA-style vision-language model and its processor, tiny offline or real from disk.

* :func:`build_tiny_reader` -- a ``LlavaForConditionalGeneration`` (CLIP vision tower + 2-layer Llama)
  built from a :class:`ReaderConfig` around a tokenizer from :mod:`medrag_ray.models.tokenizer`, with a
  ``LlavaProcessor`` whose image processor and ``patch_size`` make it expand ``<image>`` into exactly
  :attr:`ReaderConfig.num_image_tokens` tokens (the vision tower's patches, CLS dropped).
* :func:`load_reader` -- a directory saved by :func:`save_reader`, or a real local VLM in Hugging Face
  format (LLaVA-Med converted to ``llava``, Qwen2-VL, ...), through ``AutoModelForImageTextToText`` and
  ``AutoProcessor`` with ``local_files_only=True``. Both return ``(model, processor)``; everything
  downstream (prompting, yes/no scoring, SFT, DPO) sees the same Hugging Face interfaces.

Device and dtype: ``device`` is ``"cpu"``, ``"cuda"`` or ``"auto"``; ``dtype`` is ``"auto"`` (bfloat16 on
GPU, float32 on CPU), ``"float32"`` or ``"bfloat16"``. Attention (:func:`attention_implementation`): sdpa, or
flash-attention 2 on CUDA in half precision when the ``flash_attn`` package is installed and the architecture
supports it (else sdpa, logged). Every architecture of ``tests/unit/conformance`` runs in bfloat16 with sdpa on an
H200; the flash-attention path was not run (the lent GPU had no ``flash_attn``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.utils import is_flash_attn_2_available

from medrag_ray.models.common import (
    ModelCard,
    ModelLoadError,
    check_card_kind,
    read_card,
    require_directory,
    resolve_device,
    resolve_dtype,
    write_card,
)
from medrag_ray.models.configs import PROJECTOR_ACTIVATIONS, ReaderConfig  # noqa: F401
from medrag_ray.models.tokenizer import CHAT_TEMPLATE

logger = logging.getLogger(__name__)

def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    image_token = getattr(tokenizer, "image_token", None)
    if not image_token:
        raise ValueError(
            "the tokenizer has no image_token; build it with medrag_ray.models.tokenizer.train_bpe_tokenizer "
            "(or pass extra_special_tokens={'image_token': '<image>'})"
        )
    ids = {
        "image": tokenizer.convert_tokens_to_ids(image_token),
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
    }
    missing = [k for k, v in ids.items() if v is None or v == tokenizer.unk_token_id]
    if missing:
        raise ValueError(
            f"the tokenizer lacks the special tokens {missing}; train it with train_bpe_tokenizer"
        )
    return ids


def llava_config(cfg: ReaderConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """The transformers config of this reader around ``tokenizer`` (vocab size and special ids)."""
    ids = _special_ids(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["image"],
        vision_feature_select_strategy="default",
        vision_feature_layer=cfg.vision_feature_layer,
        projector_hidden_act=cfg.projector_act,
    )




def make_tiny_processor(cfg: ReaderConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """A LlavaProcessor for ``cfg``: square ``image_size`` crops, ``<image>`` -> ``num_image_tokens``."""
    size = cfg.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def _place(model: PreTrainedModel, device: str, dtype: str) -> PreTrainedModel:
    dev = resolve_device(device)
    return model.to(device=dev, dtype=resolve_dtype(dtype, dev))


def build_tiny_reader(
    cfg: ReaderConfig | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: str = "cpu",
    dtype: str = "auto",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA and its processor (offline; seed torch for reproducible weights)."""
    cfg = cfg or ReaderConfig()
    model = LlavaForConditionalGeneration(llava_config(cfg, tokenizer))
    ids = _special_ids(tokenizer)
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.bos_token_id = ids["bos"]
    model.generation_config.eos_token_id = ids["eos"]
    processor = make_tiny_processor(cfg, tokenizer)
    model = _place(model, device, dtype).eval()
    logger.info(
        "built tiny reader: %.2fM parameters, %d image tokens, vocab %d",
        sum(p.numel() for p in model.parameters()) / 1e6,
        cfg.num_image_tokens,
        len(tokenizer),
    )
    return model, processor


def reader_config_from_model(model: PreTrainedModel) -> ReaderConfig | None:
    """The :class:`ReaderConfig` a tiny LLaVA was built from, or None for another architecture."""
    config = model.config
    if getattr(config, "model_type", None) != "llava":
        return None
    vision, text = config.vision_config, config.text_config
    if (
        getattr(vision, "model_type", None) != "clip_vision_model"
        or getattr(text, "model_type", None) != "llama"
    ):
        return None
    same_shape = (
        getattr(text, "num_key_value_heads", text.num_attention_heads) == text.num_attention_heads
        and not getattr(text, "tie_word_embeddings", False)
        and not getattr(config, "tie_word_embeddings", False)
        and config.vision_feature_select_strategy == "default"
        and isinstance(config.vision_feature_layer, int)
    )
    if not same_shape:  # e.g. grouped-query attention or tied embeddings: not what build_tiny_reader makes
        return None
    try:
        return ReaderConfig(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_hidden=vision.hidden_size,
            vision_layers=vision.num_hidden_layers,
            vision_heads=vision.num_attention_heads,
            vision_intermediate=vision.intermediate_size,
            text_hidden=text.hidden_size,
            text_layers=text.num_hidden_layers,
            text_heads=text.num_attention_heads,
            text_intermediate=text.intermediate_size,
            max_length=text.max_position_embeddings,
            vision_feature_layer=config.vision_feature_layer,
            projector_act=config.projector_hidden_act,
        )
    except (ValueError, TypeError):
        return None


def save_reader(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    directory: str | Path,
    *,
    config: ReaderConfig | None = None,
) -> Path:
    """``save_pretrained`` of model and processor plus ``medrag_model.json``; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    config = config or reader_config_from_model(model)
    write_card(
        out,
        ModelCard(
            kind="reader",
            config=config.to_dict() if config is not None else None,
            extra={"model_type": model.config.model_type, "architecture": type(model).__name__},
        ),
    )
    logger.info("saved reader (%s) to %s", type(model).__name__, out)
    return out


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """``flash_attention_2`` on CUDA in bfloat16 / float16 when ``flash_attn`` is installed, else ``sdpa``."""
    half = dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if device.type == "cuda" and half and is_flash_attn_2_available() else "sdpa"


def load_reader(
    directory: str | Path, *, device: str = "cpu", dtype: str = "auto"
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a reader saved by :func:`save_reader` or a real local VLM directory (HF format), offline."""
    path = require_directory(directory, "load_reader").resolve()
    card = read_card(path)
    if card is not None:
        check_card_kind(card, "reader", path, "pass a reader directory written by save_reader")
    if not (path / "config.json").is_file():
        if card is not None:
            raise ModelLoadError(f"{path / 'config.json'} is missing although {path} has a card; save again")
        raise ModelLoadError(
            f"directory {path} has neither medrag_model.json nor config.json; pass a directory saved by "
            "medrag_ray.models.reader.save_reader or a real local VLM in Hugging Face format (LLaVA-Med "
            "converted "
            "to 'llava', Qwen2-VL) holding config.json, the weights and the processor files"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attention = attention_implementation(dev, torch_dtype)
    try:
        try:  # sdpa: transformers' default (it falls back to eager for an architecture without sdpa)
            extra = {} if attention == "sdpa" else {"attn_implementation": attention}
            model = AutoModelForImageTextToText.from_pretrained(
                str(path), local_files_only=True, dtype=torch_dtype, **extra
            )
        except (ValueError, ImportError) as exc:
            if attention == "sdpa":
                raise
            logger.warning("%s cannot run %s (%s); loading it with the default attention", path, attention, exc)
            model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype)
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"could not load the VLM in {path} offline: {exc}. The directory must be in Hugging Face format "
            "(the original LLaVA-Med release is not: convert it with jobs/convert_llava_med.py) "
            "and hold the processor files (preprocessor_config.json, tokenizer files)"
        ) from exc
    if not isinstance(processor, ProcessorMixin):
        raise ModelLoadError(
            f"{path} has no multimodal processor (AutoProcessor gave {type(processor).__name__}); add the "
            "image "
            "processor files (preprocessor_config.json / processor_config.json) from the original checkpoint"
        )
    model = model.to(dev).eval()
    logger.info("loaded reader %s from %s on %s (%s)", type(model).__name__, path, dev, torch_dtype)
    return model, processor
