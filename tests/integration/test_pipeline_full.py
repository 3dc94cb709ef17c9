"""The README's main job end to end on a tiny default: data -> models -> Ray Train router and retrievers ->
Ray Data index -> vision-tower and reader pretraining -> reader RAG-SFT -> preference mining -> RAG-PT DPO,
then the retrieval API over what the pipeline wrote, the mining job's exactly-once guarantees (a killed actor, a
resumed run) on the same artifacts, DPO's resume, and the mining job submitted to a `ray start --head` cluster
with `ray job submit`."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch

from jobs import mine_prefs, train_dpo
from jobs.runtime import shutdown_ray
from medrag_ray.config import PIPELINE_STEPS, MinePrefsConfig
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import CorpusDoc, Sample, read_parquet
from medrag_ray.data.subset import take_spread
from medrag_ray.eval.classification import classification_report
from medrag_ray.mining.store import MiningStore
from medrag_ray.models.reader import load_reader
from medrag_ray.models.router import load_router
from medrag_ray.retrieval.distill import read_scores
from medrag_ray.retrieval.retrieval_config import RetrievalConfig
from medrag_ray.retrieval.retriever import MultimodalRetriever, load_retriever
from medrag_ray.train.data import domain_examples
from medrag_ray.train.tasks import predict_domains
from tests.conftest import REPO_ROOT
from tests.integration.conftest import MINING_LIMIT, HeadNode, submit_job

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors run this module's store subclass

MINING_BATCH = MinePrefsConfig().batch_size
"""The pipeline's mining step runs with the job's default batch size; the re-runs compare like with like."""


def test_pipeline_trains_indexes_and_retrieves(built: tuple[Path, dict[str, Path]]) -> None:
    tmp_path, outputs = built
    assert list(outputs) == list(PIPELINE_STEPS)
    domains = ["pathology", "radiology"]
    router_metrics = json.loads(outputs["train_router"].read_text())
    assert router_metrics["domains"] == domains and [h["epoch"] for h in router_metrics["history"]] == [1, 2, 3]
    router = load_router(tmp_path / "models" / "router")
    val = domain_examples(tmp_path / "data" / "synthetic" / "samples_val.parquet")
    expected = classification_report([e.label for e in val], predict_domains(router, val), router.domains)
    assert router_metrics["val"] == expected.to_dict()  # per-domain precision/recall + confusion of the saved router
    assert expected.accuracy >= 0.8
    assert set(json.loads(outputs["train_retriever"].read_text())["runs"]) == set(domains)
    manifest = json.loads(outputs["build_index"].read_text())
    corpus = read_parquet(tmp_path / "data" / "synthetic" / "corpus.parquet", CorpusDoc)
    for d in domains:
        assert manifest["domains"][d]["n_docs"] == sum(doc.domain == d for doc in corpus)
        assert Path(manifest["domains"][d]["encoder_dir"]) == (tmp_path / "models" / "retriever" / d).resolve()

    retriever = MultimodalRetriever.from_artifacts(tmp_path / "models" / "router", tmp_path / "index")
    queries = [next(doc for doc in corpus if doc.domain == d) for d in domains]
    images = [load_image(doc.image_bytes) for doc in queries]
    # image head: a corpus image's nearest document image is itself (cosine 1), in its routed domain
    results = retriever.retrieve(images, cfg=RetrievalConfig(k=5, mode="image", adaptive="none"))
    for doc, result in zip(queries, results, strict=True):
        assert result.domain == doc.domain and 0.0 < result.domain_confidence <= 1.0
        assert result.hits[0].doc_id == doc.id and result.hits[0].score == pytest.approx(1.0, abs=1e-4)
    # text head + adaptive-k (paper's gap rule): hits sorted, kept ones a prefix, within [k_min, k]
    results = retriever.retrieve(images, cfg=RetrievalConfig(k=5, mode="text", adaptive="gap", gamma=0.01))
    ids = {doc.id: doc for doc in corpus}
    for doc, result in zip(queries, results, strict=True):
        scores = [h.score for h in result.hits]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5
        assert [h.kept for h in result.hits] == [True] * result.k_kept + [False] * (5 - result.k_kept)
        assert 1 <= result.k_kept <= 5
        assert all(ids[h.doc_id].domain == doc.domain and h.text == ids[h.doc_id].text for h in result.hits)

    vision_metrics = json.loads(outputs["pretrain_vision"].read_text())
    assert [h["epoch"] for h in vision_metrics["history"]] == [1, 2] and "val_accuracy" in vision_metrics["final"]
    assert vision_metrics["config"]["dataset_dir"] == str(tmp_path / "data" / "reader_pretrain")
    base_metrics = json.loads(outputs["pretrain_reader"].read_text())
    assert base_metrics["config"]["reader_dir"] == str(tmp_path / "models" / "reader_vision")
    assert base_metrics["config"]["finetune"] == "full" and base_metrics["config"]["context_source"] == "phenotype"
    assert base_metrics["config"]["rag_fraction"] == 0.75 and "val_accuracy_rag" in base_metrics["final"]
    pretrain_manifest = json.loads((tmp_path / "data" / "reader_pretrain" / "manifest.json").read_text())
    assert pretrain_manifest["config"]["seed"] == 1 and pretrain_manifest["config"]["n_per_domain"] == 12
    assert not (tmp_path / "models" / "reader_base" / "adapter").exists()
    reader_metrics = json.loads(outputs["train_reader"].read_text())
    assert [h["epoch"] for h in reader_metrics["history"]] == [1]
    assert reader_metrics["config"]["reader_dir"] == str(tmp_path / "models" / "reader_base")
    assert (tmp_path / "models" / "reader" / "adapter").is_dir()
    summary = json.loads(outputs["mine_prefs"].read_text())
    train = read_parquet(tmp_path / "data" / "synthetic" / "samples_train.parquet", Sample)
    samples = take_spread(train, [s.domain for s in train], MINING_LIMIT)
    closed = [s for s in samples if s.answer_type == "closed"]
    assert {s.domain for s in samples} == {"pathology", "radiology"}  # mining_limit spreads over the domains
    assert sorted(summary["alignment_by_domain"]) == ["pathology", "radiology"]
    assert summary["samples_mined"] == len(closed) and summary["samples_rejected"] == len(samples) - len(closed)
    pairs = MiningStore(tmp_path / "prefs").pairs()
    assert summary["pairs"] == len(pairs) == sum(summary["pairs_by_type"].values())
    assert summary["alignment"]["cr_numerator"] == summary["pairs_by_type"].get("cm", 0)
    assert summary["alignment"]["or_numerator"] == summary["pairs_by_type"].get("oa2", 0)
    by_id = {s.id: s for s in closed}
    for pair in pairs:
        sample = by_id[pair.id.rsplit("/", 1)[0]]
        truth = sample.answer.strip().lower()
        assert pair.chosen == truth and pair.image_bytes == sample.image_bytes
        assert (pair.rejected == truth) == (pair.pair_type == "cm")  # D_cm rejects the right answer on x_v*
        assert (pair.noised_image_bytes is not None) == (pair.rejected_noised == 1) == (pair.pair_type == "cm")


def test_rag_pt_stages_train_from_each_other_and_resume(built: tuple[Path, dict[str, Path]]) -> None:
    root, outputs = built
    metrics = json.loads(outputs["train_dpo"].read_text())
    pairs = MiningStore(root / "prefs").pairs()
    ran = [s for s in metrics["stages"] if "skipped" not in s]
    assert ran, metrics["stages"]
    kinds = {"cm": 1, "oa1": 2, "oa2": 2}
    for stage in metrics["stages"]:
        n = sum(kinds[p.pair_type] == stage["stage"] for p in pairs)
        assert stage["pairs"]["train"] + stage["pairs"]["val"] == n
        assert ("skipped" in stage) == (stage["pairs"]["train"] == 0)
    assert ran[0]["reader_dir"] == str((root / "models" / "reader").resolve())
    if len(ran) == 2:  # stage 2 starts from (and is referenced against) stage 1's reader
        assert ran[1]["reader_dir"] == str((root / "data" / "dpo" / "stage1" / "reader").resolve())
    for stage in ran:
        assert [h["epoch"] for h in stage["history"]] == [1] and math.isfinite(stage["final"]["train_loss"])
    assert (root / "models" / "reader_dpo" / "adapter").is_dir()
    load_reader(root / "models" / "reader_dpo")
    # the same command again resumes every stage from its finished checkpoint: nothing is retrained
    try:
        again = train_dpo.main(train_dpo.parse_args([
            f"pairs_path={root / 'prefs' / 'pairs'}", f"reader_dir={root / 'models' / 'reader'}",
            f"out_dir={root / 'models' / 'reader_dpo'}", f"work_dir={root / 'data' / 'dpo'}", "overwrite=true",
            "train.epochs=1", "train.batch_size=2", f"ray_train.storage_path={root / 'ray_train'}",
        ]))
    finally:
        shutdown_ray()
    assert json.loads((again / "metrics.json").read_text())["stages"] == metrics["stages"]


def test_distillation_trains_the_text_head_then_the_image_head_then_fusion(built) -> None:  # noqa: ANN001
    root, outputs = built
    out, work = root / "models" / "retriever_jomed", root / "data" / "distill"
    metrics = json.loads(outputs["distill_retriever"].read_text())
    assert metrics["scored_queries"] == {"text/train": 12, "text/val": 12, "image/train": 12, "image/val": 12}
    assert [len(metrics["runs"][p]["history"]) for p in ("text", "image", "fusion")] == [2, 2, 1]
    assert "val_kl" in metrics["runs"]["text"]["final"] and "val_fused_accuracy" in metrics["runs"]["image"]["final"]
    for part in ("text", "image"):  # the same validation metrics before training, from the untrained head
        initial, final = metrics["runs"][part]["initial"], metrics["runs"][part]["final"]
        assert set(initial) == set(final) - {"epoch", "train_loss", "lr", "epoch_seconds"}
        assert initial["val_kl"] != final["val_kl"]
    trained = {q.domain for q in read_scores(work / "scores", "text", "train")}
    assert trained
    for domain in trained:  # the text run moves the text head only; the image run the image head only
        text_run = load_retriever(work / "heads" / "text" / domain)
        image_run = load_retriever(work / "heads" / "image" / domain)
        final = load_retriever(out / domain)
        eye = torch.eye(final.embed_dim)
        assert not torch.equal(text_run.text_head.weight, eye) and torch.equal(text_run.image_head.weight, eye)
        assert torch.equal(image_run.text_head.weight, text_run.text_head.weight)
        assert not torch.equal(image_run.image_head.weight, eye)
        assert torch.equal(final.image_head.weight, image_run.image_head.weight)
    domains = ["pathology", "radiology"]
    mr = MultimodalRetriever.from_artifacts(root / "models" / "router", root / "index",
                                            retriever_dirs={d: out / d for d in domains})
    doc = read_parquet(root / "data" / "synthetic" / "corpus.parquet", CorpusDoc)[0]
    [result] = mr.retrieve([load_image(doc.image_bytes)], cfg=RetrievalConfig(k=3, mode="fused", adaptive="none"))
    assert len(result.hits) == 3


def test_evaluation_rows_and_the_jomed_table(built) -> None:  # noqa: ANN001
    root, outputs = built
    rag_pt = json.loads(outputs["evaluate"].read_text())
    jomed = json.loads((root / "eval" / "jomed.json").read_text())
    closed = [s for s in read_parquet(root / "data" / "synthetic" / "samples_test.parquet", Sample)[:30]
              if s.answer_type == "closed"]
    rows = rag_pt["rows"]
    assert [r["name"] for r in rows][:3] == ["reader, no retrieval", "+ retrieval (fixed k=3)", "+ adaptive-k (gap)"]
    assert len(rows) == 3 + len(rag_pt["rag_pt_readers"]) and rag_pt["rag_pt_readers"]
    assert all(r["n"] == len(closed) for r in rows) and rows[0]["vs_above"] is None
    for above, row in zip(rows, rows[1:], strict=False):  # each row paired with the one above, per finding kind
        assert row["vs_above"]["row"] == above["name"]
        assert row["vs_above"]["difference"] == pytest.approx(row["accuracy"] - above["accuracy"])
        assert set(row["vs_above"]["by_kind"]) == set(row["by_kind"]) == {"visible", "subtle"}
    diagnostics = {r["name"]: r for r in rag_pt["diagnostics"]}
    oracle = diagnostics["reader, oracle context (3 reports of the query's phenotype)"]
    assert oracle["vs_above"]["row"] == "reader, no retrieval" and oracle["n"] == len(closed)
    quality = rag_pt["retrieval"]["text head, fixed k=3"]["overall"]
    assert quality["n"] == len(closed) and 0.0 <= quality["phenotype_precision"] <= 1.0
    assert sum(rag_pt["adaptive_k"]["kept"]["gap"].values()) == len(closed)
    report = (root / "eval" / "report.md").read_text()
    for png in ("ablation", "diagnostics", "similarity_drop", "alignment", "jomed"):
        assert (root / "eval" / "plots" / f"{png}.png").is_file() and f"plots/{png}.png" in report
    assert rag_pt["alignment"]["rag_sft"]["n"] == len(closed) and "rag_pt" in rag_pt["alignment"]
    assert jomed["all"]["n"] == len(closed) == jomed["consistent"]["n"] + jomed["inconsistent"]["n"]
    assert (root / "eval" / "rag_pt.md").is_file() and (root / "eval" / "jomed.md").is_file()


NUMBERS = ("p_yes", "domain_confidence", "retrieved_scores")
"""Meta fields that are float32 results: a batch of another size or composition changes their last bits (the
router's and the reader's matrix products block differently per batch shape; see tests/unit/mining/
test_miner_batching.py), never a decision."""


def mined_pairs(out_dir: Path) -> list[tuple]:
    """What exactly-once is about, compared exactly: each pair's id, prompt, sides, noise and the meta's decisions
    (every pass's answer, the retrieved and noise-source ids), in id order."""
    return [(p.id, p.prompt, p.chosen, p.rejected, p.rejected_noised, p.noised_image_bytes,
             {k: v for k, v in json.loads(p.meta).items() if k not in NUMBERS}) for p in MiningStore(out_dir).pairs()]


def assert_same_pairs(out_dir: Path, reference_dir: Path) -> None:
    """The pairs of ``out_dir`` are those of ``reference_dir``: decisions equal, float meta within 1e-5."""
    assert mined_pairs(out_dir) == mined_pairs(reference_dir)
    for got, ref in zip(MiningStore(out_dir).pairs(), MiningStore(reference_dir).pairs(), strict=True):
        got_meta, ref_meta = json.loads(got.meta), json.loads(ref.meta)
        for key in NUMBERS:
            assert got_meta[key] == pytest.approx(ref_meta[key], abs=1e-5), (got.id, key)


class KillOnceStore(MiningStore):
    """Dies (SIGKILL, the actor's whole process) after a batch's pairs are written but before its done record:
    the worst moment for exactly-once. Only the first time: the marker file says it happened."""

    marker: Path

    def _write_done(self, key, rows):  # noqa: ANN001
        if not self.marker.exists():
            self.marker.write_text(key)
            os.kill(os.getpid(), signal.SIGKILL)
        super()._write_done(key, rows)


def mine_args(root: Path, out_dir: Path, **kw) -> list[str]:  # noqa: ANN003
    return [
        f"samples_path={root / 'data' / 'synthetic' / 'samples_train.parquet'}",
        f"reader_dir={root / 'models' / 'reader'}", f"context.router_dir={root / 'models' / 'router'}",
        f"context.index_dir={root / 'index'}", f"out_dir={out_dir}", f"limit={MINING_LIMIT}",
        f"batch_size={MINING_BATCH}",
        "build_missing=false", *[f"{k}={v}" for k, v in kw.items()],
    ]


def mine_cfg(root: Path, out_dir: Path, **kw) -> MinePrefsConfig:  # noqa: ANN003
    return mine_prefs.parse_args(mine_args(root, out_dir, **kw))


def test_mining_survives_a_killed_actor_and_resumes_exactly_once(built, tmp_path) -> None:  # noqa: ANN001
    root, _ = built
    reference = root / "prefs"  # the pipeline's uninterrupted run, with the same batch size
    marker = tmp_path / "killed"

    class Killing(mine_prefs.MinerActor):
        store_cls = type("Store", (KillOnceStore,), {"marker": marker})

    try:
        summary = mine_prefs.main(mine_cfg(root, tmp_path / "killed_run"), actor_cls=Killing)
        assert marker.exists()  # an actor really died mid-batch
        assert summary["this_run"]["samples"] == MINING_LIMIT
        assert_same_pairs(tmp_path / "killed_run", reference)  # nothing lost, nothing duplicated

        # a crash between batches: drop half of the ledger's done records, re-run, only those are mined again
        store = MiningStore(tmp_path / "killed_run")
        dropped = store.done_files()[::2]
        n_dropped = sum(len(pq.read_table(f)) for f in dropped)
        for f in dropped:
            f.unlink()
        summary = mine_prefs.main(mine_cfg(root, tmp_path / "killed_run"))
        assert summary["this_run"]["samples"] == n_dropped
        assert_same_pairs(tmp_path / "killed_run", reference)
        summary = mine_prefs.main(mine_cfg(root, tmp_path / "killed_run"))
        assert summary["this_run"]["samples"] == 0 and summary["pairs"] == len(mined_pairs(reference))
    finally:
        shutdown_ray()


def test_mine_prefs_through_ray_job_submit(built, ray_head: HeadNode, tmp_path: Path) -> None:  # noqa: ANN001
    """`ray job submit --working-dir . -- python jobs/mine_prefs.py ...` against a `ray start --head` cluster
    mines the same pairs as the pipeline's in-process run, and a second submission resumes with nothing to do."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    root, _ = built
    out_dir = tmp_path / "submitted"
    client = JobSubmissionClient(ray_head.dashboard_url)
    for run in (1, 2):
        submission_id, res = submit_job(ray_head, REPO_ROOT, "jobs/mine_prefs.py", mine_args(root, out_dir), tmp_path)
        log = f"stdout:\n{res.stdout[-6000:]}\nstderr:\n{res.stderr[-3000:]}"
        assert res.returncode == 0 and client.get_job_status(submission_id) == JobStatus.SUCCEEDED, log
        summary = json.loads((out_dir / "summary.json").read_text())
        assert summary["this_run"]["samples"] == (MINING_LIMIT if run == 1 else 0), summary["this_run"]
    assert_same_pairs(out_dir, root / "prefs")
