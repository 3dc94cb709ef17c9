"""The Ray Train shell shared by the training jobs: run :func:`medrag_ray.train.loop.train` in a
``TorchTrainer``, resume by run name, survive worker failures, and export the final model.

Inside each worker the loop talks to Ray through :class:`RayTrainCoordinator` (``ray.train.get_checkpoint``
to resume, ``ray.train.report`` with every rank's part of the DeepSpeed checkpoint, which Ray merges into
one checkpoint folder). The Ray Train run of a job is ``<run_name>-<fingerprint>`` (:mod:`medrag_ray.train.runs`:
the fingerprint covers the task and its arguments and the loop settings), so a re-run of the same command finds
its run's snapshot and resumes from its last checkpoint, while the same ``run_name`` with another config starts
a run of its own; ``FailureConfig(max_failures)`` restarts the worker group from the last checkpoint when a worker
dies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from jobs.runtime import cluster_has_gpu
from medrag_ray.config import RayTrainConfig, TrainLoopConfig, to_dict
from medrag_ray.train.loop import MODEL_DIR, STATE_FILE, TrainTask, train
from medrag_ray.train.runs import IDENTITY_FILE, other_runs, run_folder_name, run_identity, write_identity
from medrag_ray.utils import atomic_output_dir, setup_logging

logger = logging.getLogger(__name__)

TaskFactory = Callable[[], TrainTask]


class RayTrainCoordinator:
    """The loop's view of Ray Train inside a worker."""

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)))


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: build the task from its factory and run the loop."""
    setup_logging()
    task: TrainTask = config["task_factory"]()
    train(task, config["settings"], RayTrainCoordinator())


def resolve_storage(storage_path: str) -> str:
    """A URI stays as it is; a local path becomes absolute (Ray Train requires it)."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def use_gpu(cfg: RayTrainConfig) -> bool:
    if cfg.use_gpu == "auto":
        return cluster_has_gpu()
    return cfg.use_gpu == "always"


def fit(
    name: str,
    task_factory: TaskFactory,
    train_cfg: TrainLoopConfig,
    ray_train_cfg: RayTrainConfig,
    worker_fn: Callable[[dict[str, Any]], None] = train_worker,
) -> ray.train.Result:
    """Run (or resume) the Ray Train run of job ``name`` with this task and loop config; raises with the run's
    error if it failed for good.

    ``worker_fn`` is the per-worker function (tests wrap :func:`train_worker` to inject failures).
    """
    storage = resolve_storage(ray_train_cfg.storage_path)
    identity = run_identity(task_factory, train_cfg)
    folder = run_folder_name(name, identity)
    run_dir = Path(storage) / folder
    if "://" not in storage:
        if not ray_train_cfg.resume and run_dir.exists():
            logger.info("ray_train.resume=false: deleting the previous run folder %s", run_dir)
            shutil.rmtree(run_dir)
        resuming = (run_dir / IDENTITY_FILE).is_file()
        others = other_runs(Path(storage), name, folder)
        write_identity(run_dir, name, identity)
        if resuming:
            logger.info("%s: continuing the run in %s (from its last checkpoint, if it has one)", name, run_dir)
        elif others:
            logger.info(
                "%s: a new run in %s; the run(s) %s of the same name were trained with another config and are "
                "left as they are", name, run_dir, [p.name for p in others],
            )
    gpu = use_gpu(ray_train_cfg)
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"task_factory": task_factory, "settings": train_cfg},
        scaling_config=ScalingConfig(
            num_workers=ray_train_cfg.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": ray_train_cfg.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(
            name=folder,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=ray_train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_train_cfg.num_to_keep),
        ),
    )
    logger.info(
        "%s: Ray Train with %d %s worker(s), ZeRO-%d, storage %s",
        name, ray_train_cfg.num_workers, "GPU" if gpu else "CPU", train_cfg.zero_stage, run_dir,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(
            f"{name}: training failed after {ray_train_cfg.max_failures} allowed worker failure(s): {exc}\n"
            f"Fix the cause and re-run the same command to resume from the last checkpoint in {run_dir}"
        ) from exc
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint; check the worker logs in {run_dir}")
    return result


def export_result(result: ray.train.Result, out_dir: Path) -> dict[str, Any]:
    """Copy the final checkpoint's exported model to ``out_dir``; returns its trainer state (metric history)."""
    with result.checkpoint.as_directory() as directory:
        checkpoint = Path(directory)
        if not (checkpoint / MODEL_DIR).is_dir():
            raise RuntimeError(f"checkpoint {checkpoint} has no {MODEL_DIR}/; it was not written by this job")
        shutil.copytree(checkpoint / MODEL_DIR, out_dir, dirs_exist_ok=True)
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def fit_to_dir(cfg: Any, task_factory: TaskFactory, out_dir: str, overwrite: bool) -> dict[str, Any]:
    """Run ``cfg``'s Ray Train job (``cfg.run_name``, ``cfg.train``, ``cfg.ray_train``) and write its final model and
    ``metrics.json`` (the job config, the final and every epoch's metrics) to ``out_dir`` atomically."""
    result = fit(cfg.run_name, task_factory, cfg.train, cfg.ray_train)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        state = export_result(result, tmp)
        metrics = {"config": to_dict(cfg), "final": state["history"][-1], "history": state["history"]}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    logger.info("%s: final %s; written to %s", cfg.run_name, json.dumps(state["history"][-1]), out_dir)
    return state
