"""Preference mining and serving one answer with every real reader architecture (tiny random checkpoints), over
a real tiny dual encoder and FAISS index (:func:`tests.unit.retrieval.scripted.scripted_index`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medrag_ray.data.schema import Sample
from medrag_ray.mining.miner import MiningSettings, PreferenceMiner, png_bytes
from medrag_ray.models.reader import load_reader
from medrag_ray.reader.context import reader_input, retrieve_contexts, sample_image
from medrag_ray.reader.engine import ReaderEngine
from medrag_ray.retrieval.retrieval_config import RetrievalConfig
from medrag_ray.serving.answer import Evidence, Retrieved, plan_read, read_plans
from medrag_ray.serving.query import AnswerQuery
from tests.unit.conformance.builders import READERS, image
from tests.unit.retrieval.scripted import pattern, scripted_index

RETRIEVAL = RetrievalConfig(k=4, k_max=3)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return scripted_index(tmp_path_factory.mktemp("scripted"))[0]


def samples(n: int) -> list[Sample]:
    return [Sample(id=f"q{i}", domain="radiology", split="train", source="t", question="Is there cardiomegaly?",
                   answer="yes" if i % 2 else "no", answer_type="closed", image_bytes=png_bytes(pattern(300 + i)),
                   image_available=True) for i in range(n)]


@pytest.mark.parametrize("arch", sorted(READERS))
def test_mining_answers_are_the_readers_own(arch: str, retriever, reader_dirs: dict[str, Path]) -> None:
    """Every sample mined (no reject), and each pass's answer in the batch is the one the reader gives that
    input alone: mining is exact on this architecture whatever the batch holds."""
    model, processor = load_reader(reader_dirs[arch])
    engine = ReaderEngine(model, processor, batch_size=16)
    miner = PreferenceMiner(retriever, engine, MiningSettings(retrieval=RETRIEVAL, route=False))
    batch = samples(5)
    result = miner.mine_batch(batch)
    assert result.rejects == [] and [o["sample_id"] for o in result.outcomes] == [s.id for s in batch]

    contexts = retrieve_contexts(retriever, batch, [sample_image(s) for s in batch], RETRIEVAL, route=False)
    alone = ReaderEngine(model, processor, batch_size=1)
    for s, ctx, outcome in zip(batch, contexts, result.outcomes, strict=True):
        assert alone.score_closed([reader_input(s, sample_image(s), ctx)]).answers[0] == outcome["rag"]
        assert alone.score_closed([reader_input(s, sample_image(s), None)]).answers[0] == outcome["no_rag"]
    for pair in result.pairs:
        meta = json.loads(pair.meta)
        assert pair.id.startswith(meta["sample_id"]) and pair.pair_type in ("cm", "oa1", "oa2")
        assert all(t.strip() in pair.prompt for t in contexts[int(meta["sample_id"][1:])].texts)


@pytest.mark.parametrize("arch", sorted(READERS))
def test_serving_one_closed_and_one_report_answer(arch: str, reader_dirs: dict[str, Path]) -> None:
    model, processor = load_reader(reader_dirs[arch])
    engine = ReaderEngine(model, processor, batch_size=8)
    evidence = (Evidence("d1", "Mild cardiomegaly.", 0.9, 1, True), Evidence("d2", "No effusion.", 0.7, 2, True),
                Evidence("d3", "Clear lungs.", 0.2, 3, False))
    retrieved = Retrieved("radiology", 0.8, evidence)
    query_image = image(150, (84, 56))
    closed = plan_read(AnswerQuery(question="Is there cardiomegaly?"), query_image, retrieved, "mmed")
    report = plan_read(AnswerQuery(task="report", max_new_tokens=4), query_image, retrieved, "mmed")
    answers = read_plans(engine, [closed, report])
    direct = engine.score_closed(list(closed.inputs)).probs
    assert answers[0].probabilities is not None
    assert list(answers[0].probabilities.values()) == pytest.approx(list(direct[0]), abs=1e-5)
    assert answers[0].answer == ("yes", "no")[int(np.argmax(direct[0]))]
    assert answers[0].consistency is not None and len(answers[0].consistency["candidate_answers"]) == 2
    assert answers[1].answer == engine.generate([report.inputs[0]], max_new_tokens=4)[0]
