"""JOMED distillation and MR-RAG fusion weights from a scripted reader over an in-memory index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from medrag_ray.retrieval.distill import (
    SCORES_SCHEMA,
    DomainRetrievers,
    FusionTask,
    HeadDistillTask,
    ScoredQuery,
    collate_scored,
    confidence_labels,
    count_scores,
    read_scored,
    read_scores,
    score_candidates,
    scores_rows,
    write_scored,
)
from medrag_ray.retrieval.retriever import load_retriever
from tests.unit.retrieval.scripted import HELPFUL, N_DOCS, N_QUERIES, ScriptedReader, scripted_index


@pytest.fixture(scope="module")
def retriever_and_samples(tmp_path_factory: pytest.TempPathFactory):
    save_dir = tmp_path_factory.mktemp("distill") / "radiology"
    return (*scripted_index(save_dir), save_dir)


def test_score_candidates_records_the_reader_and_the_embeddings(retriever_and_samples) -> None:
    mr, samples, images, text, image, _ = retriever_and_samples
    reader = ScriptedReader()
    scored = score_candidates(mr, reader, samples, images, "text", k=4, route=False)
    assert len(reader.inputs) == 1 and len(scored) == N_QUERIES
    for inp in reader.inputs[0]:  # JOMED's input: one (image, text) candidate, then the query image and question
        assert len(inp.images) == 2 and inp.parts[1].startswith("Reference 1:")
    first = scored[0]
    assert "d0" not in first.doc_ids and len(first.doc_ids) == 4  # the sample's own case is never a candidate
    assert all(q.answer == "yes" and q.head == "text" for q in scored)
    for q in scored:
        expected = [[0.9, 0.1] if d in HELPFUL else [0.3, 0.7] for d in q.doc_ids]
        assert np.allclose(q.class_probs, expected)
        rows = [int(d[1:]) for d in q.doc_ids]
        assert np.allclose(q.doc_text_emb, text[rows], atol=1e-6) and np.allclose(q.doc_image_emb, image[rows])
        assert list(q.scores) == sorted(q.scores, reverse=True)
    enc = mr.resources("radiology").retriever
    with torch.no_grad():
        base = enc.encode_query_images(enc.encoder.preprocess(images[:1])).numpy()[0]
    assert np.allclose(first.query_emb, base, atol=1e-6)
    with pytest.raises(ValueError, match="head must be"):
        score_candidates(mr, reader, samples, images, "fused", k=4, route=False)


def test_scored_round_trip_and_padding(tmp_path: Path, retriever_and_samples) -> None:
    mr, samples, images, *_ = retriever_and_samples
    scored = score_candidates(mr, ScriptedReader(), samples[:3], images[:3], "image", k=3, route=False)
    write_scored(scored, tmp_path / "s.parquet")
    assert read_scored(tmp_path / "s.parquet") == scored
    short = ScoredQuery(**{**scored[1].__dict__, "doc_ids": scored[1].doc_ids[:2], "scores": scored[1].scores[:2],
                           "class_probs": scored[1].class_probs[:2], "doc_text_emb": scored[1].doc_text_emb[:2],
                           "doc_image_emb": scored[1].doc_image_emb[:2]})
    batch = collate_scored([scored[0], short])
    assert batch.mask.tolist() == [[True] * 3, [True, True, False]]
    assert batch.gold_logprobs[0].tolist() == pytest.approx(np.log([p[0] for p in scored[0].class_probs]).tolist())


def test_scoring_pass_output_is_read_back_by_head_and_split(tmp_path: Path, retriever_and_samples) -> None:
    mr, samples, images, *_ = retriever_and_samples
    by = {(h, s): score_candidates(mr, ScriptedReader(), samples[i:i + 2], images[i:i + 2], h, k=3, route=False)
          for i, (h, s) in enumerate([("text", "train"), ("image", "train"), ("text", "val")])}
    out = tmp_path / "scores"
    out.mkdir()
    rows = [row for (_, split), queries in by.items() for row in scores_rows(queries, split)]
    for j in range(2):  # one file per actor batch, heads and splits mixed
        pq.write_table(pa.Table.from_pylist(rows[j::2], schema=SCORES_SCHEMA), out / f"{j}.parquet")
    for (head, split), queries in by.items():
        assert sorted(read_scores(out, head, split), key=lambda q: q.sample_id) == queries
    assert read_scores(out, "image", "val") == [] and read_scores(tmp_path / "none", "text", "train") == []
    assert count_scores(out) == {"image/train": 2, "text/train": 2, "text/val": 2}
    assert count_scores(tmp_path / "none") == {}


def test_confidence_labels_by_hand() -> None:
    gold = torch.log(torch.tensor([[0.2, 0.9, 0.1, 0.5], [0.6, 0.3, 0.0, 0.0]]))
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    positive, candidates = confidence_labels(gold, mask, n_negatives=2)
    assert positive.tolist() == [[False, True, False, False], [True, False, False, False]]
    assert candidates.tolist() == [[True, True, True, False], [True, True, False, False]]
    p, c = confidence_labels(gold[:1], torch.tensor([[True, False, False, False]]), 2)
    assert not p.any() and not c.any()  # one candidate: nothing to contrast


def _fit(task, steps: int, lr: float) -> DomainRetrievers:  # noqa: ANN001
    model = task.build_model()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = task.collate(task.train_queries)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    return model


def test_text_head_distillation_ranks_the_helpful_documents_first(retriever_and_samples, tmp_path: Path) -> None:
    mr, samples, images, _, _, save_dir = retriever_and_samples
    scored = score_candidates(mr, ScriptedReader(), samples, images, "text", k=N_DOCS, route=False)
    train, val = scored[1:16], scored[16:]  # q0 misses its own case d0
    task = HeadDistillTask("text", "text", {"radiology": str(save_dir)}, train, val, temperature=0.05)
    untrained = task.build_model()
    before = task.evaluate(untrained)
    model = _fit(task, 150, 1e-2)
    after = task.evaluate(model)
    assert after["val_kl"] < 0.5 * before["val_kl"], (before, after)
    assert after["val_best_candidate_agreement"] == 1.0
    assert after["val_fused_accuracy"] >= before["val_fused_accuracy"]

    def helpful_ranked_first(m: DomainRetrievers) -> float:
        with torch.no_grad():
            scores = m.head_scores(collate_scored(val), "text")
        tops = [{q.doc_ids[j] for j in row.argsort(descending=True)[: len(HELPFUL)].tolist()}
                for q, row in zip(val, scores, strict=True)]
        return float(np.mean([t == HELPFUL for t in tops]))

    assert helpful_ranked_first(untrained) < 0.5 and helpful_ranked_first(model) == 1.0
    r = model.retrievers["radiology"]
    assert torch.equal(r.image_head.weight, torch.eye(r.embed_dim))  # only the text head moved
    task.export(model, tmp_path / "out")
    loaded = load_retriever(tmp_path / "out" / "radiology")
    assert torch.allclose(loaded.text_head.weight, r.text_head.weight)
    with pytest.raises(ValueError, match="own candidates"):
        HeadDistillTask("image", "image", {"radiology": str(save_dir)}, train, val, temperature=0.05)
    with pytest.raises(ValueError, match="no retriever directory"):
        HeadDistillTask("text", "text", {}, train, val, temperature=0.05)


def test_fusion_weights_learn_which_similarity_finds_the_helpful_documents(retriever_and_samples) -> None:
    mr, samples, images, text, image, save_dir = retriever_and_samples
    scored = score_candidates(mr, ScriptedReader(), samples, images, "text", k=N_DOCS - 1, route=False)
    # Rig the similarities: helpful candidates look like the query image but their text points away from it,
    # so plain image->text retrieval (1, 0, 0) ranks them last and only the image term can find them.
    rigged = []
    for q in scored:
        away = tuple(-v for v in q.query_emb)
        img = [tuple(q.query_emb) if d in HELPFUL else row for d, row in zip(q.doc_ids, q.doc_image_emb, strict=True)]
        txt = [away if d in HELPFUL else row for d, row in zip(q.doc_ids, q.doc_text_emb, strict=True)]
        rigged.append(ScoredQuery(**{**q.__dict__, "doc_image_emb": tuple(img), "doc_text_emb": tuple(txt)}))
    task = FusionTask("fusion", {"radiology": str(save_dir)}, rigged[:16], rigged[16:], temperature=0.1,
                      n_negatives=2)
    before = task.evaluate(task.build_model())  # (1, 0, 0): plain image->text
    model = _fit(task, 200, 5e-2)
    metrics = task.evaluate(model)
    assert before["radiology_beta"] == 0.0 and metrics["radiology_beta"] > 0.5
    assert before["val_best_candidate_agreement"] == 0.0 and metrics["val_best_candidate_agreement"] == 1.0
    r = model.retrievers["radiology"]
    assert torch.equal(r.text_head.weight, torch.eye(r.embed_dim))  # heads frozen while fusion trains


def test_every_trainable_parameter_gets_a_gradient_from_a_one_domain_batch(retriever_and_samples) -> None:
    """Data-parallel workers must reduce the same gradients even when their batches hold different domains."""
    mr, samples, images, _, _, save_dir = retriever_and_samples
    scored = score_candidates(mr, ScriptedReader(), samples[:4], images[:4], "text", k=3, route=False)
    task = HeadDistillTask("text", "text", {"radiology": str(save_dir), "pathology": str(save_dir)}, scored, [], 0.1)
    model = task.build_model()
    task.loss(model, task.collate(scored)).backward()  # radiology queries only
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[1] for n in trainable} == {"radiology", "pathology"}
    assert all(p.grad is not None for p in trainable.values())
    assert torch.all(trainable["retrievers.pathology.text_head.weight"].grad == 0)
    assert trainable["retrievers.radiology.text_head.weight"].grad.abs().sum() > 0
