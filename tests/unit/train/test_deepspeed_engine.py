import math

import pytest
import torch
from torch import nn

from medrag_ray.train.deepspeed_engine import (
    EngineSettings,
    deepspeed_config,
    full_parameters,
    initialize_engine,
    load_engine_checkpoint,
    promote_scalar_parameters,
    resolved_precision,
    save_engine_checkpoint,
)


class WithScalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.inner = nn.Module()
        self.inner.scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.inner.scale.exp()


def test_deepspeed_config_values() -> None:
    cfg = deepspeed_config(EngineSettings(micro_batch_size=8, zero_stage=3, grad_clip=0.5), world_size=4, cuda=False)
    assert cfg["train_batch_size"] == 32
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == 0.5
    assert deepspeed_config(EngineSettings(micro_batch_size=2), 1, cuda=True)["bf16"] == {"enabled": True}
    assert "gradient_clipping" not in deepspeed_config(EngineSettings(micro_batch_size=2, grad_clip=0), 1)
    assert resolved_precision("auto", cuda=False) == "fp32" and resolved_precision("bf16", cuda=False) == "bf16"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"micro_batch_size": 0}, "micro_batch_size"), ({"micro_batch_size": 2, "zero_stage": 4}, "zero_stage"),
     ({"micro_batch_size": 2, "precision": "fp16"}, "precision")],
)
def test_engine_settings_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EngineSettings(**kwargs)


def test_promote_scalar_parameters_round_trip() -> None:
    model = WithScalar()
    promoted = promote_scalar_parameters(model)
    assert list(promoted) == ["inner.scale"]
    assert model.inner.scale.shape == (1,)
    assert model.inner.scale.item() == pytest.approx(math.log(10.0))

    class FakeEngine:
        module = model

        @staticmethod
        def zero_optimization_stage() -> int:
            return 2

    with full_parameters(FakeEngine(), promoted) as module:
        assert module.inner.scale.shape == ()
        state = module.state_dict()
    assert state["inner.scale"].shape == ()
    assert model.inner.scale is promoted["inner.scale"]  # the trained parameter is back


@pytest.mark.slow
def test_engine_trains_and_checkpoint_restores_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = WithScalar()
    promoted = promote_scalar_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    engine = initialize_engine(model, opt, None, EngineSettings(micro_batch_size=8, zero_stage=2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    losses = []
    for _ in range(20):
        loss = (engine(x) - y).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    save_engine_checkpoint(engine, tmp_path)
    saved = {k: v.clone() for k, v in engine.module.state_dict().items()}
    next_loss = (engine(x) - y).pow(2).mean()
    engine.backward(next_loss)
    engine.step()  # move away from the checkpoint ...
    assert not torch.equal(engine.module.linear.weight, saved["linear.weight"])
    load_engine_checkpoint(engine, tmp_path)  # ... and back
    for key, value in engine.module.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    with full_parameters(engine, promoted) as module:
        assert module.inner.scale.shape == ()
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        load_engine_checkpoint(engine, tmp_path / "elsewhere")


def _train_and_export(zero_stage: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = WithScalar()
    promoted = promote_scalar_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    engine = initialize_engine(model, opt, None, EngineSettings(micro_batch_size=8, zero_stage=zero_stage))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    for _ in range(10):
        loss = (engine(x) - y).pow(2).mean()
        engine.backward(loss)
        engine.step()
    with full_parameters(engine, promoted) as module:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_zero3_export_gathers_the_same_weights_as_zero2() -> None:
    """Under ZeRO-3 parameters are partitioned; full_parameters gathers them whole for export."""
    zero2, zero3 = _train_and_export(2), _train_and_export(3)
    shapes = {k: tuple(v.shape) for k, v in zero3.items()}
    assert shapes == {"linear.weight": (2, 4), "linear.bias": (2,), "inner.scale": ()}
    for key, value in zero2.items():
        torch.testing.assert_close(zero3[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(zero2["inner.scale"], torch.tensor(math.log(10.0)))  # it trained
