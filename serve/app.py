"""Build and run the Serve application: Router -> Retriever per domain -> Reader, behind the HTTP Ingress.

    python serve/app.py [--config serve/config.yaml] [artifacts_dir=artifacts] [port=8000] [reader.max_replicas=4]
    serve run serve/config.yaml                 # Ray's CLI, the same application (import_path serve.app:build_app)
    serve deploy serve/config.yaml              # onto a running cluster (KubeRay: cluster/kuberay/rayservice.yaml)

``serve/config.yaml`` is a Serve config file; its application's ``args`` are a :class:`ServeConfig` (this
script reads them from the same file, so both launch paths serve the same thing). HTTP binds to 127.0.0.1
unless ``host`` says otherwise.
"""

from __future__ import annotations

import jobs.preflight  # noqa: F401 - first: a Python without the dependencies gets what to do

# isort: split

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from medrag_ray.config import ConfigError, DeploymentSettings, ServeConfig, apply_overrides, config_from_mapping
from medrag_ray.utils import setup_logging

logger = logging.getLogger("serve.app")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"
APP_NAME = "medrag"


def deployment_options(settings: DeploymentSettings) -> dict[str, Any]:
    """``Deployment.options(...)`` of one deployment's settings (autoscaling, queue bound, resources, health)."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "health_check_period_s": settings.health_check_period_s,
        "health_check_timeout_s": settings.health_check_timeout_s,
    }
    autoscaling = settings.autoscaling
    if autoscaling is None:
        options["num_replicas"] = settings.max_replicas
    else:
        options["autoscaling_config"] = autoscaling
    return options


def check_artifacts(cfg: ServeConfig) -> list[str]:
    """The indexed domains; FileNotFoundError naming every missing model directory and how to build it."""
    from medrag_ray.retrieval.embed import read_manifest

    paths = {"router_dir": cfg.resolved_router_dir, "index_dir": cfg.resolved_index_dir,
             "reader_dir": cfg.resolved_reader_dir}
    missing = [f"{name}={path}" for name, path in paths.items() if not Path(path).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"missing {', '.join(missing)}: build the artifacts with `python jobs/pipeline.py` "
            f"(artifacts_dir={cfg.artifacts_dir}) or point these keys at your models"
        )
    cfg.resolved_jomed_dir  # noqa: B018 - an explicit jomed_retriever_dir that does not exist fails here
    return sorted(read_manifest(cfg.resolved_index_dir).domains)


def compose(cfg: ServeConfig) -> Any:
    """The composed application (deployment handles): ``serve.run(compose(cfg))``."""
    from serve.deployments import Ingress, Reader, Retriever, Router

    domains = check_artifacts(cfg)
    router = Router.options(**deployment_options(cfg.router)).bind(cfg, domains)
    retrievers = {
        d: Retriever.options(name=f"Retriever_{d}", **deployment_options(cfg.retriever)).bind(cfg, d)
        for d in domains
    }
    reader = Reader.options(**deployment_options(cfg.reader)).bind(cfg)
    return Ingress.options(**deployment_options(cfg.ingress)).bind(cfg, domains, router, retrievers, reader)


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder (``import_path: serve.app:build_app``); ``args`` are ServeConfig keys."""
    return compose(config_from_mapping(ServeConfig, args or {}, where="the Serve application args"))


def config_from_serve_file(path: str | Path, overrides: Sequence[str] = ()) -> ServeConfig:
    """The ServeConfig of a Serve config file: its application's ``args``, ``http_options`` and overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a Serve config file with --config")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    apps = tree.get("applications") if isinstance(tree, dict) else None
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"{path}: expected a Serve config file with exactly one entry under 'applications'")
    args = dict(apps[0].get("args") or {})
    http = tree.get("http_options") or {}
    for key in ("host", "port"):
        if key in http:
            args.setdefault(key, http[key])
    apply_overrides(args, overrides)
    return config_from_mapping(ServeConfig, args, where=str(path))


def parse_args(argv: Sequence[str] | None) -> ServeConfig:
    parser = argparse.ArgumentParser(description=ServeConfig.__doc__)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted ServeConfig overrides such as port=8001")
    args = parser.parse_args(argv)
    return config_from_serve_file(args.config, args.overrides)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def start(cfg: ServeConfig, blocking: bool = False, stop_on_sigterm: bool = False) -> Any:
    """Start (or join) Ray, start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy; returns the handle.
    ``stop_on_sigterm``: from Ray's start on, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does
    (Ray's own handler would abort the process with a stack dump)."""
    from ray import serve

    from jobs.runtime import init_ray

    app = compose(cfg)  # checks the artifacts before Ray starts
    init_ray(cfg.ray)
    if stop_on_sigterm:
        signal.signal(signal.SIGTERM, _interrupt)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    logger.info("serving %s on http://%s:%d (POST /v1/answer, GET /healthz, /docs)", APP_NAME, cfg.host, cfg.port)
    return handle


def main(cfg: ServeConfig) -> None:
    """Serve until stopped: Ctrl-C (SIGINT) or SIGTERM (``kill``, a process manager) shuts the application and this
    script's Ray down, and the script exits with status 0."""
    from ray import serve

    try:
        start(cfg, stop_on_sigterm=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping: shutting %s down", APP_NAME)
        serve.shutdown()


if __name__ == "__main__":
    setup_logging()
    main(parse_args(sys.argv[1:]))
