"""The model card, weight files and device/dtype resolution shared by every model directory."""

from __future__ import annotations

import json

import pytest
import torch

from medrag_ray.models.common import (
    CARD_FILE,
    ModelCard,
    ModelLoadError,
    dtype_name,
    load_state_dict,
    read_card,
    resolve_device,
    resolve_dtype,
    save_state_dict,
    write_card,
)


def test_card_round_trip(tmp_path) -> None:
    card = ModelCard(
        kind="router", config={"a": 1, "b": [1, 2]}, extra={"domains": ["radiology", "pathology"]}
    )
    write_card(tmp_path, card)
    raw = json.loads((tmp_path / CARD_FILE).read_text())
    assert raw["created_by"] == "medrag-ray" and raw["kind"] == "router"
    assert read_card(tmp_path) == card


def test_card_absent_is_none(tmp_path) -> None:
    assert read_card(tmp_path) is None


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"created_by": "medrag-ray"}', "'kind'"),
        ('{"kind": "router", "created_by": "someone-else"}', "created_by"),
        ('{"kind": "router", "created_by": "medrag-ray", "format_version": 99}', "upgrade"),
        ('{"kind": "teapot", "created_by": "medrag-ray"}', "kind must be one of"),
    ],
)
def test_bad_cards_fail_clearly(tmp_path, content: str, needle: str) -> None:
    (tmp_path / CARD_FILE).write_text(content)
    with pytest.raises(ModelLoadError, match="medrag_model.json") as info:
        read_card(tmp_path)
    assert needle in str(info.value)


def test_card_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        ModelCard(kind="retriever")


def test_state_dict_round_trip_breaks_shared_storage(tmp_path) -> None:
    shared = torch.randn(3, 4)
    sd = {"a": shared, "b": shared, "c": torch.arange(5)}  # tied tensors must still save
    path = save_state_dict(sd, tmp_path, stem="w")
    assert path.name == "w.safetensors"
    loaded = load_state_dict(tmp_path, stem="w")
    assert set(loaded) == {"a", "b", "c"}
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["b"], shared)
    assert torch.equal(loaded["c"], torch.arange(5))


def test_missing_weights_fail_clearly(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="neither w.safetensors nor w.bin"):
        load_state_dict(tmp_path, stem="w")


def test_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float32, cpu) == torch.float32
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ValueError, match="'auto' or one of"):
        resolve_dtype("fp8", cpu)


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            resolve_device("cuda")
