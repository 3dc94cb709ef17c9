"""Domain identification F(x_v) (MMed-RAG §3.1): a CLIP image tower with a linear head over domains.

The paper fine-tunes BiomedCLIP's image encoder as a domain classifier; the router here is the image
tower of a :class:`~medrag_ray.models.dual_encoder.DualEncoder` (tiny from a config, or real from disk via
``load_dual_encoder`` + :func:`router_from_encoder`) followed by a linear layer on the L2-normalized
image embedding: ``logits = W · normalize(E_img(x)) + b``. Training updates tower and head together.

Confidence: ``softmax(logits / temperature)``, the temperature fitted on validation images after training
(:mod:`medrag_ray.eval.calibration`; 1 until then). A calibrated confidence below ``unknown_threshold`` routes
to :data:`UNKNOWN_DOMAIN` -- an image of a domain the router does not know -- instead of guessing (0 = never).
Both are stored in the router's card.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from medrag_ray.data.schema import DOMAINS, UNKNOWN_DOMAIN
from medrag_ray.models.common import (
    ModelCard,
    ModelLoadError,
    check_card_kind,
    load_state_dict,
    read_card,
    require_directory,
    save_state_dict,
    write_card,
)
from medrag_ray.models.dual_encoder import (
    DualEncoder,
    DualEncoderConfig,
    build_dual_encoder,
    load_dual_encoder,
    save_dual_encoder,
)

logger = logging.getLogger(__name__)

ENCODER_SUBDIR = "encoder"
HEAD_STEM = "router_head"


def _check_domains(domains: Sequence[str]) -> tuple[str, ...]:
    domains = tuple(domains)
    if len(domains) < 2 or len(set(domains)) != len(domains):
        raise ValueError(f"router domains must be at least 2 distinct names, got {list(domains)}")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"router domains {unknown} are unknown; choose from {list(DOMAINS)}")
    return domains


class DomainRouter(nn.Module):
    """Image tower + linear head; ``forward(pixels) -> logits [B, n_domains]`` in the order of ``domains``."""

    def __init__(
        self, encoder: DualEncoder, domains: Sequence[str], temperature: float = 1.0, unknown_threshold: float = 0.0
    ) -> None:
        super().__init__()
        self.domains: tuple[str, ...] = _check_domains(domains)
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, len(self.domains)).to(
            device=encoder.device, dtype=encoder.dtype
        )
        self.set_calibration(temperature, unknown_threshold)

    def set_calibration(self, temperature: float, unknown_threshold: float) -> None:
        """Use ``softmax(logits / temperature)`` as confidence; below ``unknown_threshold`` is an unknown domain."""
        if not temperature > 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        if not 0.0 <= unknown_threshold < 1.0:
            raise ValueError(f"router unknown_threshold must be in [0, 1), got {unknown_threshold}")
        self.temperature = float(temperature)
        self.unknown_threshold = float(unknown_threshold)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated domain probabilities ``softmax(logits / temperature)``."""
        return torch.softmax(logits.detach().float() / self.temperature, dim=-1)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the pixel batch :meth:`forward` takes (the encoder's transform)."""
        return self.encoder.preprocess(images)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized image embeddings ``[B, embed_dim]`` (with gradient through the tower)."""
        return self.encoder.encode_image(pixels, normalize=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))

    def predictions_from_logits(
        self, logits: torch.Tensor, indexed: Collection[str] | None = None
    ) -> list[tuple[str, float]]:
        """(argmax domain, its calibrated probability) per row of ``logits``; :data:`UNKNOWN_DOMAIN` (with that
        probability) when it is below ``unknown_threshold`` or, given ``indexed``, not one of those domains."""
        conf, idx = self.probabilities(logits).max(dim=-1)
        out = []
        for i, c in zip(idx.tolist(), conf.tolist(), strict=True):
            known = c >= self.unknown_threshold and (indexed is None or self.domains[i] in indexed)
            out.append((self.domains[i] if known else UNKNOWN_DOMAIN, float(c)))
        return out

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[Image.Image] | torch.Tensor,
        batch_size: int = 64,
        indexed: Collection[str] | None = None,
    ) -> list[tuple[str, float]]:
        """Route images (PIL or preprocessed pixels) to ``(domain, confidence)``, in batches (``indexed``: see
        :meth:`predictions_from_logits`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[tuple[str, float]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = chunk if isinstance(chunk, torch.Tensor) else self.preprocess(chunk)
            out.extend(self.predictions_from_logits(self(pixels), indexed))
        return out


def router_from_encoder(encoder: DualEncoder, domains: Sequence[str]) -> DomainRouter:
    """A router on an existing dual encoder's image tower (e.g. BiomedCLIP from ``load_dual_encoder``)."""
    return DomainRouter(encoder, domains)


def build_router(
    encoder_cfg: DualEncoderConfig | None,
    domains: Sequence[str],
    *,
    device: str = "cpu",
    dtype: str = "auto",
) -> DomainRouter:
    """A tiny router: a tiny dual encoder from ``encoder_cfg`` and a fresh head (offline)."""
    return DomainRouter(build_dual_encoder(encoder_cfg, device=device, dtype=dtype), domains)


def save_router(router: DomainRouter, directory: str | Path) -> Path:
    """Write ``encoder/`` (a dual-encoder directory), ``router_head.safetensors`` and the card."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_dual_encoder(router.encoder, out / ENCODER_SUBDIR)
    save_state_dict(router.head.state_dict(), out, stem=HEAD_STEM)
    encoder_cfg = router.encoder.config
    write_card(
        out,
        ModelCard(
            kind="router",
            config={"encoder": encoder_cfg.to_dict() if encoder_cfg is not None else None},
            extra={"domains": list(router.domains), "encoder_dir": ENCODER_SUBDIR,
                   "temperature": router.temperature, "unknown_threshold": router.unknown_threshold},
        ),
    )
    logger.info("saved router over %s to %s", list(router.domains), out)
    return out


def load_router(directory: str | Path, *, device: str = "cpu", dtype: str = "auto") -> DomainRouter:
    """Load a router saved by :func:`save_router`."""
    path = require_directory(directory, "load_router").resolve()
    card = read_card(path)
    if card is None:
        raise ModelLoadError(
            f"directory {path} has no medrag_model.json; pass a directory saved by "
            "medrag_ray.models.router.save_router (to start from a real image tower such as BiomedCLIP, load "
            "it "
            "with load_dual_encoder and call router_from_encoder)"
        )
    check_card_kind(card, "router", path, "pass a router directory written by save_router")
    domains = card.extra.get("domains")
    if not isinstance(domains, list):
        raise ModelLoadError(f"{path}/medrag_model.json has no 'extra.domains' list; save the router again")
    encoder = load_dual_encoder(
        path / str(card.extra.get("encoder_dir", ENCODER_SUBDIR)), device=device, dtype=dtype
    )
    router = DomainRouter(encoder, domains, float(card.extra.get("temperature", 1.0)),
                          float(card.extra.get("unknown_threshold", 0.0)))
    try:
        router.head.load_state_dict(load_state_dict(path, stem=HEAD_STEM))
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{path}: the router head does not fit the encoder ({exc}); the directory mixes two saves, save "
            "again"
        ) from exc
    logger.info("loaded router over %s from %s", domains, path)
    return router.eval()
