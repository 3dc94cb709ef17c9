"""jobs/runtime.py: address/auth resolution and actor-pool kwargs without Ray; one real local Ray start."""

from __future__ import annotations

import logging
import os

import pytest
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from ray.data import ActorPoolStrategy

from jobs import runtime
from medrag_ray.config import RayConfig


@pytest.fixture()
def restore_auth_mode():
    """Put RAY_AUTH_MODE and Ray's cached auth config back after a test that flips them."""
    before = os.environ.get(runtime.AUTH_MODE_ENV)
    yield
    if before is None:
        os.environ.pop(runtime.AUTH_MODE_ENV, None)
    else:
        os.environ[runtime.AUTH_MODE_ENV] = before
    runtime._refresh_ray_auth_cache((before or "disabled").lower())


@pytest.fixture()
def fake_ray_init(monkeypatch):
    """Record ray.init calls instead of starting Ray."""
    calls: list[dict] = []
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(runtime, "log_cluster_resources", lambda: {})
    monkeypatch.delenv(runtime.ADDRESS_ENV, raising=False)
    return calls


# ------------------------------------------------------------------------------------------ address


def test_resolve_address_prefers_config_then_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    assert runtime.resolve_address(RayConfig(address=" auto ")) == "auto"
    assert runtime.resolve_address(RayConfig()) == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_ADDRESS", "  ")
    assert runtime.resolve_address(RayConfig()) is None
    monkeypatch.delenv("RAY_ADDRESS")
    assert runtime.resolve_address(RayConfig()) is None


# --------------------------------------------------------------------------------------------- auth


def test_auth_mode_exported_from_config_when_env_unset(monkeypatch, restore_auth_mode):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert runtime.apply_auth_mode(RayConfig(auth_mode="token")) == "token"
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert get_authentication_mode() == AuthenticationMode.TOKEN  # Ray's cached config follows
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert runtime.apply_auth_mode(RayConfig(auth_mode="disabled")) == "disabled"
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    assert get_authentication_mode() == AuthenticationMode.DISABLED


def test_auth_mode_from_environment_wins_and_is_logged(monkeypatch, restore_auth_mode, caplog):
    monkeypatch.setenv("RAY_AUTH_MODE", "Token")
    with caplog.at_level(logging.WARNING, logger="jobs.runtime"):
        assert runtime.apply_auth_mode(RayConfig(auth_mode="disabled")) == "token"
    assert "overrides ray.auth_mode=disabled" in caplog.text
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert get_authentication_mode() == AuthenticationMode.TOKEN


def test_auth_mode_invalid_environment_value_names_the_fix(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "password")
    with pytest.raises(ValueError, match="RAY_AUTH_MODE='password'.*'disabled' or 'token'"):
        runtime.apply_auth_mode(RayConfig())


# ------------------------------------------------------------------------------------------ init_ray


def test_init_ray_local_passes_num_cpus_and_disables_usage_stats(monkeypatch, fake_ray_init, restore_auth_mode):
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    runtime.init_ray(RayConfig(num_cpus=3))
    runtime.init_ray(RayConfig(num_cpus=0))
    assert fake_ray_init == [{"num_cpus": 3}, {"num_cpus": None}]
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_init_ray_keeps_explicit_usage_stats_opt_in(monkeypatch, fake_ray_init):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    runtime.init_ray(RayConfig())
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "1"


def test_init_ray_joins_cluster_without_num_cpus(monkeypatch, fake_ray_init):
    runtime.init_ray(RayConfig(address="auto", num_cpus=4))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # what `ray job submit` hands the driver
    runtime.init_ray(RayConfig())
    assert fake_ray_init == [{"address": "auto"}, {"address": "http://127.0.0.1:8265"}]


def test_init_ray_is_a_noop_when_already_initialised(monkeypatch):
    def boom(**kw):
        raise AssertionError("ray.init must not be called twice")

    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime.ray, "init", boom)
    runtime.init_ray(RayConfig(address="auto"))


def test_init_ray_connection_error_names_the_remedy(monkeypatch, fake_ray_init):
    def refuse(**kw):
        raise ConnectionError("no cluster")

    monkeypatch.setattr(runtime.ray, "init", refuse)
    with pytest.raises(ConnectionError, match="'auto'.*ray start --head.*RAY_ADDRESS"):
        runtime.init_ray(RayConfig(address="auto"))


# --------------------------------------------------------------------------------------- actor pools


def test_actor_pool_kwargs_cpu_uses_fractional_cpus():
    kw = runtime.actor_pool_kwargs(RayConfig(actor_num_cpus=0.25), 3, use_gpu=False)
    assert set(kw) == {"compute", "num_cpus"}
    assert kw["num_cpus"] == 0.25
    assert isinstance(kw["compute"], ActorPoolStrategy)
    assert (kw["compute"].min_size, kw["compute"].max_size) == (3, 3)


def test_actor_pool_kwargs_gpu_and_autoscaling_range():
    kw = runtime.actor_pool_kwargs(RayConfig(), (1, 4), use_gpu=True)
    assert set(kw) == {"compute", "num_gpus"}
    assert kw["num_gpus"] == 1
    assert (kw["compute"].min_size, kw["compute"].max_size) == (1, 4)


@pytest.mark.parametrize("size", [0, (3, 2), (0, 2), (1, 2, 3), 1.5, True])
def test_actor_pool_kwargs_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="actor pool size"):
        runtime.actor_pool_kwargs(RayConfig(), size, use_gpu=False)


def test_actor_pool_kwargs_gpu_detection_needs_ray(monkeypatch):
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="call init_ray"):
        runtime.actor_pool_kwargs(RayConfig(), 2)


def test_actor_pool_kwargs_detects_gpus_and_warns_when_pool_starves_tasks(monkeypatch, caplog):
    resources = {"CPU": 2.0, "GPU": 0.0}
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime.ray, "cluster_resources", lambda: dict(resources))
    with caplog.at_level(logging.WARNING, logger="jobs.runtime"):
        assert "num_cpus" in runtime.actor_pool_kwargs(RayConfig(actor_num_cpus=0.5), 2)
        assert caplog.text == ""  # 2 x 0.5 leaves 1 CPU for read tasks
        runtime.actor_pool_kwargs(RayConfig(actor_num_cpus=0.5), (1, 3))
    assert "leaves 0.50 of 2.0 CPUs" in caplog.text
    resources["GPU"] = 8.0
    assert runtime.actor_pool_kwargs(RayConfig(), 2)["num_gpus"] == 1


# ------------------------------------------------------------------------------------- real local Ray


class _AddOne:
    def __call__(self, batch):
        batch["id"] = batch["id"] + 1
        return batch


@pytest.mark.slow
def test_local_ray_on_two_cpus_runs_an_actor_pool(monkeypatch):
    """A real local Ray with 2 CPUs: resources as configured, idempotent, and a 2-actor pool does not hang."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        pytest.skip("another test left Ray running in this process")
    cfg = RayConfig(num_cpus=2, actor_num_cpus=0.5)
    try:
        runtime.init_ray(cfg)
        summary = runtime.cluster_summary()
        assert summary["CPU"] == 2.0
        assert summary["GPU"] == 0.0
        assert summary["nodes"] == 1.0
        assert get_authentication_mode() == AuthenticationMode.DISABLED
        runtime.init_ray(cfg)  # idempotent
        kwargs = runtime.actor_pool_kwargs(cfg, 2)  # detects: no GPU -> fractional CPUs
        assert kwargs["num_cpus"] == 0.5
        rows = ray.data.range(40, override_num_blocks=4).map_batches(_AddOne, batch_size=10, **kwargs).take_all()
        assert sorted(r["id"] for r in rows) == list(range(1, 41))
    finally:
        runtime.shutdown_ray()
    assert not ray.is_initialized()
