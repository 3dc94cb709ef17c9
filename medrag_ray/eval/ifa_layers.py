"""MR-RAG's attention-blocking experiment: which decoder layers carry the documents -> question information.

For each decoder layer l of the reader's language model, the closed questions are scored again with the
question -> document attention blocked in l only (``IFASettings(layers=(l,), mode="block")``: those logits are
-inf, so no document information reaches the question tokens in that layer). A layer where blocking changes the
answers most is *critical* (MR-RAG, Key Design 2); IFA's relevance bias is applied there.

Per layer: accuracy, mean p(gold), mean |Δ p(gold)| and mean KL(unblocked ‖ blocked) over the answer choices;
the unblocked baseline's accuracy and mean p(gold) alongside. :func:`critical_layers` ranks by one of them.

The closed answer is read at the prompt's last position, which is no question token (the chat template's
"ASSISTANT:" follows the question): blocking in the *last* decoder layer only changes the question rows'
outputs, which no later layer carries to that position, so its effect on the answer is zero by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medrag_ray.config import IFA_LAYER_CRITERIA
from medrag_ray.reader.ifa import IFASettings, IFASpec, num_decoder_layers
from medrag_ray.reader.prompts import ReaderInput

CRITERIA: tuple[str, ...] = IFA_LAYER_CRITERIA
"""How "blocking changes the answer quality most" is measured: mean |Δ p(gold)|, mean KL, or accuracy lost."""


@dataclass(frozen=True)
class LayerEffect:
    """The closed answers of one layer's blocking run, compared with the unblocked baseline."""

    layer: int
    accuracy: float
    mean_p_gold: float
    abs_delta_gold: float
    """Mean |p_blocked(gold) - p_base(gold)|."""
    kl: float
    """Mean KL(p_base ‖ p_blocked) over the choices (nats)."""
    accuracy_drop: float
    """Baseline accuracy minus this layer's."""

    def to_dict(self) -> dict[str, float | int]:
        return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class BlockingEffects:
    """The baseline and every layer's blocking effect on the same ``n`` questions."""

    n: int
    baseline: dict[str, float]
    per_layer: tuple[LayerEffect, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "baseline": self.baseline, "per_layer": [e.to_dict() for e in self.per_layer]}


def gold_indices(labels: Sequence[str], choices: Sequence[str]) -> np.ndarray:
    """The index of each label in ``choices``; ValueError names a label that is not a choice."""
    bad = sorted({lab for lab in labels if lab not in choices})
    if bad:
        raise ValueError(f"labels {bad} are not among the choices {list(choices)}; normalise the answers first")
    return np.asarray([list(choices).index(lab) for lab in labels], dtype=np.int64)


def compare(probs: np.ndarray, base: np.ndarray, gold: np.ndarray, layer: int) -> LayerEffect:
    """One layer's :class:`LayerEffect` from its probabilities ``[N, C]`` and the baseline's."""
    rows = np.arange(len(gold))
    eps = 1e-12
    kl = np.maximum(np.sum(base * (np.log(base + eps) - np.log(probs + eps)), axis=1), 0.0)  # >= 0 up to rounding
    accuracy = float(np.mean(probs.argmax(axis=1) == gold))
    base_accuracy = float(np.mean(base.argmax(axis=1) == gold))
    return LayerEffect(
        layer=layer,
        accuracy=accuracy,
        mean_p_gold=float(np.mean(probs[rows, gold])),
        abs_delta_gold=float(np.mean(np.abs(probs[rows, gold] - base[rows, gold]))),
        kl=float(np.mean(kl)),
        accuracy_drop=base_accuracy - accuracy,
    )


def layer_blocking_effects(
    engine: Any,
    inputs: Sequence[ReaderInput],
    specs: Sequence[IFASpec],
    labels: Sequence[str],
    choices: Sequence[str] = ("yes", "no"),
    layers: Sequence[int] | None = None,
) -> BlockingEffects:
    """Score ``inputs`` unblocked, then with question -> document attention blocked in each decoder layer
    (``layers``; default all of the reader's) -- MR-RAG's attention-blocking experiment."""
    if not (len(inputs) == len(specs) == len(labels)) or not inputs:
        raise ValueError(f"need as many specs and labels as inputs (>= 1): {len(inputs)}, {len(specs)}, "
                         f"{len(labels)}")
    gold = gold_indices(labels, choices)
    base = np.asarray(engine.score_closed(inputs, choices).probs, dtype=np.float64)
    rows = np.arange(len(gold))
    baseline = {"accuracy": float(np.mean(base.argmax(axis=1) == gold)),
                "mean_p_gold": float(np.mean(base[rows, gold]))}
    todo = list(layers) if layers is not None else list(range(num_decoder_layers(engine.model)))
    effects = []
    for layer in todo:
        settings = IFASettings(layers=(layer,), mode="block")
        probs = engine.score_closed(inputs, choices, ifa=settings, ifa_specs=list(specs)).probs
        effects.append(compare(np.asarray(probs, dtype=np.float64), base, gold, layer))
    return BlockingEffects(len(inputs), {k: round(v, 6) for k, v in baseline.items()}, tuple(effects))


def critical_layers(effects: BlockingEffects, top_n: int, criterion: str = "abs_delta_gold") -> tuple[int, ...]:
    """The ``top_n`` layers whose blocking changes the answers most by ``criterion`` (ties: the lower layer)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    ranked = sorted(effects.per_layer, key=lambda e: (-getattr(e, criterion), e.layer))
    return tuple(sorted(e.layer for e in ranked[:top_n]))


def blocking_markdown(effects: BlockingEffects, chosen: Sequence[int], title: str) -> str:
    """The per-layer table (the chosen critical layers marked) under the baseline line."""
    b: Mapping[str, float] = effects.baseline
    lines = [
        f"# {title}",
        "",
        f"n = {effects.n}; unblocked baseline: accuracy {b['accuracy']:.3f}, mean p(gold) {b['mean_p_gold']:.3f}; "
        f"critical layers: {list(chosen)}",
        "",
        "| layer | accuracy | accuracy drop | mean p(gold) | mean abs Δp(gold) | mean KL | critical |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in effects.per_layer:
        mark = "yes" if e.layer in chosen else ""
        lines.append(f"| {e.layer} | {e.accuracy:.3f} | {e.accuracy_drop:+.3f} | {e.mean_p_gold:.4f} | "
                     f"{e.abs_delta_gold:.2e} | {e.kl:.2e} | {mark} |")
    return "\n".join(lines) + "\n"
