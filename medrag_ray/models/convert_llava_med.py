"""The original LLaVA-Med v1.5 checkpoint -> the llava-hf format that ``load_reader`` reads (vLLM reads that format
too; not checked here: vLLM is not installed).

LLaVA-Med v1.5 (``microsoft/llava-med-v1.5-mistral-7b``) is released in the LLaVA code base's own layout:
``config.json`` with ``model_type: llava_mistral`` (Mistral fields plus ``mm_*`` fields), the weights under
``model.*`` / ``lm_head.*`` with the projector as ``model.mm_projector.{0,2}`` and, when the tower was saved,
the CLIP tower as ``model.vision_tower.vision_tower.vision_model.*``; the tower itself is named by
``mm_vision_tower`` (``openai/clip-vit-large-patch14-336``) and loaded from the hub at run time. Neither
transformers' Auto classes nor vLLM read that layout. :func:`convert_llava_med` writes the same weights as a
``LlavaForConditionalGeneration`` directory:

* text: ``model.*`` -> ``model.language_model.*`` in a ``MistralConfig`` (``LlamaConfig`` for ``llava_llama``)
  built from the original config's fields; ``lm_head.*`` unchanged;
* projector: ``mlp2x_gelu`` -> ``model.multi_modal_projector.linear_1`` / ``linear_2`` (GELU between, as in
  LLaVA); other projector types have no llava-hf equivalent and are refused;
* vision: the tower in the checkpoint when it is there, else the weights of ``vision_tower_dir`` (the local
  CLIP directory ``mm_vision_tower`` names, in Hugging Face format); its config and image processor always come
  from that directory; ``mm_vision_select_layer`` -> ``vision_feature_layer``, ``mm_vision_select_feature``
  ``patch`` -> ``vision_feature_select_strategy: default`` (CLS dropped), ``cls_patch`` -> ``full``;
* tokenizer: the checkpoint's own, with ``<image>`` added (and ``<pad>`` when it has no pad token); the new
  rows of ``embed_tokens`` / ``lm_head`` are the mean of the old ones (the ``<image>`` row is never read: the
  image features replace it); the chat template of LLaVA-Med's ``mistral_instruct`` conversation,
  ``[INST] <image>\\n{prompt} [/INST]`` (:data:`LLAVA_MED_CHAT_TEMPLATE`; vicuna's ``USER: ... ASSISTANT:`` for
  ``llava_llama``).

What differs from the original code and is *not* converted: LLaVA-Med pads each image to a square with the
mean colour (``image_aspect_ratio: pad``) before CLIP's resize; the llava-hf processor resizes and centre-crops.

The model is built on the ``meta`` device and the converted tensors assigned to it, so a 7B checkpoint needs
its own size in memory once, not a float32 copy beside it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from medrag_ray.models.common import DTYPES, ModelLoadError, require_directory
from medrag_ray.utils import atomic_output_dir

logger = logging.getLogger(__name__)

LLAVA_MED_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s>' }}{% endif %}"
    "{% endfor %}"
)
"""LLaVA-Med v1.5's ``mistral_instruct`` turn: ``[INST] <image>\\n{prompt} [/INST] {answer}</s>``."""

VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'][0]['text'] + '</s>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""LLaVA-1.5 / LLaVA-Med v1.0 (``llava_llama``): ``USER: <image>\\n{prompt} ASSISTANT: {answer}</s>``."""

TEXT_FAMILIES: dict[str, tuple[type[PretrainedConfig], str]] = {
    "llava_mistral": (MistralConfig, LLAVA_MED_CHAT_TEMPLATE),
    "llava_llama": (LlamaConfig, VICUNA_CHAT_TEMPLATE),
    "llava": (LlamaConfig, VICUNA_CHAT_TEMPLATE),
}
"""Original ``model_type`` -> (text config class, chat template)."""

_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "sliding_window",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "initializer_range",
)
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def read_original_config(src: Path) -> dict[str, Any]:
    """The original ``config.json``, checked to be a LLaVA code-base checkpoint we can convert."""
    path = src / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{src} has no config.json; pass the original LLaVA-Med checkpoint directory as src_dir")
    config = json.loads(path.read_text(encoding="utf-8"))
    kind = config.get("model_type")
    if kind not in TEXT_FAMILIES:
        raise ModelLoadError(
            f"{path}: model_type {kind!r} is not an original LLaVA checkpoint ({sorted(TEXT_FAMILIES)})"
        )
    if "text_config" in config:
        raise ModelLoadError(f"{path} is already in llava-hf format (it has text_config): load_reader reads it as is")
    if config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ModelLoadError(
            f"{path}: mm_projector_type {config.get('mm_projector_type', 'linear')!r} has no llava-hf equivalent; "
            "only LLaVA-1.5's 'mlp2x_gelu' projector converts"
        )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURE:
        raise ModelLoadError(f"{path}: mm_vision_select_feature {feature!r} is not one of {sorted(_SELECT_FEATURE)}")
    return config


def text_config(original: Mapping[str, Any], vocab_size: int, pad_token_id: int) -> PretrainedConfig:
    """The language model's transformers config from the original config's fields (vocabulary resized)."""
    cls, _ = TEXT_FAMILIES[original["model_type"]]
    fields = {k: original[k] for k in _TEXT_FIELDS if k in original and original[k] is not None}
    fields.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": float(original.get("rope_theta", 10000.0))}
    return cls(**fields)


def vision_config(vision_dir: Path) -> CLIPVisionConfig:
    """The CLIP tower's vision config from ``vision_dir`` (a CLIPModel's or a CLIPVisionModel's config.json)."""
    path = vision_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{vision_dir} has no config.json; pass vision_tower_dir = the local copy of the CLIP tower the "
            "checkpoint's mm_vision_tower names (e.g. openai/clip-vit-large-patch14-336, Hugging Face format)"
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    return CLIPVisionConfig(**raw["vision_config"]) if "vision_config" in raw else CLIPVisionConfig(**raw)


def checkpoint_tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the original checkpoint (``*.safetensors`` shards, else ``pytorch_model*.bin``)."""
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    yield key, f.get_tensor(key)
        return
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelLoadError(f"{src} holds no *.safetensors or pytorch_model*.bin weights")
    for shard in bins:
        yield from torch.load(shard, map_location="cpu", weights_only=True).items()


def hf_key(key: str) -> str | None:
    """The llava-hf name of an original tensor (None: not part of the converted model)."""
    if key.startswith("model.mm_projector.0."):
        return "model.multi_modal_projector.linear_1." + key.removeprefix("model.mm_projector.0.")
    if key.startswith("model.mm_projector.2."):
        return "model.multi_modal_projector.linear_2." + key.removeprefix("model.mm_projector.2.")
    if key.startswith("model.vision_tower.vision_tower.vision_model."):
        return "model.vision_tower." + key.removeprefix("model.vision_tower.vision_tower.vision_model.")
    if key.startswith("model.vision_tower."):
        return None  # other tower tensors (e.g. a text side) are not part of LLaVA
    if key.startswith("lm_head."):
        return key
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    return None


def tokenizer_with_image_token(src: Path) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The checkpoint's tokenizer with ``<image>`` (and ``<pad>`` if it has no pad token) added."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(
            f"could not load the tokenizer of {src}: {exc}. The checkpoint's tokenizer files (tokenizer.json, or "
            "tokenizer.model with the sentencepiece package installed) must be in src_dir"
        ) from exc
    added = []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    tokenizer.padding_side = "left"
    return tokenizer, added


def _grow(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if rows <= weight.shape[0]:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)


def convert_llava_med(
    src_dir: str | Path, vision_tower_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write the llava-hf model and processor of the original checkpoint ``src_dir`` to ``out_dir``
    (module docstring). ``dtype``: ``auto`` keeps the original's ``torch_dtype``, else a name of
    :data:`~medrag_ray.models.common.DTYPES`."""
    src = require_directory(src_dir, "convert_llava_med src_dir")
    vision_dir = require_directory(vision_tower_dir, "convert_llava_med vision_tower_dir")
    original = read_original_config(src)
    tokenizer, added = tokenizer_with_image_token(src)
    vocab = len(tokenizer)
    text = text_config(original, vocab, int(tokenizer.pad_token_id))
    vision = vision_config(vision_dir)
    if not (vision_dir / "preprocessor_config.json").is_file():
        raise ModelLoadError(f"{vision_dir} has no preprocessor_config.json (CLIP's image processor); copy it from "
                             f"the tower's release ({original.get('mm_vision_tower')!r})")
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=_SELECT_FEATURE[original.get("mm_vision_select_feature", "patch")],
        projector_hidden_act="gelu", tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
    )
    dtype_name = (original.get("torch_dtype") or original.get("dtype") or "float32") if dtype == "auto" else dtype
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype {dtype_name!r} is not one of {['auto', *DTYPES]}; pass dtype=bfloat16 (or float32)")
    target = DTYPES[dtype_name]

    state: dict[str, torch.Tensor] = {}
    for key, tensor in checkpoint_tensors(src):
        name = hf_key(key)
        if name is not None:
            state[name] = tensor.to(target)
    if not any(k.startswith("model.vision_tower.") for k in state):
        logger.info("the checkpoint holds no vision tower: taking its weights from %s", vision_dir)
        try:
            tower = CLIPVisionModel.from_pretrained(str(vision_dir), local_files_only=True, dtype=target)
        except OSError as exc:
            raise ModelLoadError(
                f"{src} holds no vision tower and {vision_dir} no CLIP weights ({exc}); pass vision_tower_dir = "
                f"the full local copy of {original.get('mm_vision_tower')!r} (config.json, weights, "
                "preprocessor_config.json)"
            ) from exc
        for key, tensor in tower.state_dict().items():
            state[f"model.vision_tower.{key}"] = tensor
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in state:
            state[key] = _grow(state[key], vocab)

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if config.tie_word_embeddings and missing == ["lm_head.weight"]:
        missing = []
    if missing or unexpected:
        raise ModelLoadError(
            f"{src}: the converted weights do not fit a LlavaForConditionalGeneration of this config (missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}); is vision_tower_dir the tower of mm_vision_tower "
            f"({original.get('mm_vision_tower')!r})?"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _, template = TEXT_FAMILIES[original["model_type"]]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(str(vision_dir), local_files_only=True),
        tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=template,
    )
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        note = {"converted_from": str(src), "vision_tower_dir": str(vision_dir), "model_type": original["model_type"],
                "added_tokens": added, "dtype": str(target).removeprefix("torch.")}
        (tmp / "medrag_conversion.json").write_text(json.dumps(note, indent=1) + "\n", encoding="utf-8")
    logger.info("converted %s (%s) to llava-hf in %s; added tokens %s", src, original["model_type"], out_dir, added)
    return Path(out_dir)
