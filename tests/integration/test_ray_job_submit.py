"""`ray start --head` + `ray job submit --working-dir` of jobs/make_data.py, as a user launches a job
(the head is the ``ray_head`` fixture of ``tests/integration/conftest.py``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.integration.conftest import HeadNode, submit_job

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

N_PER_DOMAIN = 30
SPLITS = ("train", "val", "test")
MAX_UPLOAD_BYTES = 5 << 20
"""The job's unpacked working dir must stay small: source only, no .git / artifacts / venvs."""


def _unpacked_working_dirs(temp_dir: Path) -> list[Path]:
    root = temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    return [p for p in root.glob("_ray_pkg_*") if p.is_dir()] if root.is_dir() else []


def test_job_submit_make_data(ray_head: HeadNode, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    make_data = REPO_ROOT / "jobs" / "make_data.py"
    assert make_data.is_file(), f"{make_data} is missing"
    out_dir = tmp_path / "synthetic"
    job_args = [f"out_dir={out_dir}", f"data.n_per_domain={N_PER_DOMAIN}"]
    t0 = time.monotonic()
    submission_id, res = submit_job(ray_head, REPO_ROOT, "jobs/make_data.py", job_args, cwd=tmp_path)
    logger.info("ray job submit took %.1f s", time.monotonic() - t0)
    log = f"stdout:\n{res.stdout[-6000:]}\nstderr:\n{res.stderr[-3000:]}"
    assert res.returncode == 0, log

    client = JobSubmissionClient(ray_head.dashboard_url)
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED, log
    info = client.get_job_info(submission_id)
    runtime_env = info.runtime_env or {}
    assert str(runtime_env.get("working_dir", "")).startswith("gcs://_ray_pkg_"), runtime_env
    assert runtime_env.get("env_vars", {}).get("HF_HUB_OFFLINE") == "1", runtime_env

    # What reached the node: source only (no .git, artifacts, venvs, caches) and small.
    unpacked = _unpacked_working_dirs(ray_head.temp_dir)
    assert len(unpacked) == 1, unpacked
    files = [p for p in unpacked[0].rglob("*") if p.is_file()]
    rel = {p.relative_to(unpacked[0]).as_posix() for p in files}
    assert {"jobs/make_data.py", "medrag_ray/config.py", "pyproject.toml"} <= rel
    forbidden = [r for r in rel if r.split("/")[0] in {".git", "artifacts", ".venv", "venv"}]
    forbidden += [r for r in rel if "__pycache__" in r or r.endswith(".pyc")]
    assert not forbidden, forbidden[:10]
    size = sum(p.stat().st_size for p in files)
    assert size < MAX_UPLOAD_BYTES, f"working dir upload is {size / 2**20:.1f} MiB"

    # The dataset the job wrote (outside the working dir, at the absolute path given).
    from jobs.make_data import parse_args

    domains = parse_args(job_args).data.domains  # the config the job resolved (default YAML + overrides)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["config"]["n_per_domain"] == N_PER_DOMAIN  # the data section of the job config
    assert {d: sum(by_split.values()) for d, by_split in counts["cases"].items()} == dict.fromkeys(
        domains, N_PER_DOMAIN
    )
    for split in SPLITS:
        name = f"samples_{split}.parquet"
        table = pq.read_table(out_dir / name)
        assert table.num_rows > 0, split
        assert table.num_rows == counts["samples_per_split"][split] == manifest["files"][name]["rows"]
        per_domain = Counter(table.column("domain").to_pylist())
        assert per_domain == {d: sum(counts["samples"][d][split].values()) for d in domains}, split
    corpus = pq.read_table(out_dir / "corpus.parquet")
    assert corpus.num_rows == manifest["files"]["corpus.parquet"]["rows"] > 0
    assert Counter(corpus.column("domain").to_pylist()) == counts["corpus"]
    assert set(counts["corpus"]) == set(domains)




def test_a_job_run_by_a_python_without_the_project_says_what_to_do(ray_head: HeadNode, tmp_path: Path) -> None:
    """`ray job submit -- python ...` runs the `python` on the PATH of `ray start`; when that is a Python without
    the project (the system one, when the head was not started from the venv), the job fails at once with the
    step that fixes it -- not with `No module named 'pyarrow'` somewhere in an import."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    python = fake_bin / "python"  # an interpreter without site-packages: none of the dependencies importable
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    env_file = tmp_path / "runtime_env.yaml"
    runtime_env = yaml.safe_load((REPO_ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["PATH"] = f"{fake_bin}:/usr/bin:/bin"
    env_file.write_text(yaml.safe_dump(runtime_env))
    out_dir = tmp_path / "never"
    submission_id, res = submit_job(ray_head, REPO_ROOT, "jobs/make_data.py", [f"out_dir={out_dir}"], cwd=tmp_path,
                                    timeout_s=180, runtime_env=env_file)
    client = JobSubmissionClient(ray_head.dashboard_url)
    assert res.returncode != 0 and client.get_job_status(submission_id) == JobStatus.FAILED
    logs = client.get_job_logs(submission_id)
    assert "does not have the project's dependencies" in logs, logs[-3000:]
    assert "source .venv/bin/activate && ray start --head" in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    assert not out_dir.exists()
