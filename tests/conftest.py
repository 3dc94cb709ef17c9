"""Shared fixtures: offline environment, the real-data folder (skipped when absent), temp artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from medrag_ray.utils import shared_data_dir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip with a clear message on a machine without it."""
    path = shared_data_dir()
    if path is None:
        pytest.skip(
            "real data not found: put the shared data folder at ../shared/data beside the checkout "
            "or set MEDRAG_SHARED_DATA"
        )
    return path


def require(shared: Path, *parts: str) -> Path:
    """A path inside the shared data folder, or skip naming what is missing."""
    path = shared.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data file missing: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline's artifacts layout with untrained tiny models, built in-process in seconds (read-only: tests
    that change artifacts build their own)."""
    from tests.unit.serving.artifacts import build_tiny_artifacts

    return build_tiny_artifacts(tmp_path_factory.mktemp("tiny_artifacts"))
