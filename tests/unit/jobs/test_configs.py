"""Every shipped job YAML loads into its job's config, and its header says how to launch it."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parents[3] / "jobs" / "configs"
YAMLS = sorted(CONFIG_DIR.glob("*.yaml"))


def job_for(path: Path) -> str:
    """``<job>.yaml`` or ``<job>_<variant>.yaml`` -> the longest job module name that prefixes the stem."""
    jobs_dir = CONFIG_DIR.parent
    names = [p.stem for p in jobs_dir.glob("*.py") if not p.stem.startswith("_")]
    matches = [n for n in names if path.stem == n or path.stem.startswith(n + "_")]
    if not matches:
        raise AssertionError(f"{path.name} belongs to no job in {jobs_dir}; name it <job>[_<variant>].yaml")
    return max(matches, key=len)


def test_there_are_configs() -> None:
    assert {"make_data.yaml", "prepare_models.yaml", "pipeline.yaml", "convert_data.yaml"} <= {p.name for p in YAMLS}


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_loads_into_its_job_config(path: Path) -> None:
    job = job_for(path)
    module = importlib.import_module(f"jobs.{job}")
    cfg = module.parse_args(["--config", str(path)])
    assert dataclasses.is_dataclass(cfg)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"python jobs/{job}.py" in line for line in header), f"{path.name}: header lacks the launch command"


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_is_the_default_of_its_job(path: Path) -> None:
    """The job without --config uses the YAML of the same name, so the two cannot drift apart."""
    job = job_for(path)
    if path.stem != job:
        pytest.skip(f"{path.name} is a variant of {job}")
    module = importlib.import_module(f"jobs.{job}")
    assert module.parse_args([]) == module.parse_args(["--config", str(path)])
