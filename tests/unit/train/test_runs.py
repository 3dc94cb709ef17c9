"""Run identity: what makes two training runs the same run (and what does not)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from medrag_ray.config import LoraSettings, TrainLoopConfig, to_dict
from medrag_ray.train.runs import fingerprint, run_folder_name, run_identity


def build(name: str, dataset: str, lora: LoraSettings, domains: tuple[str, ...] = ()) -> None:
    """A stand-in task builder."""


def test_identity_covers_the_builder_its_arguments_and_the_loop() -> None:
    loop, lora = TrainLoopConfig(), LoraSettings()
    base = run_identity(functools.partial(build, "r", "/d", lora, domains=("a", "b")), loop)
    assert base["task"] == {
        "builder": f"{__name__}.build", "args": ["r", "/d", to_dict(lora)],
        "kwargs": {"domains": ["a", "b"]},
    }
    assert base["train"]["epochs"] == loop.epochs
    variants = [
        run_identity(functools.partial(build, "r", "/other", lora, domains=("a", "b")), loop),
        run_identity(functools.partial(build, "r", "/d", dataclasses.replace(lora, r=lora.r * 2), domains=("a", "b")),
                     loop),
        run_identity(functools.partial(build, "r", "/d", lora, domains=("a", "b", "c")), loop),
        run_identity(functools.partial(build, "r", "/d", lora, domains=("a", "b")),
                     dataclasses.replace(loop, lr=loop.lr * 2)),
        run_identity(functools.partial(print, "r", "/d", lora, domains=("a", "b")), loop),
    ]
    prints = {fingerprint(v) for v in variants}
    assert len(prints) == len(variants) and fingerprint(base) not in prints


def test_fingerprint_is_stable_and_path_like_values_compare_as_text() -> None:
    loop = TrainLoopConfig()
    a = run_identity(functools.partial(build, "r", Path("/d"), LoraSettings()), loop)
    b = run_identity(functools.partial(build, "r", "/d", LoraSettings()), loop)
    assert a == b and fingerprint(a) == fingerprint(b)
    # canonical JSON: dict order does not matter; the value is a fixed function of the identity
    assert fingerprint({"x": 1, "y": [1, 2]}) == fingerprint({"y": [1, 2], "x": 1})
    assert fingerprint({"x": 1}) == "5041bf1f71"
    assert run_folder_name("router", {"x": 1}) == "router-5041bf1f71"
