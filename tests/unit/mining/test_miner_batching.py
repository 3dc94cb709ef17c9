"""How a sample's mining depends on the batch it is mined in, on real tiny models (router, FAISS index, reader).

Measured on the tiny pipeline's artifacts (the exactly-once tests' reference): between batchings of 1, 8, 32 and
40 samples the reader's p(yes) moved by at most 1.8e-7 and the router's confidence by 6e-8 (float32 matrix
products block differently for another batch shape, and left padding changes the row width), while the
smallest margin |p(yes) - 0.5| was 0.02: no answer, and so no pair, changed. Only the float meta did, which is
what made the old exact comparison of a batch-8 run against the pipeline's batch-32 run fail. This test pins
that down: every decision is the same in every batching unless its margin is within float noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.mining.miner import BatchResult, MiningSettings, PreferenceMiner
from medrag_ray.models.reader import load_reader
from medrag_ray.reader.engine import ClosedScores, ReaderEngine
from medrag_ray.retrieval.retrieval_config import RetrievalConfig
from medrag_ray.retrieval.retriever import MultimodalRetriever

FLOAT_NOISE = 1e-5
"""Far above the 2e-7 measured, far below any margin a decision rests on."""


class RecordingEngine(ReaderEngine):
    """Keeps every p(yes) it scores, per input's prompt and image, to compare margins across batchings."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.p_yes: list[float] = []

    def score_closed(self, inputs, choices=("yes", "no"), **kw) -> ClosedScores:  # noqa: ANN001, ANN003
        scores = super().score_closed(inputs, choices, **kw)
        self.p_yes.extend(float(p) for p in scores.probs[:, 0])
        return scores


def mine_in_batches(root: Path, samples: list[Sample], batch_size: int) -> tuple[BatchResult, list[float]]:
    retriever = MultimodalRetriever.from_artifacts(root / "models" / "router", root / "index", with_images=True)
    model, processor = load_reader(root / "models" / "reader", device="cpu")
    engine = RecordingEngine(model, processor, batch_size=batch_size)
    miner = PreferenceMiner(retriever, engine, MiningSettings(retrieval=RetrievalConfig(k=4, k_max=3)))
    total = BatchResult()
    for start in range(0, len(samples), batch_size):
        part = miner.mine_batch(samples[start : start + batch_size])
        total.pairs += part.pairs
        total.outcomes += part.outcomes
    return total, engine.p_yes


@pytest.fixture(scope="module")
def closed(tiny_artifacts: Path) -> list[Sample]:
    rows = read_parquet(tiny_artifacts / "data" / "synthetic" / "samples_train.parquet", Sample)
    return [s for s in rows if s.answer_type == "closed"][:12]


def test_decisions_do_not_depend_on_the_batch(tiny_artifacts: Path, closed: list[Sample]) -> None:
    torch.manual_seed(0)
    runs = {bs: mine_in_batches(tiny_artifacts, closed, bs) for bs in (1, 5, len(closed))}
    whole, p_whole = runs[len(closed)]
    by_id = {o["sample_id"]: o for o in whole.outcomes}
    assert len(by_id) == len(closed)
    for bs, (result, p_yes) in runs.items():
        # the same inputs were scored (per batch: rag, no-rag, noisy-rag passes), each within float noise
        assert sorted(p_yes) == pytest.approx(sorted(p_whole), abs=FLOAT_NOISE), bs
        for outcome in result.outcomes:
            ref = by_id[outcome["sample_id"]]
            assert outcome["routed_domain"] == ref["routed_domain"]
            for name in ("rag", "no_rag", "noisy_rag"):
                assert outcome[name] == ref[name] or _borderline(p_whole), (bs, outcome["sample_id"], name)
        pairs = {p.id: p for p in result.pairs}
        assert set(pairs) == {p.id for p in whole.pairs} or _borderline(p_whole), bs
        for ref_pair in whole.pairs:
            pair = pairs[ref_pair.id]
            assert (pair.prompt, pair.chosen, pair.rejected, pair.noised_image_bytes) == (
                ref_pair.prompt, ref_pair.chosen, ref_pair.rejected, ref_pair.noised_image_bytes)
            meta, ref_meta = json.loads(pair.meta), json.loads(ref_pair.meta)
            assert meta["retrieved_ids"] == ref_meta["retrieved_ids"]
            assert meta["domain_confidence"] == pytest.approx(ref_meta["domain_confidence"], abs=FLOAT_NOISE)


def _borderline(p_yes: list[float]) -> bool:
    """A decision may differ only if some p(yes) lies within float noise of the 0.5 boundary."""
    return min(abs(p - 0.5) for p in p_yes) < FLOAT_NOISE
