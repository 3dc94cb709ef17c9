"""One training loop for every contrastive/classification job, free of Ray.

A :class:`TrainTask` says what is trained (model, dataset, loss, evaluation, export); the job's
:class:`~medrag_ray.config.TrainLoopConfig` says how (epochs, batch, AdamW + warmup-cosine schedule, DeepSpeed
ZeRO stage and precision); a
:class:`Coordinator` says where: rank and world size, the checkpoint to resume from and where reports go.
``jobs/`` supply a Ray Train coordinator (``ray.train.get_checkpoint`` / ``ray.train.report``); tests use
:class:`LocalCoordinator`, which keeps checkpoints in a folder.

Every epoch ends with an evaluation (on every rank, so ZeRO-3's partitioned parameters can be gathered)
and a checkpoint: the DeepSpeed engine state (``engine/``, each rank its shard), ``trainer_state.json``
(epochs done, metric history) and ``model/`` -- the exported model in its loadable layout, written by
rank 0. Resuming restores the engine and continues with the next epoch; a run whose checkpoint already
covers every epoch trains nothing and reports that checkpoint again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from medrag_ray.config import TrainLoopConfig
from medrag_ray.train.deepspeed_engine import (
    EngineSettings,
    ensure_process_group,
    full_parameters,
    initialize_engine,
    load_engine_checkpoint,
    promote_scalar_parameters,
    save_engine_checkpoint,
)
from medrag_ray.utils import seed_everything

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"


class TrainTask(Protocol):
    """What a training job trains; see :mod:`medrag_ray.train.tasks`."""

    name: str

    def build_model(self) -> nn.Module: ...

    def train_dataset(self) -> Dataset: ...

    def loss(self, model: nn.Module, batch: Any) -> Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def export(self, model: nn.Module, directory: Path) -> None: ...


class Coordinator(Protocol):
    """Where the loop runs: rank, checkpoint to resume from, and where epoch reports go."""

    def resume_dir(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None: ...


def engine_settings(cfg: TrainLoopConfig) -> EngineSettings:
    return EngineSettings(
        micro_batch_size=cfg.batch_size, zero_stage=cfg.zero_stage, precision=cfg.precision, grad_clip=cfg.grad_clip
    )


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _mean_across_ranks(value: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {STATE_FILE}; it was not written by this loop")
    return json.loads(path.read_text(encoding="utf-8"))


def train(task: TrainTask, settings: TrainLoopConfig, coordinator: Coordinator) -> dict[str, Any]:
    """Train ``task`` for ``settings.epochs`` epochs (resuming when the coordinator has a checkpoint).

    Returns the final trainer state: ``{"epochs_done", "history": [per-epoch metrics]}``.
    """
    seed_everything(settings.seed)
    rank, world_size = ensure_process_group()
    model = task.build_model()
    dataset = task.train_dataset()
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=settings.seed, drop_last=True
    )
    collate = getattr(task, "collate", None)  # tasks with variable-length examples (the reader) supply one
    loader = DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, drop_last=True, collate_fn=collate)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{task.name}: {len(dataset)} examples over {world_size} worker(s) do not fill one batch of "
            f"{settings.batch_size}; lower train.batch_size or ray_train.num_workers"
        )
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = int(settings.warmup_fraction * total_steps)
    promoted = promote_scalar_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps)
    )
    engine = initialize_engine(model, optimizer, scheduler, engine_settings(settings))

    state: dict[str, Any] = {"epochs_done": 0, "history": []}
    with coordinator.resume_dir() as resume:
        if resume is not None:
            load_engine_checkpoint(engine, resume)
            state = _read_state(resume)
            logger.info("%s: resumed from %s after epoch %d", task.name, resume, state["epochs_done"])
    if state["epochs_done"] >= settings.epochs:
        logger.info("%s: the checkpoint already covers %d epoch(s); nothing to train", task.name, settings.epochs)
        _checkpoint(task, engine, promoted, state, coordinator, rank)
        return state
    logger.info(
        "%s: %d examples, %d worker(s), %d steps/epoch, epochs %d..%d, warmup %d steps",
        task.name, len(dataset), world_size, steps_per_epoch, state["epochs_done"] + 1, settings.epochs, warmup_steps,
    )
    for epoch in range(state["epochs_done"], settings.epochs):
        sampler.set_epoch(epoch)
        engine.train()
        start, losses = time.perf_counter(), []
        for batch in tqdm(loader, desc=f"{task.name} epoch {epoch + 1}", disable=rank != 0, leave=False):
            loss = task.loss(engine.module, batch)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        engine.eval()
        with torch.no_grad():
            metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": _mean_across_ranks(sum(losses) / len(losses))}
            metrics.update(task.evaluate(engine.module))
        metrics["lr"] = float(scheduler.get_last_lr()[0])
        metrics["epoch_seconds"] = round(time.perf_counter() - start, 3)
        state = {"epochs_done": epoch + 1, "history": [*state["history"], metrics]}
        if rank == 0:
            logger.info("%s: %s", task.name, json.dumps(metrics))
        _checkpoint(task, engine, promoted, state, coordinator, rank)
    return state


def _checkpoint(
    task: TrainTask,
    engine: Any,
    promoted: dict[str, nn.Parameter],
    state: dict[str, Any],
    coordinator: Coordinator,
    rank: int,
) -> None:
    with tempfile.TemporaryDirectory(prefix="medrag_ckpt_") as tmp:
        directory = Path(tmp)
        save_engine_checkpoint(engine, directory)
        with full_parameters(engine, promoted) as module:
            if rank == 0:
                task.export(module, directory / MODEL_DIR)
        if rank == 0:
            (directory / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        metrics = dict(state["history"][-1]) if state["history"] else {"epoch": state["epochs_done"]}
        coordinator.report(metrics, directory)


class LocalCoordinator:
    """A one-process coordinator keeping every reported checkpoint under ``root/checkpoint_<epoch>``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.reports: list[dict[str, Any]] = []

    def latest(self) -> Path | None:
        found = sorted(self.root.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
        return found[-1] if found else None

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        yield self.latest()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        target = self.root / f"checkpoint_{int(metrics['epoch']):06d}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint_dir, target)
        self.reports.append(metrics)
