"""Reaching Ray from a job: start a local Ray (2-core friendly) or join a cluster, and size actor pools.

Only ``jobs/`` and ``serve/`` import this module; ``medrag_ray/`` never imports ray.

Where a job runs
    * ``ray.address=""`` (default) and no ``RAY_ADDRESS`` in the environment: a local Ray is started in
      this process with ``ray.num_cpus`` logical CPUs (0 = all cores).
    * ``ray.address=auto`` joins the Ray already running on this machine (e.g. from ``ray start``);
      ``ray.address=HOST:PORT`` joins that GCS.
    * Under ``ray job submit`` the driver gets ``RAY_ADDRESS`` from the job supervisor, so a job with the
      default ``ray.address=""`` joins the cluster it was submitted to.

Authentication (Ray >= 2.52 token auth)
    Ray reads ``RAY_AUTH_MODE`` (``disabled`` | ``token``) from the environment of *every* process: the
    nodes (``ray start``), the drivers and the ``ray job submit`` client. If it is unset, a local
    ``ray.init()`` writes ``~/.ray/auth_token`` and switches token auth on, after which a later
    ``ray job submit`` without a token fails with "Missing authentication token". So :func:`init_ray`
    always exports an explicit mode before Ray initialises: ``RAY_AUTH_MODE`` already present in the
    environment wins (it is what the cluster hands to a submitted driver), otherwise ``ray.auth_mode``
    from the job config is exported. Both sides of ``ray job submit`` need the same mode::

        RAY_AUTH_MODE=disabled ray start --head ...          # local tests / a private dev box
        RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . -- ...

        RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... ray start --head ...   # a shared cluster
        RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... ray job submit ...

Usage statistics are switched off (``RAY_USAGE_STATS_ENABLED=0``) unless the environment opts in.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from medrag_ray.config import RayConfig

logger = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"
ADDRESS_ENV = "RAY_ADDRESS"
MIN_FREE_CPUS_FOR_TASKS = 1.0
"""Ray Data read/map tasks take 1 CPU each; an actor pool must leave at least this much free."""


def resolve_address(cfg: RayConfig) -> str | None:
    """The address to join: ``ray.address``, else ``$RAY_ADDRESS`` (set by ``ray job submit``), else None.

    None means "start a local Ray in this process".
    """
    if cfg.address.strip():
        return cfg.address.strip()
    env = os.environ.get(ADDRESS_ENV, "").strip()
    return env or None


def apply_auth_mode(cfg: RayConfig) -> str:
    """Export ``RAY_AUTH_MODE`` before Ray initialises and return the mode in effect.

    An explicit ``RAY_AUTH_MODE`` in the environment wins over ``cfg.auth_mode`` (a driver started by
    ``ray job submit`` on a token cluster inherits ``token`` even when the job YAML says ``disabled``);
    a disagreement is logged. Ray caches its C++ config the first time it is read, so the cache is
    refreshed when it disagrees with the exported mode.
    """
    current = os.environ.get(AUTH_MODE_ENV, "").strip().lower()
    if not current:
        os.environ[AUTH_MODE_ENV] = cfg.auth_mode
        mode = cfg.auth_mode
    else:
        if current not in ("disabled", "token"):
            raise ValueError(
                f"{AUTH_MODE_ENV}={current!r} in the environment is not a Ray auth mode; "
                "set it to 'disabled' or 'token' (or unset it to use ray.auth_mode from the job config)"
            )
        mode = current
        os.environ[AUTH_MODE_ENV] = mode  # normalised spelling for every process started from here
        if mode != cfg.auth_mode:
            logger.warning(
                "%s=%s in the environment overrides ray.auth_mode=%s from the job config",
                AUTH_MODE_ENV,
                mode,
                cfg.auth_mode,
            )
    _refresh_ray_auth_cache(mode)
    return mode


def _refresh_ray_auth_cache(mode: str) -> None:
    """Make Ray's cached C++ config agree with ``RAY_AUTH_MODE`` (what Ray itself does when it flips it)."""
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    cached_token = get_authentication_mode() == AuthenticationMode.TOKEN
    if cached_token != (mode == "token"):
        Config.initialize("")


def init_ray(cfg: RayConfig) -> None:
    """Start a local Ray or join a cluster (see the module docstring); a no-op if Ray is already up.

    A local Ray gets ``cfg.num_cpus`` logical CPUs (0 = detect). When joining a cluster, ``num_cpus``
    is ignored (the cluster's nodes declare their resources). Logs the cluster's resources.
    """
    if ray.is_initialized():
        logger.info("Ray is already initialised; reusing the running session")
        return
    os.environ.setdefault(USAGE_STATS_ENV, "0")
    mode = apply_auth_mode(cfg)
    address = resolve_address(cfg)
    try:
        if address is None:
            ray.init(num_cpus=cfg.num_cpus or None)
        else:
            if cfg.num_cpus:
                logger.info("ray.num_cpus=%d is ignored when joining the cluster at %s", cfg.num_cpus, address)
            ray.init(address=address)
    except ConnectionError as exc:
        raise ConnectionError(
            f"could not reach a Ray cluster at {address!r} ({exc}); start one with `ray start --head`, "
            "fix ray.address / RAY_ADDRESS, or leave both empty to start a local Ray"
        ) from exc
    except ray.exceptions.AuthenticationError as exc:
        raise RuntimeError(
            f"Ray refused the connection with {AUTH_MODE_ENV}={mode}: {exc}. Use the cluster's mode on both "
            "sides; for token clusters set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token)"
        ) from exc
    log_cluster_resources()


def cluster_summary() -> dict[str, float]:
    """CPUs, GPUs, memory (GiB), object store (GiB) and alive node count of the connected cluster."""
    res = ray.cluster_resources()
    gib = float(1 << 30)
    return {
        "nodes": float(sum(1 for n in ray.nodes() if n.get("Alive"))),
        "CPU": float(res.get("CPU", 0.0)),
        "GPU": float(res.get("GPU", 0.0)),
        "memory_gib": float(res.get("memory", 0.0)) / gib,
        "object_store_gib": float(res.get("object_store_memory", 0.0)) / gib,
    }


def log_cluster_resources() -> dict[str, float]:
    """Log (and return) :func:`cluster_summary`."""
    s = cluster_summary()
    logger.info(
        "Ray cluster: %d node(s), %.1f CPU, %.0f GPU, %.1f GiB memory, %.1f GiB object store",
        int(s["nodes"]),
        s["CPU"],
        s["GPU"],
        s["memory_gib"],
        s["object_store_gib"],
    )
    return s


def cluster_has_gpu() -> bool:
    """Whether the connected cluster declares at least one GPU (requires :func:`init_ray` first)."""
    return ray.cluster_resources().get("GPU", 0.0) >= 1.0


def shutdown_ray() -> None:
    """Stop this process's Ray session if there is one (tests; local runs)."""
    if ray.is_initialized():
        ray.shutdown()


def _pool_bounds(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, tuple):
        if len(size) != 2:
            raise ValueError(f"actor pool size must be an int or a (min, max) pair, got {size!r}")
        lo, hi = size
    else:
        lo = hi = size
    if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int) or not isinstance(hi, int):
        raise ValueError(f"actor pool size must be integers, got {size!r}")
    if lo < 1 or hi < lo:
        raise ValueError(f"actor pool size needs 1 <= min <= max, got {size!r}; pass e.g. 2 or (1, 4)")
    return lo, hi


def actor_pool_kwargs(
    cfg: RayConfig, size: int | tuple[int, int], use_gpu: bool | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``Dataset.map_batches(SomeCallableClass, **kwargs)``.

    ``size`` is a fixed pool size or a ``(min, max)`` autoscaling range. ``use_gpu=True`` gives each
    actor one GPU (on an autoscaling cluster the GPU nodes may not exist yet; requesting them is what
    makes the autoscaler start them); ``False`` gives each actor ``cfg.actor_num_cpus`` CPUs (fractional,
    so Ray Data's 1-CPU read tasks still run on a 2-core machine); ``None`` picks GPUs when the
    connected cluster has any (requires :func:`init_ray` first).
    """
    from ray.data import ActorPoolStrategy

    lo, hi = _pool_bounds(size)
    strategy = ActorPoolStrategy(size=lo) if lo == hi else ActorPoolStrategy(min_size=lo, max_size=hi)
    if use_gpu is None:
        if not ray.is_initialized():
            raise RuntimeError("actor_pool_kwargs(use_gpu=None) detects GPUs: call init_ray(cfg) first")
        use_gpu = cluster_has_gpu()
    if use_gpu:
        return {"compute": strategy, "num_gpus": 1}
    if ray.is_initialized():
        total = float(ray.cluster_resources().get("CPU", 0.0))
        taken = hi * cfg.actor_num_cpus
        if total - taken < MIN_FREE_CPUS_FOR_TASKS:
            logger.warning(
                "an actor pool of %d x %.2f CPU leaves %.2f of %.1f CPUs for Ray Data's read tasks "
                "(each needs %.0f); unless the cluster autoscales the pipeline can hang. Lower "
                "ray.actor_num_cpus or the pool size, or raise ray.num_cpus",
                hi,
                cfg.actor_num_cpus,
                total - taken,
                total,
                MIN_FREE_CPUS_FOR_TASKS,
            )
    return {"compute": strategy, "num_cpus": cfg.actor_num_cpus}
