"""serve/app.py: the Serve config file is the ServeConfig, deployment options, and the checks before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from medrag_ray.config import ConfigError, DeploymentSettings, ServeConfig
from serve import app


def test_the_shipped_serve_config_file_loads_with_its_http_options(repo_root: Path) -> None:
    cfg = app.parse_args([])
    assert (cfg.host, cfg.port, cfg.artifacts_dir) == ("127.0.0.1", 8000, "artifacts")
    assert (cfg.reader.max_replicas, cfg.reader.max_batch_size, cfg.ingress.max_queued_requests) == (4, 8, 64)
    overridden = app.parse_args(["port=8123", "reader.max_replicas=2", "limits.max_k=5", "retrieval.k=5"])
    assert (overridden.port, overridden.reader.max_replicas, overridden.limits.max_k) == (8123, 2, 5)
    with pytest.raises(ConfigError, match="reader.max_replica"):
        app.parse_args(["reader.max_replica=2"])
    with pytest.raises(ConfigError, match="retrieval.k=5 exceeds limits.max_k=3"):
        app.parse_args(["limits.max_k=3"])


def test_build_app_args_are_validated_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="unknown config key prot"):
        app.build_app({"prot": 1})
    with pytest.raises(ConfigError, match="max_ongoing_requests=4 must be >= max_batch_size=8"):
        app.build_app({"reader": {"max_ongoing_requests": 4}})


def test_deployment_options_fixed_and_autoscaling() -> None:
    fixed = app.deployment_options(DeploymentSettings(min_replicas=2, max_replicas=2, num_cpus=0.5))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    scaled = app.deployment_options(DeploymentSettings(min_replicas=0, max_replicas=3, target_ongoing_requests=4,
                                                       max_queued_requests=10))
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4.0}
    assert scaled["max_queued_requests"] == 10 and "num_replicas" not in scaled


def test_missing_artifacts_are_named_before_ray_starts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"router_dir=.*index_dir=.*reader_dir=.*jobs/pipeline.py"):
        app.check_artifacts(ServeConfig(artifacts_dir=str(tmp_path)))
    (tmp_path / "models" / "reader_dpo").mkdir(parents=True)
    assert ServeConfig(artifacts_dir=str(tmp_path)).resolved_reader_dir == tmp_path / "models" / "reader_dpo"
    with pytest.raises(ConfigError, match="jomed_retriever_dir"):
        _ = ServeConfig(artifacts_dir=str(tmp_path), jomed_retriever_dir=str(tmp_path / "none")).resolved_jomed_dir


def test_the_rayservice_manifest_args_are_a_serve_config(repo_root: Path) -> None:
    import yaml

    from medrag_ray.config import config_from_mapping

    svc = yaml.safe_load((repo_root / "cluster" / "kuberay" / "rayservice.yaml").read_text())["spec"]
    [application] = yaml.safe_load(svc["serveConfigV2"])["applications"]
    cfg = config_from_mapping(ServeConfig, application["args"])
    assert (cfg.host, cfg.reader.num_gpus, cfg.reader.max_replicas) == ("0.0.0.0", 1.0, 4)
