import json

import pytest
import torch

from medrag_ray.config import TrainLoopConfig
from medrag_ray.models.dual_encoder import load_dual_encoder
from medrag_ray.models.router import load_router
from medrag_ray.train.loop import MODEL_DIR, STATE_FILE, LocalCoordinator, engine_settings, train, warmup_cosine
from medrag_ray.train.tasks import make_retriever_task, make_router_task


def settings(epochs: int, **kw) -> TrainLoopConfig:
    base = dict(epochs=epochs, batch_size=8, lr=2e-3, weight_decay=0.0, warmup_fraction=0.2, grad_clip=1.0,
                zero_stage=2, precision="fp32", seed=0)
    base.update(kw)
    return TrainLoopConfig(**base)


class Crash(RuntimeError):
    pass


class CrashingCoordinator(LocalCoordinator):
    """Dies (like a killed job) right after its ``crash_after``-th checkpoint is stored."""

    def __init__(self, root, crash_after: int | None) -> None:
        super().__init__(root)
        self.crash_after = crash_after

    def report(self, metrics, checkpoint_dir) -> None:
        super().report(metrics, checkpoint_dir)
        if self.crash_after is not None and len(self.reports) == self.crash_after:
            raise Crash("killed")


def test_engine_settings_carry_the_config() -> None:
    e = engine_settings(TrainLoopConfig(batch_size=8, zero_stage=3, precision="bf16", grad_clip=0.5))
    assert (e.micro_batch_size, e.zero_stage, e.precision, e.grad_clip) == (8, 3, "bf16", 0.5)


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted_training(tiny_training_dir, tmp_path) -> None:
    """A run killed after epoch 2 and resumed == 3 epochs straight: same history, same weights (ZeRO-2, fp32, CPU)."""
    dataset_dir, encoder_dir = tiny_training_dir

    def task():
        return make_retriever_task("r", str(encoder_dir), str(dataset_dir), ["radiology"])

    straight = train(task(), settings(3), LocalCoordinator(tmp_path / "straight"))
    coord = CrashingCoordinator(tmp_path / "resumed", crash_after=2)
    with pytest.raises(Crash):
        train(task(), settings(3), coord)
    assert len(coord.reports) == 2
    coord.crash_after = None
    resumed = train(task(), settings(3), coord)
    assert resumed["epochs_done"] == 3 and len(coord.reports) == 3  # only the 3rd epoch ran
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in straight["history"]], rel=1e-5
    )
    a = load_dual_encoder(tmp_path / "straight" / "checkpoint_000003" / MODEL_DIR)
    b = load_dual_encoder(tmp_path / "resumed" / "checkpoint_000003" / MODEL_DIR)
    for (name, pa), (_, pb) in zip(a.clip.state_dict().items(), b.clip.state_dict().items(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    state = json.loads((tmp_path / "resumed" / "checkpoint_000003" / STATE_FILE).read_text())
    assert state["epochs_done"] == 3
    # a run whose checkpoint covers every epoch trains nothing and re-reports the final checkpoint
    again = train(task(), settings(3), coord)
    assert again["history"] == resumed["history"] and len(coord.reports) == 4
    # the exported logit scale is 0-d again, as open_clip saves it
    assert a.clip.logit_scale.shape == ()


@pytest.mark.slow
def test_router_learns_the_domains(tiny_training_dir, tmp_path) -> None:
    dataset_dir, encoder_dir = tiny_training_dir
    task = make_router_task("router", str(encoder_dir), str(dataset_dir), ("pathology", "radiology"))
    state = train(task, settings(4, lr=1e-3, batch_size=6), LocalCoordinator(tmp_path))
    assert state["history"][-1]["val_accuracy"] == 1.0  # the synthetic domains look nothing alike
    router = load_router(tmp_path / "checkpoint_000004" / MODEL_DIR)
    assert router.domains == ("pathology", "radiology")


def test_too_few_examples_for_one_batch(tiny_training_dir, tmp_path) -> None:
    dataset_dir, encoder_dir = tiny_training_dir
    task = make_retriever_task("r", str(encoder_dir), str(dataset_dir), ["radiology"])
    with pytest.raises(ValueError, match="do not fill one batch of 500; lower train.batch_size"):
        train(task, settings(1, batch_size=500), LocalCoordinator(tmp_path))
