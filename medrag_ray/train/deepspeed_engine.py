"""A small DeepSpeed wrapper: config from :class:`EngineSettings`, initialise, checkpoint, export weights.

The same code runs on CPU workers (gloo, ``DS_ACCELERATOR=cpu``, fp32 or bf16) and on GPU workers (NCCL,
bf16 by default). ZeRO stages 0-3 are supported; stage 3 partitions parameters, so exporting full weights
goes through :func:`full_state_dict`, which every rank must call.

Environment handled here, before ``deepspeed`` is imported:

* ``DS_ACCELERATOR=cpu`` when no CUDA device is visible (DeepSpeed would otherwise probe for one);
* ``TORCH_EXTENSIONS_DIR`` defaults to ``~/.cache/medrag_ray/torch_extensions``, so the one-off JIT build
  of DeepSpeed's CPU communication kernel (35-55 s) is reused by every later run and worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
CHECKPOINT_TAG = "engine"
EXTENSIONS_CACHE = Path.home() / ".cache" / "medrag_ray" / "torch_extensions"


@dataclass(frozen=True)
class EngineSettings:
    """What DeepSpeed needs to know about one training run."""

    micro_batch_size: int
    """Examples per worker per step."""
    zero_stage: int = 2
    precision: str = "auto"
    """``auto`` = bf16 on CUDA, fp32 on CPU; ``bf16`` on CPU works too (fp16 is refused on CPU)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = none)."""
    gradient_accumulation_steps: int = 1

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")


def resolved_precision(precision: str, cuda: bool | None = None) -> str:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def deepspeed_config(settings: EngineSettings, world_size: int, cuda: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``settings`` on ``world_size`` data-parallel workers."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "train_batch_size": settings.micro_batch_size * settings.gradient_accumulation_steps * world_size,
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": resolved_precision(settings.precision, cuda) == "bf16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if settings.grad_clip > 0:
        config["gradient_clipping"] = settings.grad_clip
    if settings.zero_stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def prepare_environment() -> None:
    """Set ``DS_ACCELERATOR`` / ``TORCH_EXTENSIONS_DIR`` defaults (see the module docstring)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_CACHE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_process_group() -> tuple[int, int]:
    """(rank, world size) of the running process group; starts a one-process gloo group if there is none
    (a single-process run or a test), as DeepSpeed always needs one."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # DeepSpeed asserts LOCAL_RANK (set by torchrun / Ray Train); a one-process group has none.
    os.environ.setdefault("LOCAL_RANK", "0" if world_size == 1 else str(rank))
    return rank, world_size


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


def promote_scalar_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Replace every 0-d parameter (CLIP's ``logit_scale``) by a 1-element 1-d one, in place.

    DeepSpeed 0.19 broadcasts parameters as ``p.data.view(torch.uint8)``, which fails for 0-d tensors.
    Returns the promoted parameters by name; :func:`full_parameters` shows them 0-d again while exporting.
    """
    promoted: dict[str, nn.Parameter] = {}
    for name, param in list(module.named_parameters()):
        if param.ndim == 0:
            owner, leaf = _owner(module, name)
            new = nn.Parameter(param.detach().reshape(1).clone(), requires_grad=param.requires_grad)
            setattr(owner, leaf, new)
            promoted[name] = new
    return promoted


def initialize_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    settings: EngineSettings,
) -> Any:
    """``deepspeed.initialize`` with a torch optimizer (DeepSpeed's own Adam kernels would JIT-compile for
    minutes on CPU); returns the engine (``engine.module`` is ``model``)."""
    prepare_environment()
    import deepspeed

    _, world_size = ensure_process_group()
    config = deepspeed_config(settings, world_size)
    if any(p.ndim == 0 for p in model.parameters()):
        raise ValueError(
            "the model has 0-d parameters, which DeepSpeed cannot broadcast; call promote_scalar_parameters(model) "
            "before building the optimizer"
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
    )
    logger.info(
        "DeepSpeed engine: ZeRO-%d, %s, %d worker(s), micro batch %d, device %s",
        settings.zero_stage,
        "bf16" if config["bf16"]["enabled"] else "fp32",
        world_size,
        settings.micro_batch_size,
        engine.device,
    )
    return engine


def save_engine_checkpoint(engine: Any, directory: str | Path) -> None:
    """Every rank writes its part (model states on rank 0, its optimizer shard) under ``directory``."""
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)


def load_engine_checkpoint(engine: Any, directory: str | Path) -> None:
    """Restore model, optimizer and LR-scheduler state written by :func:`save_engine_checkpoint`."""
    path = Path(directory) / CHECKPOINT_TAG
    if not path.is_dir():
        raise FileNotFoundError(f"{directory} has no DeepSpeed checkpoint '{CHECKPOINT_TAG}/'; it is not ours")
    load_path, _ = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}; delete it to start over")


@contextlib.contextmanager
def full_parameters(engine: Any, promoted: dict[str, nn.Parameter] | None = None) -> Iterator[nn.Module]:
    """The engine's module with every parameter whole (gathered under ZeRO-3) and the ``promoted``
    scalars 0-d again (views of the trained values), so it saves in its original layout; all ranks
    must enter. The training parameters are put back on exit."""
    module = engine.module
    gather: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        promoted = promoted or {}
        for name, param in promoted.items():
            owner, leaf = _owner(module, name)
            setattr(owner, leaf, nn.Parameter(param.detach().reshape(()), requires_grad=False))
        try:
            yield module
        finally:
            for name, param in promoted.items():
                owner, leaf = _owner(module, name)
                setattr(owner, leaf, param)
