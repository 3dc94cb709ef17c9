"""Helpers for the evaluation-job tests: the untrained init models and tiny synthetic eval data."""

from __future__ import annotations

from pathlib import Path

from medrag_ray.config import SyntheticDataConfig
from medrag_ray.data import synthetic as syn
from medrag_ray.data.schema import Sample, write_parquet
from medrag_ray.models.configs import DualEncoderConfig

REPO_ROOT = Path(__file__).resolve().parents[3]
INIT_DIR = REPO_ROOT / "artifacts" / "models" / "init"


def init_model_dir(kind: str, scratch: Path) -> Path:
    """``artifacts/models/init/<kind>`` (``encoder`` or ``router``) when the pipeline built it, else the same
    untrained tiny model built into ``scratch`` (so the tests also run on a fresh checkout)."""
    existing = INIT_DIR / kind
    if (existing / "medrag_model.json").is_file():
        return existing
    import torch

    from medrag_ray.models.dual_encoder import build_dual_encoder, save_dual_encoder
    from medrag_ray.models.router import build_router, save_router

    torch.manual_seed(0)
    if kind == "encoder":
        return save_dual_encoder(build_dual_encoder(DualEncoderConfig()), scratch / "encoder")
    return save_router(build_router(DualEncoderConfig(), ("ophthalmology", "pathology", "radiology")), scratch / kind)


def tiny_synthetic(out: Path, domains: tuple[str, ...], n_per_domain: int = 30, reports_only: bool = False) -> Path:
    """``samples_{train,val,test}.parquet`` of a small synthetic dataset (report rows only if asked)."""
    cfg = SyntheticDataConfig(domains=domains, n_per_domain=n_per_domain, n_phenotypes=2, image_size=32)
    ds = syn.generate(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in ds.samples.items():
        keep = [s for s in rows if s.answer_type == "report"] if reports_only else rows
        write_parquet(keep, Sample, out / syn.samples_name(split))
    return out
