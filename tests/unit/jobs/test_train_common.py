"""The Ray Train shell without a cluster: storage paths, settings, and what resume=false deletes."""

import functools
import json
from pathlib import Path

import pytest

import jobs.train_common as tc
from medrag_ray.config import RayTrainConfig, TrainLoopConfig
from medrag_ray.train.runs import IDENTITY_FILE, run_folder_name, run_identity


def test_resolve_storage(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tc.resolve_storage("runs") == str(tmp_path / "runs")
    assert tc.resolve_storage("s3://bucket/runs") == "s3://bucket/runs"


class FakeTrainer:
    def __init__(self, *args, **kwargs) -> None:
        FakeTrainer.kwargs = kwargs

    def fit(self):
        class Result:
            checkpoint = object()

        return Result()


def _run(tmp_path: Path, monkeypatch, factory, loop: TrainLoopConfig, **kw) -> str:  # noqa: ANN001
    """``fit`` with a fake trainer; returns the Ray Train run name it was given."""
    monkeypatch.setattr(tc, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(tc, "use_gpu", lambda cfg: False)
    cfg = RayTrainConfig(storage_path=str(tmp_path / "runs"), **kw)
    tc.fit("r", factory, loop, cfg)
    return FakeTrainer.kwargs["run_config"].name


def _task(dataset: str, domains: tuple[str, ...]) -> None:
    """A stand-in task builder (only its identity matters here)."""


@pytest.mark.parametrize("resume", [True, False])
def test_resume_false_deletes_the_previous_run(tmp_path: Path, monkeypatch, resume: bool) -> None:
    factory, loop = functools.partial(_task, "/data/a", ("x", "y")), TrainLoopConfig()
    folder = run_folder_name("r", run_identity(factory, loop))
    old = tmp_path / "runs" / folder / "checkpoint_1"
    old.mkdir(parents=True)
    assert _run(tmp_path, monkeypatch, factory, loop, resume=resume, max_failures=3, num_workers=3) == folder
    assert old.exists() == resume
    run_config = FakeTrainer.kwargs["run_config"]
    assert run_config.failure_config.max_failures == 3
    assert FakeTrainer.kwargs["scaling_config"].num_workers == 3


def test_the_same_run_name_with_another_config_is_a_new_run(tmp_path: Path, monkeypatch) -> None:
    """The README's router on real images after the pipeline: same run_name, another dataset and domains -> a run
    of its own; the pipeline's run folder is left untouched and a re-run of either command finds its own run."""
    loop = TrainLoopConfig(epochs=2)
    synthetic = functools.partial(_task, "/a/synthetic", ("pathology", "radiology", "ophthalmology"))
    real = functools.partial(_task, "/a/routing_real", ("dermatology", "ophthalmology", "pathology", "radiology"))
    first = _run(tmp_path, monkeypatch, synthetic, loop)
    (tmp_path / "runs" / first / "checkpoint_1").mkdir()
    second = _run(tmp_path, monkeypatch, real, loop)
    assert second != first and second.startswith("r-") and first.startswith("r-")
    assert (tmp_path / "runs" / first / "checkpoint_1").is_dir()
    assert _run(tmp_path, monkeypatch, synthetic, loop) == first
    assert _run(tmp_path, monkeypatch, real, loop) == second
    assert _run(tmp_path, monkeypatch, real, TrainLoopConfig(epochs=3)) not in (first, second)  # loop settings count
    # how it runs is not what it trains: more workers or failures allowed resume the same run
    assert _run(tmp_path, monkeypatch, real, loop, num_workers=4, max_failures=5) == second
    record = json.loads((tmp_path / "runs" / second / IDENTITY_FILE).read_text())
    assert record["name"] == "r" and record["identity"]["task"]["args"][0] == "/a/routing_real"


def test_a_run_folder_of_another_identity_is_refused(tmp_path: Path, monkeypatch) -> None:
    factory, loop = functools.partial(_task, "/data/a", ("x",)), TrainLoopConfig()
    folder = tmp_path / "runs" / run_folder_name("r", run_identity(factory, loop))
    folder.mkdir(parents=True)
    (folder / IDENTITY_FILE).write_text(json.dumps({"name": "r", "identity": {"task": "another"}}))
    with pytest.raises(RuntimeError, match="belongs to another run"):
        _run(tmp_path, monkeypatch, factory, loop)
