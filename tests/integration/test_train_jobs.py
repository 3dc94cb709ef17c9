"""Ray Train + DeepSpeed training jobs on a local Ray: the retriever job, resume by run name, a killed worker.

(The router job and the per-domain retrievers run in tests/integration/test_pipeline_full.py.)

Two CPU workers (gloo), ZeRO-2, fp32, on a tiny synthetic dataset (2 domains x 24 cases at 32 px).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle
import ray.train

from jobs import train_retriever
from jobs.runtime import init_ray, shutdown_ray
from jobs.train_common import export_result, fit, train_worker
from medrag_ray.config import RayConfig, RayTrainConfig, TrainLoopConfig, TrainRetrieverConfig
from medrag_ray.models.dual_encoder import load_dual_encoder
from medrag_ray.train.runs import run_folder_name, run_identity
from medrag_ray.train.tasks import make_retriever_task
from tests.unit.train.conftest import make_tiny_training_dir

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers run this module's wrappers

RAY = RayConfig(num_cpus=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    dirs = make_tiny_training_dir(tmp_path_factory.mktemp("train_jobs"))
    init_ray(RAY)
    yield dirs
    shutdown_ray()


def ray_train_cfg(tmp_path: Path, **kw: Any) -> RayTrainConfig:
    return RayTrainConfig(num_workers=2, storage_path=str(tmp_path / "runs"), **kw)


LOOP = TrainLoopConfig(epochs=2, batch_size=4, lr=1e-3, precision="fp32")


def test_train_retriever_job_domain_agnostic(tiny, tmp_path) -> None:
    """One retriever over every domain's pairs, written to out_dir itself (the per-domain layout is covered by
    tests/integration/test_pipeline_full.py)."""
    dataset_dir, encoder_dir = tiny
    cfg = TrainRetrieverConfig(
        dataset_dir=str(dataset_dir), init_encoder_dir=str(encoder_dir), out_dir=str(tmp_path / "retriever_all"),
        domain_agnostic=True, train=LOOP, ray_train=ray_train_cfg(tmp_path, max_failures=0), ray=RAY,
    )
    out = train_retriever.main(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["runs"]) == ["all"] and metrics["runs"]["all"]["run"] == "retriever-all"
    history = metrics["runs"]["all"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"train_loss", "val_loss", "val_recall@1", "val_recall@10"} <= set(history[-1])
    trained, init = load_dual_encoder(out), load_dual_encoder(encoder_dir)
    changed = [
        not bool((a == b).all())
        for a, b in zip(trained.clip.state_dict().values(), init.clip.state_dict().values(), strict=True)
    ]
    assert sum(changed) > 0.9 * len(changed)  # every trained tensor moved away from the init
    with pytest.raises(FileExistsError):
        train_retriever.main(cfg)  # refuses to replace without overwrite=true, before any training


def crash_after_first_epoch(config: dict[str, Any]) -> None:
    """Run the real worker, but raise once rank 0 has reported epoch 1 (a job that dies mid-run)."""
    import jobs.train_common as tc

    original = tc.RayTrainCoordinator.report

    def report(self, metrics, checkpoint_dir):
        original(self, metrics, checkpoint_dir)
        if metrics["epoch"] == 1:
            raise RuntimeError("simulated crash after epoch 1")

    tc.RayTrainCoordinator.report = report
    train_worker(config)


def test_rerun_with_the_same_name_resumes_from_the_last_checkpoint(tiny, tmp_path) -> None:
    dataset_dir, encoder_dir = tiny
    factory = lambda: make_retriever_task("resume", str(encoder_dir), str(dataset_dir), ["radiology"])  # noqa: E731
    cfg = ray_train_cfg(tmp_path, max_failures=0)
    with pytest.raises(RuntimeError, match="re-run the same command to resume"):
        fit("resume-run", factory, LOOP, cfg, worker_fn=crash_after_first_epoch)
    run_dir = tmp_path / "runs" / run_folder_name("resume-run", run_identity(factory, LOOP))
    (saved,) = run_dir.glob("checkpoint_*/trainer_state.json")
    crashed_state = json.loads(saved.read_text())
    result = fit("resume-run", factory, LOOP, cfg)
    state = export_result(result, tmp_path / "model")
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    # epoch 1 was not trained again: its record (incl. its wall time) is the crashed run's
    assert state["history"][0] == crashed_state["history"][0]


def wait_for_registered_checkpoint(run_dir: Path, timeout_s: float = 120.0) -> None:
    """Block until Ray Train's controller has registered a checkpoint of the run in its snapshot file.

    The controller collects reports asynchronously; on a loaded machine a worker killed right after
    ``ray.train.report`` can die before any checkpoint is registered, and the restart then starts fresh."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(snapshot.read_text(encoding="utf-8")).get("latest_checkpoint_result"):
                return
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint registered in {snapshot} after {timeout_s} s")


def kill_rank1_once(config: dict[str, Any]) -> None:
    """Run the real worker; once rank 1 has reported epoch 2 and Ray has registered a checkpoint,
    SIGKILL rank 1's own process (the first time only), so the restart must resume from a checkpoint."""
    import jobs.train_common as tc

    marker = Path(config["marker"])
    rank = ray.train.get_context().get_world_rank()
    with open(config["starts"], "a", encoding="utf-8") as f:
        f.write(f"{rank} {int(ray.train.get_checkpoint() is not None)}\n")
    original = tc.RayTrainCoordinator.report

    def report(self, metrics, checkpoint_dir):
        original(self, metrics, checkpoint_dir)
        if rank == 1 and metrics["epoch"] == 2 and not marker.exists():
            wait_for_registered_checkpoint(Path(config["run_dir"]))
            marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)

    tc.RayTrainCoordinator.report = report
    train_worker({k: v for k, v in config.items() if k in ("task_factory", "settings")})


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(tiny, tmp_path) -> None:
    dataset_dir, encoder_dir = tiny
    factory = lambda: make_retriever_task("kill", str(encoder_dir), str(dataset_dir), ["radiology"])  # noqa: E731
    loop = TrainLoopConfig(epochs=3, batch_size=4, precision="fp32")
    run_dir = tmp_path / "runs" / run_folder_name("kill-run", run_identity(factory, loop))
    marker, starts = tmp_path / "killed", tmp_path / "starts.txt"

    def worker(config: dict[str, Any]) -> None:
        kill_rank1_once({**config, "marker": str(marker), "starts": str(starts), "run_dir": str(run_dir)})

    result = fit("kill-run", factory, loop, ray_train_cfg(tmp_path, max_failures=1), worker_fn=worker)
    assert marker.exists()
    lines = starts.read_text().split()
    # two ranks started fresh, then both restarted from a checkpoint
    assert sorted(zip(lines[::2], lines[1::2], strict=True)) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    state = export_result(result, tmp_path / "model")
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
