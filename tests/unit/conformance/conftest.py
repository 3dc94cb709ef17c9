"""The tiny real-architecture checkpoints, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.conformance.builders import READERS


@pytest.fixture(scope="session")
def reader_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conformance")
    return {name: build(root / name) for name, build in READERS.items()}
