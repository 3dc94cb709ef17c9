"""`ray start --head` + `ray job submit --working-dir` of jobs/make_data.py, as a user launches a job.

The head runs in its own temp dir, ports and process group; teardown kills exactly that process group
(`ray stop` would stop every Ray on the machine, including other test sessions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO_ROOT

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

N_PER_DOMAIN = 30
SPLITS = ("train", "val", "test")
MAX_UPLOAD_BYTES = 5 << 20
"""The job's unpacked working dir must stay small: source only, no .git / artifacts / venvs."""


@dataclass(frozen=True)
class HeadNode:
    temp_dir: Path
    dashboard_url: str
    pgid: int
    env: dict[str, str]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (sockets held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a recycled group id that is not ours
        return False
    return True


def _stray_processes(temp_dir: Path) -> list[psutil.Process]:
    """Processes of this head outside its process group: a job's driver runs in its own process group,
    but its working dir (and often its command line) lies under the head's unique temp dir."""
    marker = str(temp_dir)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            cwd = proc.info["cwd"] or ""
        except psutil.Error:
            continue
        if proc.pid != os.getpid() and (marker in cmdline or cwd.startswith(marker)):
            found.append(proc)
    return found


def _stop_strays(temp_dir: Path) -> list[psutil.Process]:
    """Terminate (then kill) :func:`_stray_processes`; return those still alive."""
    procs = _stray_processes(temp_dir)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    return alive


def _stop_group(pgid: int, grace_s: float = 3.0) -> None:
    """SIGTERM the head's process group, then SIGKILL what is left after ``grace_s``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.5)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s: {last}")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[HeadNode]:
    # Short temp root: Ray's unix socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must
    # stay under the 107-byte AF_UNIX limit, which pytest's tmp_path easily exceeds.
    temp_dir = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent = _free_ports(7)
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="disabled",  # both sides of `ray job submit` need the same explicit mode
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this interpreter
    )
    cmd = [
        str(Path(bin_dir) / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    # A new session makes every Ray process of this head (daemons, workers, the job driver) share one
    # process group whose id is the `ray start` pid: teardown stops exactly those.
    proc = subprocess.Popen(
        cmd, env=env, cwd=temp_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    pgid = proc.pid
    try:
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"`ray start --head` failed ({proc.returncode}):\n{out[-4000:]}")
        url = f"http://127.0.0.1:{dash}"
        _wait_http(f"{url}/api/version", timeout_s=60)
        yield HeadNode(temp_dir=temp_dir, dashboard_url=url, pgid=pgid, env=env)
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_group(pgid)
        strays = _stop_strays(temp_dir)
        leaked = _group_alive(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leaked and not strays, f"Ray processes of group {pgid} survived SIGKILL: {strays}"


def _unpacked_working_dirs(temp_dir: Path) -> list[Path]:
    root = temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    return [p for p in root.glob("_ray_pkg_*") if p.is_dir()] if root.is_dir() else []


def test_job_submit_make_data(ray_head: HeadNode, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    make_data = REPO_ROOT / "jobs" / "make_data.py"
    assert make_data.is_file(), f"{make_data} is missing"
    out_dir = tmp_path / "synthetic"
    job_args = [f"out_dir={out_dir}", f"data.n_per_domain={N_PER_DOMAIN}"]
    submission_id = f"medrag-make-data-{uuid.uuid4().hex[:8]}"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        ray_head.dashboard_url,
        "--submission-id",
        submission_id,
        "--runtime-env",
        str(REPO_ROOT / "cluster" / "runtime_env.yaml"),
        "--working-dir",
        str(REPO_ROOT),
        "--",
        "python",
        "jobs/make_data.py",
        *job_args,
    ]
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=ray_head.env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
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


