"""The mining store: exactly-once ledger, consolidation, summary numbers and the alignment JSON round trip."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medrag_ray.data.readers import iter_mmed_rag_alignment
from medrag_ray.data.schema import PAIR_SCHEMA, PreferencePair, dumps_meta, from_rows
from medrag_ray.eval.alignment import alignment_report
from medrag_ray.mining.miner import BatchResult, Reject
from medrag_ray.mining.rules import ReaderOutcomes
from medrag_ray.mining.store import LEDGER_DIR, MiningStore, batch_key


def image_bytes(value: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(value)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


# sample -> (domain, y, rag, no_rag, noisy_rag, routed_domain)
OUTCOMES = {
    "A": ("radiology", "yes", "yes", "no", "yes", "radiology"),
    "B": ("radiology", "no", "yes", "no", "yes", "pathology"),
    "C": ("pathology", "yes", "yes", "yes", "yes", "pathology"),
    "D": ("pathology", "no", "no", "yes", "yes", "pathology"),
}


def outcome(sample_id: str) -> dict[str, object]:
    domain, y, rag, no_rag, noisy_rag, routed = OUTCOMES[sample_id]
    return {"sample_id": sample_id, "domain": domain, "source": "src", "answer": y, "routed_domain": routed,
            "rag": rag, "no_rag": no_rag, "noisy_rag": noisy_rag}


def pair(sample_id: str, pair_type: str, chosen: str, rejected: str, *, noised: bool = False,
         fmt: str = "PNG") -> PreferencePair:
    domain = OUTCOMES[sample_id][0]
    return PreferencePair(
        id=f"{sample_id}/{pair_type}", domain=domain, source="src", pair_type=pair_type,
        prompt=f"You are provided with ... Question: is {sample_id} {pair_type}?", chosen=chosen, rejected=rejected,
        image_bytes=image_bytes(ord(sample_id), fmt), image_available=True, rejected_noised=int(noised),
        meta=dumps_meta({"sample_id": sample_id}), noised_image_bytes=image_bytes(999) if noised else None,
    )


def batch_one() -> tuple[list[str], BatchResult]:
    result = BatchResult(
        pairs=[
            pair("A", "cm", "yes", "yes", noised=True),
            pair("A", "oa1", "yes", "no"),
            pair("B", "oa2", "no", "yes"),
        ],
        outcomes=[outcome("A"), outcome("B")],
        rejects=[Reject("E", "answer", "field 'answer': 'maybe' is not a yes/no answer")],
    )
    return ["A", "B", "E"], result


def batch_two() -> tuple[list[str], BatchResult]:
    result = BatchResult(
        pairs=[pair("C", "cm", "yes", "yes", noised=True), pair("D", "oa1", "no", "yes", fmt="JPEG")],
        outcomes=[outcome("C"), outcome("D")],
    )
    return ["C", "D"], result


def test_batch_key_is_order_free() -> None:
    assert batch_key(["b", "a"]) == batch_key(["a", "b"]) != batch_key(["a", "c"])
    assert len(batch_key(["a"])) == 24


def test_write_batch_then_done_ids(tmp_path: Path) -> None:
    store = MiningStore(tmp_path)
    assert store.done_ids() == set() and store.pairs() == []
    ids, result = batch_one()
    key = store.write_batch(ids, result)
    assert key == batch_key(ids)
    assert (tmp_path / LEDGER_DIR / f"{key}.pairs.parquet").is_file()
    assert (tmp_path / LEDGER_DIR / f"{key}.done.parquet").is_file()
    assert not list((tmp_path / LEDGER_DIR).glob("*.tmp"))
    assert store.done_ids() == {"A", "B", "E"}
    rows = {r["sample_id"]: r for r in store.done_rows()}
    assert rows["E"]["status"] == "rejected" and json.loads(rows["E"]["detail"])["field"] == "answer"
    assert rows["A"]["status"] == "mined" and json.loads(rows["A"]["detail"]) == outcome("A")
    assert store.pairs() == sorted(result.pairs, key=lambda p: p.id)


def test_same_batch_twice_is_stored_once(tmp_path: Path) -> None:
    store = MiningStore(tmp_path)
    ids, result = batch_one()
    store.write_batch(ids, result)
    store.write_batch(list(reversed(ids)), result)  # a retried batch: same ids, same files
    assert len(store.done_files()) == 1
    assert [p.id for p in store.pairs()] == ["A/cm", "A/oa1", "B/oa2"]
    assert len(store.done_rows()) == 3


def test_pairs_without_done_file_are_not_counted_and_overwritten(tmp_path: Path) -> None:
    store = MiningStore(tmp_path)
    ids, result = batch_one()
    key = store.write_batch(ids, result)
    (tmp_path / LEDGER_DIR / f"{key}.done.parquet").unlink()  # crashed between the two writes
    assert store.done_ids() == set() and store.pairs() == []
    retry = BatchResult(pairs=[pair("B", "oa2", "no", "yes")], outcomes=[outcome("A"), outcome("B")],
                        rejects=result.rejects)
    store.write_batch(ids, retry)
    assert store.done_ids() == {"A", "B", "E"}
    assert [p.id for p in store.pairs()] == ["B/oa2"]
    on_disk = pq.read_table(tmp_path / LEDGER_DIR / f"{key}.pairs.parquet", schema=PAIR_SCHEMA).to_pylist()
    assert [p.id for p in from_rows(on_disk, PreferencePair)] == ["B/oa2"]


def test_write_batch_refuses_unaccounted_samples(tmp_path: Path) -> None:
    store = MiningStore(tmp_path)
    _, result = batch_one()
    with pytest.raises(RuntimeError, match=r"samples \['Z'\] were neither mined nor rejected"):
        store.write_batch(["A", "B", "E", "Z"], result)
    assert store.done_files() == [] and store.done_ids() == set()


def test_two_batches_claiming_one_sample(tmp_path: Path) -> None:
    store = MiningStore(tmp_path)
    store.write_batch(["A", "B"], BatchResult(outcomes=[outcome("A"), outcome("B")]))
    store.write_batch(["A", "C"], BatchResult(outcomes=[outcome("A"), outcome("C")]))
    with pytest.raises(RuntimeError, match="sample 'A' is recorded by two batches"):
        store.done_rows()


def test_done_file_without_pairs_file_is_an_error(tmp_path: Path) -> None:
    store = MiningStore(tmp_path)
    ids, result = batch_one()
    key = store.write_batch(ids, result)
    (tmp_path / LEDGER_DIR / f"{key}.pairs.parquet").unlink()
    with pytest.raises(RuntimeError, match="edited by hand"):
        store.pairs()


@pytest.fixture
def consolidated(tmp_path: Path) -> tuple[MiningStore, dict[str, object]]:
    store = MiningStore(tmp_path)
    for ids, result in (batch_one(), batch_two()):
        store.write_batch(ids, result)
    summary = store.consolidate(shard_size=2, config={"seed": 5})
    return store, summary


def test_consolidate_shards_and_rejects(consolidated) -> None:
    store, _ = consolidated
    parts = sorted((store.root / "pairs").glob("*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    rows = [list(from_rows(pq.read_table(p, schema=PAIR_SCHEMA).to_pylist(), PreferencePair)) for p in parts]
    assert [len(r) for r in rows] == [2, 2, 1]
    assert [p for part in rows for p in part] == store.pairs()
    assert [p.id for p in store.pairs()] == ["A/cm", "A/oa1", "B/oa2", "C/cm", "D/oa1"]
    lines = (store.root / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"sample_id": "E", "field": "answer", "reason": "field 'answer': 'maybe' is not a yes/no answer"}
    ]
    # A second consolidation replaces the outputs (no stale shards).
    store.consolidate(shard_size=10)
    assert [p.name for p in (store.root / "pairs").glob("*.parquet")] == ["part-00000.parquet"]


def test_summary_numbers(consolidated) -> None:
    store, summary = consolidated
    assert json.loads((store.root / "summary.json").read_text(encoding="utf-8")) == summary
    assert summary["config"] == {"seed": 5}
    assert summary["samples_mined"] == 4 and summary["samples_rejected"] == 1 and summary["pairs"] == 5
    assert summary["pairs_by_type"] == {"cm": 2, "oa1": 2, "oa2": 1}
    assert summary["pairs_by_domain"] == {"pathology": {"cm": 1, "oa1": 1}, "radiology": {"cm": 1, "oa1": 1, "oa2": 1}}
    # By hand: rag == y for A, C, D; of those noisy_rag == y for A, C -> CR 2/3. rag != y for B only, and
    # B's no_rag is right -> OR 1/1. Accuracies: rag 3/4, no_rag 2/4 (B, C), noisy_rag 2/4 (A, C).
    overall = summary["alignment"]
    assert (overall["cr_numerator"], overall["cr_denominator"]) == (2, 3)
    assert (overall["or_numerator"], overall["or_denominator"]) == (1, 1)
    assert overall["cr_rate"] == pytest.approx(2 / 3) and overall["or_rate"] == 1.0
    assert overall["accuracy_rag"] == 0.75 and overall["accuracy_no_rag"] == 0.5 and overall["n"] == 4
    assert summary["accuracy_by_pass"] == {"rag": 0.75, "no_rag": 0.5, "noisy_rag": 0.5}
    assert summary["routing_accuracy"] == 0.75
    # Equal to alignment_report on the same outcomes (NaN rates become None, so the JSON stays valid).
    outcomes = {k: ReaderOutcomes(y, rag, no_rag, noisy) for k, (_, y, rag, no_rag, noisy, _) in OUTCOMES.items()}
    assert overall == alignment_report(list(outcomes.values()))
    rad = alignment_report([outcomes["A"], outcomes["B"]])
    assert summary["alignment_by_domain"]["radiology"] == rad
    path = alignment_report([outcomes["C"], outcomes["D"]])
    assert np.isnan(path["or_rate"])
    assert summary["alignment_by_domain"]["pathology"] == {**path, "or_rate": None}
    assert summary["alignment_by_domain"]["pathology"]["cr_rate"] == 0.5


def test_alignment_json_round_trip(consolidated) -> None:
    store, _ = consolidated
    out = store.root
    assert sorted(p.relative_to(out / "alignment").as_posix() for p in (out / "alignment").rglob("*.json")) == [
        "pathology/mined_pathology.json", "radiology/mined_radiology.json"
    ]
    records = json.loads((out / "alignment" / "pathology" / "mined_pathology.json").read_text(encoding="utf-8"))
    assert [r["image"] for r in records] == ["C__cm.png", "D__oa1.jpg"]
    assert records[0]["noised_image"] == "C__cm.noised.png" and "noised_image" not in records[1]
    assert (out / "images" / "C__cm.noised.png").read_bytes() == image_bytes(999)

    read = list(iter_mmed_rag_alignment(out / "alignment", image_root=out / "images"))
    mined = {p.id: p for p in store.pairs()}
    assert len(read) == len(mined) == 5
    for back in read:
        meta = json.loads(back.meta)
        original = mined[meta["source_id"]]
        assert back.prompt == original.prompt
        assert (back.chosen, back.rejected) == (original.chosen, original.rejected)
        assert (back.chosen_noised, back.rejected_noised) == (original.chosen_noised, original.rejected_noised)
        assert back.domain == original.domain
        assert meta["pair_type"] == original.pair_type
        assert Path(back.image_path).read_bytes() == original.image_bytes


def test_consolidate_empty_store(tmp_path: Path) -> None:
    summary = MiningStore(tmp_path).consolidate()
    assert summary["pairs"] == 0 and summary["samples_mined"] == 0 and summary["accuracy_by_pass"] == {}
    assert summary["alignment"]["cr_rate"] is None and summary["alignment"]["n"] == 0
    assert [p.name for p in (tmp_path / "pairs").glob("*.parquet")] == ["part-00000.parquet"]
    assert (tmp_path / "rejects.jsonl").read_text(encoding="utf-8") == ""
