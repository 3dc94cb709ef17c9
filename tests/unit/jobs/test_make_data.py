"""jobs/make_data.py: config loading, writing a dataset, refusing to clobber one, the script entrypoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.make_data import DEFAULT_CONFIG, main, parse_args
from medrag_ray.config import ConfigError, MakeDataConfig
from medrag_ray.data import synthetic as syn
from medrag_ray.data.schema import SPLITS

TINY = ["data.n_per_domain=12", "data.n_phenotypes=2", "data.image_size=16"]
FILES = (*(syn.samples_name(s) for s in SPLITS), syn.CORPUS_NAME, syn.MANIFEST_NAME)


def test_default_yaml_loads_and_matches_the_config_defaults() -> None:
    text = DEFAULT_CONFIG.read_text()
    assert text.startswith("#") and "python jobs/make_data.py" in text.splitlines()[1]
    assert parse_args([]) == MakeDataConfig()


def test_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    cfg = parse_args([f"out_dir={tmp_path}", "overwrite=true", "data.domains=[radiology,dermatology]", *TINY])
    assert cfg.out_dir == str(tmp_path) and cfg.overwrite
    assert cfg.data.domains == ("radiology", "dermatology") and cfg.data.n_per_domain == 12
    with pytest.raises(ConfigError, match="n_phenotypes"):
        parse_args(["data.n_per_domain=12", "data.n_phenotypes=5"])
    with pytest.raises(ConfigError, match="unknown config key data.n_cases"):
        parse_args(["data.n_cases=3"])


def test_main_writes_the_dataset(tmp_path: Path) -> None:
    out = main(parse_args([f"out_dir={tmp_path / 'ds'}", *TINY]))
    assert out == tmp_path / "ds"
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    manifest = syn.load_manifest(out)
    assert manifest["config"]["n_per_domain"] == 12
    assert sorted(manifest["counts"]["cases"]) == ["ophthalmology", "pathology", "radiology"]
    assert all(sum(v.values()) == 12 for v in manifest["counts"]["cases"].values())


def test_second_run_without_overwrite_fails_and_keeps_the_first(tmp_path: Path) -> None:
    out = main(parse_args([f"out_dir={tmp_path / 'ds'}", *TINY]))
    before = {n: (out / n).read_bytes() for n in FILES}
    with pytest.raises(FileExistsError, match="overwrite=true"):
        main(parse_args([f"out_dir={out}", "data.seed=5", *TINY]))
    assert {n: (out / n).read_bytes() for n in FILES} == before
    main(parse_args([f"out_dir={out}", "data.seed=5", "overwrite=true", *TINY]))
    after = syn.load_manifest(out)
    assert after["config"]["seed"] == 5
    assert after["content_hash"] != json.loads(before[syn.MANIFEST_NAME])["content_hash"]


def test_script_entrypoint_runs_and_logs_counts(tmp_path: Path, repo_root: Path) -> None:
    out = tmp_path / "ds"
    result = subprocess.run(
        [sys.executable, str(repo_root / "jobs" / "make_data.py"), f"out_dir={out}", *TINY],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and "radiology: cases" in result.stderr
    # another process (other hash seed, fresh imports) writes byte-identical files
    here = main(parse_args([f"out_dir={tmp_path / 'here'}", *TINY]))
    for name in FILES:
        assert (out / name).read_bytes() == (here / name).read_bytes(), name
