"""The Ray Train shell without a cluster: storage paths, settings, and what resume=false deletes."""

from pathlib import Path

import pytest

import jobs.train_common as tc
from medrag_ray.config import RayTrainConfig, TrainLoopConfig


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


@pytest.mark.parametrize("resume", [True, False])
def test_resume_false_deletes_the_previous_run(tmp_path: Path, monkeypatch, resume: bool) -> None:
    monkeypatch.setattr(tc, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(tc, "use_gpu", lambda cfg: False)
    old = tmp_path / "runs" / "r" / "checkpoint_1"
    old.mkdir(parents=True)
    cfg = RayTrainConfig(storage_path=str(tmp_path / "runs"), resume=resume, max_failures=3, num_workers=3)
    tc.fit("r", lambda: None, TrainLoopConfig(), cfg)
    assert old.exists() == resume
    run_config = FakeTrainer.kwargs["run_config"]
    assert run_config.name == "r" and run_config.failure_config.max_failures == 3
    assert FakeTrainer.kwargs["scaling_config"].num_workers == 3
