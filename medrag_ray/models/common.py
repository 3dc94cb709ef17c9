"""What every model directory shares: the ``medrag_model.json`` card, weight files, device and dtype.

Every directory that :mod:`medrag_ray.models` saves holds a small JSON card, ``medrag_model.json``::

    {"kind": "dual_encoder", "created_by": "medrag-ray", "format_version": 1, "config": {...}, "extra": {...}}

so that a loader knows what it is given and can refuse, with the remedy, a directory of another kind.
Real checkpoints (BiomedCLIP, LLaVA-Med, Qwen2-VL) have no card; each loader recognises their own layout
instead (``open_clip_config.json``, ``config.json``) and loads them through the same interface.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CARD_FILE = "medrag_model.json"
CREATED_BY = "medrag-ray"
CARD_FORMAT_VERSION = 1
MODEL_KINDS: tuple[str, ...] = ("dual_encoder", "router", "reader", "tokenizer", "dual_head_retriever")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Names accepted for ``dtype`` options; ``"auto"`` also is: bfloat16 on CUDA, float32 on CPU."""


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; the message names the directory and what to pass instead."""


@dataclass(frozen=True)
class ModelCard:
    """The ``medrag_model.json`` of a saved model directory."""

    kind: str
    config: dict[str, Any] | None = None
    """The builder's config as a plain dict (``None`` for models loaded from real weights)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Kind-specific facts (model id, domain list, sub-directories)."""
    created_by: str = CREATED_BY
    format_version: int = CARD_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"ModelCard.kind must be one of {list(MODEL_KINDS)}, got {self.kind!r}")
        if self.config is not None and not isinstance(self.config, dict):
            raise ValueError(f"ModelCard.config must be a dict or None, got {type(self.config).__name__}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"ModelCard.extra must be a dict, got {type(self.extra).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "created_by": self.created_by,
            "format_version": self.format_version,
            "config": self.config,
            "extra": self.extra,
        }


def write_card(directory: str | Path, card: ModelCard) -> Path:
    """Write ``medrag_model.json`` into ``directory`` (created if needed); returns the file's path."""
    path = Path(directory) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_card(directory: str | Path) -> ModelCard | None:
    """The card of ``directory`` or ``None`` if it has none; a bad card raises :class:`ModelLoadError`."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"{path}: not valid JSON ({exc}); re-save the model with medrag_ray.models or delete the file"
        ) from exc
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ModelLoadError(f"{path}: expected a JSON object with a 'kind' key; re-save the model")
    if raw.get("created_by") != CREATED_BY:
        raise ModelLoadError(
            f"{path}: created_by is {raw.get('created_by')!r}, not {CREATED_BY!r}; this card was not written "
            "by medrag_ray.models, remove it or re-save the model"
        )
    version = raw.get("format_version", CARD_FORMAT_VERSION)
    if not isinstance(version, int) or version > CARD_FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: format_version {version!r} is newer than this code understands "
            f"({CARD_FORMAT_VERSION}); "
            "upgrade medrag-ray"
        )
    try:
        return ModelCard(
            kind=raw["kind"],
            config=raw.get("config"),
            extra=raw.get("extra") or {},
            created_by=raw["created_by"],
            format_version=version,
        )
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def require_directory(directory: str | Path, what: str) -> Path:
    """``directory`` as a Path, or :class:`ModelLoadError` naming ``what`` was expected there."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"{what}: directory {path} does not exist; pass the directory the model was saved to"
        )
    return path


def check_card_kind(card: ModelCard, expected: str, directory: Path, remedy: str) -> None:
    """Refuse a card of another kind (e.g. a reader directory handed to the router loader)."""
    if card.kind != expected:
        raise ModelLoadError(
            f"directory {directory} holds a medrag-ray '{card.kind}' model, not a '{expected}'; {remedy}"
        )


# ------------------------------------------------------------------------------------------ weights


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], directory: str | Path, stem: str = "model"
) -> Path:
    """Save tensors as ``<stem>.safetensors`` (``<stem>.bin`` via torch.save if safetensors is missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Clone so that tensors sharing storage (tied weights) are written independently.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        path = directory / f"{stem}.bin"
        torch.save(tensors, path)
        return path
    path = directory / f"{stem}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "created_by": CREATED_BY})
    return path


def load_state_dict(directory: str | Path, stem: str = "model") -> dict[str, torch.Tensor]:
    """Load what :func:`save_state_dict` wrote (safetensors preferred), on CPU."""
    directory = Path(directory)
    st_path, pt_path = directory / f"{stem}.safetensors", directory / f"{stem}.bin"
    if st_path.is_file():
        from safetensors.torch import load_file

        return load_file(str(st_path), device="cpu")
    if pt_path.is_file():
        return torch.load(pt_path, map_location="cpu", weights_only=True)
    raise ModelLoadError(
        f"directory {directory} has neither {st_path.name} nor {pt_path.name}; the save did not finish, save "
        "again"
    )


# ------------------------------------------------------------------------------------- device, dtype


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (CUDA if present) as a torch.device."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
            ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asks for CUDA but torch sees no GPU here; use device='cpu' or 'auto'"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only 'cpu' and 'cuda' are supported")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A dtype name (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``) as a torch.dtype.

    ``"auto"`` is bfloat16 on CUDA and float32 on CPU. float16 on CPU is refused (too slow and
    unsupported by several kernels); bfloat16 works on CPU.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {list(DTYPES)}")
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto' or one of {list(DTYPES)}")
    if resolved == torch.float16 and device.type == "cpu":
        raise ValueError("dtype float16 is not supported on CPU; use 'float32' or 'bfloat16'")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """The name :func:`resolve_dtype` accepts for ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no name here; use one of {list(DTYPES)}")
