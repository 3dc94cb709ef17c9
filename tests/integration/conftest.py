"""Shared fixtures of the integration tests: the tiny pipeline's artifacts (built once per session), and a private
`ray start --head` for `ray job submit` tests.

The head runs in its own temp dir, ports and process group; teardown kills exactly that process group
(`ray stop` would stop every Ray on the machine, including other test sessions).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

MINING_LIMIT = 40

TINY = [
    "data.domains=[radiology,pathology]", "data.n_per_domain=18", "data.n_phenotypes=3", "data.image_size=32",
    "models.tokenizer_vocab_size=400",
    "models.encoder.image_size=32", "models.reader.image_size=32", "router_train.epochs=3", "router_train.batch_size=4",
    "retriever_train.epochs=1", "retriever_train.batch_size=4", "reader_pretrain_cases=12", "reader_vision.epochs=2",
    "reader_vision.batch_size=4", "reader_pretrain.epochs=1",
    "reader_pretrain.batch_size=4", "reader_train.epochs=1", "reader_train.batch_size=4",
    f"mining_limit={MINING_LIMIT}", "dpo_train.epochs=1", "dpo_train.batch_size=2", "distill_limit=12",
    "distill_head_train.epochs=2", "distill_head_train.batch_size=2", "distill_fusion_train.epochs=1",
    "distill_fusion_train.batch_size=2", "eval_limit=30",
]
"""The README's pipeline on a tiny default: every step, in about nine minutes on two cores."""


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """``(artifacts_dir, each step's output)`` of one tiny pipeline run, shared by every test that reads it
    (tests that change artifacts copy what they change). ``$MEDRAG_TINY_PIPELINE_DIR`` names a folder to build it
    in (or to reuse, when an earlier session built it there: the pipeline skips what exists)."""
    from jobs import pipeline
    from jobs.runtime import shutdown_ray

    reuse = os.environ.get("MEDRAG_TINY_PIPELINE_DIR")
    tmp_path = Path(reuse) if reuse else tmp_path_factory.mktemp("pipeline")
    try:
        outputs = pipeline.main(pipeline.parse_args([f"artifacts_dir={tmp_path}", *TINY]))
    finally:
        shutdown_ray()
    return tmp_path, outputs


@dataclass(frozen=True)
class HeadNode:
    temp_dir: Path
    dashboard_url: str
    pgid: int
    env: dict[str, str]


def free_ports(n: int) -> list[int]:
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


def stop_strays(temp_dir: Path) -> list[psutil.Process]:
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


def stop_group(pgid: int, grace_s: float = 3.0) -> None:
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


def wait_http(url: str, timeout_s: float) -> None:
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
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent = free_ports(7)
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
        wait_http(f"{url}/api/version", timeout_s=60)
        yield HeadNode(temp_dir=temp_dir, dashboard_url=url, pgid=pgid, env=env)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_group(pgid)
        strays = stop_strays(temp_dir)
        leaked = _group_alive(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leaked and not strays, f"Ray processes of group {pgid} survived SIGKILL: {strays}"


PYTHON = sys.executable
"""The venv's interpreter: what ``.venv/bin/python`` (or ``python`` with the venv active) runs."""


def submit_job(
    head: HeadNode, repo_root: Path, script: str, args: list[str], cwd: Path, timeout_s: float = 420,
    runtime_env: Path | None = None,
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """``ray job submit --working-dir <repo> -- python <script> <args>`` against ``head``, as a user runs it
    (with ``cluster/runtime_env.yaml`` unless ``runtime_env`` names another file); returns the submission id and
    the finished CLI process (which waits for the job and streams its logs)."""
    submission_id = f"medrag-{Path(script).stem.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--submission-id",
        submission_id,
        "--runtime-env",
        str(runtime_env or repo_root / "cluster" / "runtime_env.yaml"),
        "--working-dir",
        str(repo_root),
        "--",
        "python",
        script,
        *args,
    ]
    res = subprocess.run(cmd, env=head.env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    return submission_id, res


@contextmanager
def user_env() -> Iterator[dict[str, str]]:
    """The environment of a user's shell with the venv active, Ray's temp dir private to this test."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="mu-", dir="/tmp"))  # short: Ray's socket paths have a 107-byte limit
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}")
    try:
        yield env
    finally:
        leftover = stop_strays(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not leftover, f"processes of the command survived: {leftover}"


def run_command(argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``argv`` to completion in its own process group (killed with its children on timeout)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_group(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout_s:.0f} s:\n{out[-6000:]}")
    finally:
        stop_group(proc.pid)
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")
