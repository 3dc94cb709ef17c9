"""Model size configs: plain frozen dataclasses, importable without torch/transformers/open_clip.

Job configs (:mod:`medrag_ray.config`) nest these, so loading and validating a YAML stays fast; the builders
in :mod:`medrag_ray.models.dual_encoder` and :mod:`medrag_ray.models.reader` turn them into models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

SIMPLE_TOKENIZER_VOCAB_SIZE = 49408
"""Size of open_clip's shipped BPE vocabulary; the tiny text tower's embedding table has this many rows."""
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

PROJECTOR_ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_pytorch_tanh", "relu", "silu")


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """A tiny ViT CLIP; the defaults build a ~4M-parameter model that runs on CPU in milliseconds."""

    embed_dim: int = 64
    """Dimension of the shared (normalized) embedding space."""
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 2
    vision_head_width: int = 32
    """Width of one attention head of the vision tower (heads = vision_width / vision_head_width)."""
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 77
    """Text tokens per caption (open_clip's tokenizer pads/truncates to this)."""
    mlp_ratio: float = 4.0
    init_temperature: float = 0.07
    """Initial softmax temperature of the contrastive loss (logit_scale = log(1 / temperature))."""
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        positive = (
            "embed_dim",
            "image_size",
            "patch_size",
            "vision_width",
            "vision_layers",
            "vision_head_width",
            "text_width",
            "text_layers",
            "text_heads",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DualEncoderConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"DualEncoderConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size}); change one of them"
            )
        if self.vision_width % self.vision_head_width:
            raise ValueError(
                f"DualEncoderConfig.vision_width ({self.vision_width}) must be a multiple of "
                f"vision_head_width ({self.vision_head_width})"
            )
        if self.text_width % self.text_heads:
            raise ValueError(
                f"DualEncoderConfig.text_width ({self.text_width}) must be a multiple of text_heads "
                f"({self.text_heads})"
            )
        if not 8 <= self.context_length <= 512:
            raise ValueError(
                f"DualEncoderConfig.context_length must be in [8, 512], got {self.context_length}"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"DualEncoderConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0 < self.init_temperature <= 1:
            raise ValueError(
                f"DualEncoderConfig.init_temperature must be in (0, 1], got {self.init_temperature}"
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"DualEncoderConfig.{name} needs 3 values (R, G, B), got {list(value)}")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"DualEncoderConfig.image_std must be > 0, got {list(self.image_std)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DualEncoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys fail naming them (a config from another version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DualEncoderConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        values = dict(data)
        for name in ("image_mean", "image_std"):
            if name in values:
                values[name] = tuple(float(v) for v in values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_mean"], data["image_std"] = list(self.image_mean), list(self.image_std)
        return data

    def open_clip_model_cfg(self) -> dict[str, Any]:
        """The open_clip model config (the ``model_cfg`` of an ``open_clip_config.json``)."""
        return {
            "embed_dim": self.embed_dim,
            "init_logit_scale": math.log(1.0 / self.init_temperature),
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_head_width,
                "mlp_ratio": self.mlp_ratio,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": SIMPLE_TOKENIZER_VOCAB_SIZE,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
                "mlp_ratio": self.mlp_ratio,
            },
        }

    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's preprocessing config (resize shortest side, center crop, normalize)."""
        return {
            "size": self.image_size,
            "mode": "RGB",
            "mean": list(self.image_mean),
            "std": list(self.image_std),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
        }

    @property
    def model_name(self) -> str:
        """The unique open_clip model name this config is registered under (a hash of the config)."""
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        return f"medrag-tiny-clip-{digest}"


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
    """A tiny LLaVA: CLIP ViT vision tower, 2-layer MLP projector, Llama decoder; vocab from the tokenizer."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 128
    max_length: int = 512
    """Longest sequence (prompt with image tokens + answer); the decoder's position budget."""
    vision_feature_layer: int = -1
    """Vision hidden state fed to the projector (LLaVA-1.5 uses -2 of 24 layers; -1 suits 2 layers)."""
    projector_act: str = "gelu"

    def __post_init__(self) -> None:
        positive = (
            "image_size",
            "patch_size",
            "vision_hidden",
            "vision_layers",
            "vision_heads",
            "vision_intermediate",
            "text_hidden",
            "text_layers",
            "text_heads",
            "text_intermediate",
            "max_length",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ReaderConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ReaderConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if self.vision_hidden % self.vision_heads:
            raise ValueError(
                f"ReaderConfig.vision_hidden ({self.vision_hidden}) must be a multiple of vision_heads "
                f"({self.vision_heads})"
            )
        if self.text_hidden % self.text_heads or (self.text_hidden // self.text_heads) % 2:
            raise ValueError(
                f"ReaderConfig.text_hidden ({self.text_hidden}) must be a multiple of text_heads "
                f"({self.text_heads}) "
                "with an even head size (rotary embeddings)"
            )
        if not -(self.vision_layers + 1) <= self.vision_feature_layer <= self.vision_layers:
            raise ValueError(
                f"ReaderConfig.vision_feature_layer must index one of the {self.vision_layers + 1} vision "
                "hidden "
                f"states (in [{-(self.vision_layers + 1)}, {self.vision_layers}]), got "
                f"{self.vision_feature_layer}"
            )
        if self.projector_act not in PROJECTOR_ACTIVATIONS:
            raise ValueError(
                f"ReaderConfig.projector_act must be one of {list(PROJECTOR_ACTIVATIONS)}, got "
                f"{self.projector_act!r}"
            )
        if self.max_length < self.num_image_tokens + 16:
            raise ValueError(
                f"ReaderConfig.max_length ({self.max_length}) must leave room for the "
                f"{self.num_image_tokens} image "
                "tokens plus a prompt; raise max_length or patch_size"
            )

    @property
    def num_image_tokens(self) -> int:
        """Tokens one ``<image>`` expands to: one per patch (the CLS token is dropped, LLaVA's default)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReaderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ReaderConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
