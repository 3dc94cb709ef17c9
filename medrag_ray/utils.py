"""Small shared helpers: logging set-up, seeding, the shared real-data folder, atomic output folders."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure root logging once for a job entrypoint (idempotent)."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in root.handlers:  # also the handlers Ray installs in its worker processes
        if _quiet_root_info not in handler.filters:
            handler.addFilter(_quiet_root_info)
    root.setLevel(level)


def _quiet_root_info(record: logging.LogRecord) -> bool:
    """Drop INFO chatter that libraries (open_clip) send through the root logger; keep their warnings."""
    return record.name != "root" or record.levelno >= logging.WARNING


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (if imported) torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.manual_seed(seed)


def shared_data_dir() -> Path | None:
    """The real-data folder (``$MEDRAG_SHARED_DATA`` or ``../shared/data`` beside the checkout), if present."""
    env = os.environ.get("MEDRAG_SHARED_DATA")
    candidates = [Path(env)] if env else []
    repo_root = Path(__file__).resolve().parents[1]
    candidates.append(repo_root.parent / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None


def check_writable(out_dir: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, if ``out_dir`` already holds something and ``overwrite`` is off."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already holds output (or other files); pass overwrite=true to replace it, "
            "or choose another output directory"
        )
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out_dir`` to write into; on success it replaces ``out_dir`` by renames.

    A crash or an exception leaves ``out_dir`` as it was (the temp dir is removed), so a job never leaves
    half-written output behind and an earlier result is not lost. An existing ``out_dir`` is moved aside
    first and deleted only after the new one is in place.
    """
    out = check_writable(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists() and not out.exists():
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    update_hash(h, path)
    return h.hexdigest()


def update_hash(h: Any, path: str | Path) -> None:
    """Feed a file's bytes to the hash object ``h``, in 1 MiB blocks."""
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
