"""The preference-mining output store: an exactly-once ledger of batches, and the consolidated outputs.

Layout of ``out_dir``::

    ledger/<h>.pairs.parquet    pairs of one batch   (h = digest of the batch's sample ids)
    ledger/<h>.done.parquet     one row per sample of the batch: mined (with its outcome) or rejected
    pairs/part-00000.parquet    all pairs (PreferencePair rows), sharded, in sample-id order
    alignment/<domain>/mined_<domain>.json   the same pairs in MMed-RAG's LLaVA-style alignment format, images
                                in images/ (one file name per domain: the alignment reader's pair ids are
                                ``mmed_rag/<file stem>/<index>``, so a shared stem would collide)
    rejects.jsonl               samples that could not be mined, with the field and the reason
    summary.json                counts per pair type and domain, CR / OR rates, accuracies per pass

Exactly once: a batch's files are written to a temporary name and renamed, pairs first and the ``done`` file
last, so a sample counts as finished only when its pairs are durable. A batch retried after a crash has the
same sample ids, hence the same file names, and overwrites its own partial output; a re-run skips every
sample listed in a ``done`` file. Consolidation reads only batches whose ``done`` file exists and refuses a
sample that two batches claim.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from medrag_ray.data.schema import PAIR_SCHEMA, PreferencePair, from_rows, to_table
from medrag_ray.eval.alignment import alignment_report
from medrag_ray.mining.miner import BatchResult, outcomes_of

logger = logging.getLogger(__name__)

LEDGER_DIR, PAIRS_DIR, ALIGNMENT_DIR, IMAGES_DIR = "ledger", "pairs", "alignment", "images"
SUMMARY_FILE, REJECTS_FILE = "summary.json", "rejects.jsonl"
DONE_SCHEMA = pa.schema([("sample_id", pa.string()), ("status", pa.string()), ("detail", pa.string())])


def batch_key(sample_ids: Iterable[str]) -> str:
    """The ledger name of a batch: a digest of its sorted sample ids (the same batch -> the same files)."""
    digest = hashlib.sha256("\n".join(sorted(sample_ids)).encode("utf-8")).hexdigest()
    return digest[:24]


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


class MiningStore:
    """Read and write one mining output directory (see the module docstring)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        self.ledger = self.root / LEDGER_DIR

    def write_batch(self, sample_ids: Sequence[str], result: BatchResult) -> str:
        """Record one finished batch (pairs, then the done rows); returns its ledger key."""
        self.ledger.mkdir(parents=True, exist_ok=True)
        key = batch_key(sample_ids)
        rows = [
            {"sample_id": o["sample_id"], "status": "mined", "detail": json.dumps(o, sort_keys=True)}
            for o in result.outcomes
        ]
        rows += [
            {"sample_id": r.sample_id, "status": "rejected", "detail": json.dumps(asdict(r))} for r in result.rejects
        ]
        accounted = {r["sample_id"] for r in rows}
        missing = [i for i in sample_ids if i not in accounted]
        if missing:
            raise RuntimeError(f"batch {key}: samples {missing[:3]} were neither mined nor rejected")
        self._write_pairs(key, result.pairs)
        self._write_done(key, rows)
        return key

    def _write_pairs(self, key: str, pairs: Sequence[PreferencePair]) -> None:
        _atomic_parquet(to_table(pairs, PreferencePair), self.ledger / f"{key}.pairs.parquet")

    def _write_done(self, key: str, rows: Sequence[dict[str, Any]]) -> None:
        _atomic_parquet(pa.Table.from_pylist(list(rows), schema=DONE_SCHEMA), self.ledger / f"{key}.done.parquet")

    def done_files(self) -> list[Path]:
        return sorted(self.ledger.glob("*.done.parquet")) if self.ledger.is_dir() else []

    def done_rows(self) -> list[dict[str, Any]]:
        """Every finished sample's row; a sample claimed by two batches is an error (the ledger was mixed)."""
        rows: list[dict[str, Any]] = []
        owner: dict[str, str] = {}
        for path in self.done_files():
            for row in pq.read_table(path, schema=DONE_SCHEMA).to_pylist():
                if row["sample_id"] in owner:
                    raise RuntimeError(
                        f"sample {row['sample_id']!r} is recorded by two batches "
                        f"({owner[row['sample_id']]}, {path.name}); "
                        f"{self.ledger} mixes two runs over different inputs: delete {self.root} and mine again"
                    )
                owner[row["sample_id"]] = path.name
                rows.append(row)
        return rows

    def done_ids(self) -> set[str]:
        return {row["sample_id"] for row in self.done_rows()}

    def pairs(self) -> list[PreferencePair]:
        """The pairs of every finished batch, in pair-id order."""
        out: list[PreferencePair] = []
        for done in self.done_files():
            path = done.with_name(done.name.replace(".done.", ".pairs."))
            if not path.is_file():
                raise RuntimeError(
                    f"{done} has no {path.name}; the ledger was edited by hand: delete {done} and re-run"
                )
            out.extend(from_rows(pq.read_table(path, schema=PAIR_SCHEMA).to_pylist(), PreferencePair))
        return sorted(out, key=lambda p: p.id)

    # ------------------------------------------------------------------------------ consolidation
    def consolidate(self, shard_size: int = 5000, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write pairs/, alignment/, rejects.jsonl and summary.json from the ledger; returns the summary."""
        rows = self.done_rows()
        pairs = self.pairs()
        for name in (PAIRS_DIR, ALIGNMENT_DIR, IMAGES_DIR):
            shutil.rmtree(self.root / name, ignore_errors=True)
        (self.root / PAIRS_DIR).mkdir(parents=True)
        for n, start in enumerate(range(0, max(len(pairs), 1), shard_size)):
            pq.write_table(
                to_table(pairs[start : start + shard_size], PreferencePair),
                self.root / PAIRS_DIR / f"part-{n:05d}.parquet",
            )
        write_alignment_json(pairs, self.root)
        rejects = [json.loads(r["detail"]) for r in rows if r["status"] == "rejected"]
        with open(self.root / REJECTS_FILE, "w", encoding="utf-8") as f:
            for r in sorted(rejects, key=lambda r: r["sample_id"]):
                f.write(json.dumps(r) + "\n")
        outcomes = [json.loads(r["detail"]) for r in rows if r["status"] == "mined"]
        summary = summarize(outcomes, pairs, len(rejects))
        if config is not None:
            summary["config"] = config
        (self.root / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return summary


def summarize(outcomes: Sequence[dict[str, Any]], pairs: Sequence[PreferencePair], n_rejected: int) -> dict[str, Any]:
    """Counts per pair type and domain, CR/OR rates (overall and per domain) and per-pass accuracy."""
    by_type = Counter(p.pair_type for p in pairs)
    by_domain: dict[str, dict[str, int]] = {}
    for p in pairs:
        by_domain.setdefault(p.domain, {}).setdefault(p.pair_type, 0)
        by_domain[p.domain][p.pair_type] += 1
    domains = sorted({o["domain"] for o in outcomes})
    passes = [k for k in ("rag", "no_rag", "noisy_rag", "noisy_no_rag") if outcomes and k in outcomes[0]]
    return {
        "samples_mined": len(outcomes),
        "samples_rejected": n_rejected,
        "pairs": len(pairs),
        "pairs_by_type": dict(sorted(by_type.items())),
        "pairs_by_domain": {d: dict(sorted(c.items())) for d, c in sorted(by_domain.items())},
        "alignment": _clean(alignment_report(outcomes_of(outcomes))),
        "alignment_by_domain": {
            d: _clean(alignment_report(outcomes_of([o for o in outcomes if o["domain"] == d]))) for d in domains
        },
        "accuracy_by_pass": {k: sum(o[k] == o["answer"] for o in outcomes) / max(1, len(outcomes)) for k in passes},
        "routing_accuracy": sum(o["routed_domain"] == o["domain"] for o in outcomes) / max(1, len(outcomes)),
    }


def _clean(report: dict[str, Any]) -> dict[str, Any]:
    """NaN rates (empty denominators) as None, so summary.json stays valid JSON."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in report.items()}


def _image_suffix(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return "." + (im.format or "png").lower().replace("jpeg", "jpg")


def write_alignment_json(pairs: Sequence[PreferencePair], root: Path) -> list[Path]:
    """MMed-RAG's ``training/alignment/<domain>/*.json`` format: LLaVA ``conversations`` (chosen) and
    ``rejected_conversations`` sharing the human turn, ``chosen_noised`` / ``rejected_noised`` flags, ``image``
    relative to ``images/``; ``noised_image`` names the x_v* file we mined with (an extra key)."""
    images = root / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    per_domain: dict[str, list[dict[str, Any]]] = {}
    for p in pairs:
        stem = p.id.replace("/", "__")
        record: dict[str, Any] = {"id": p.id}
        if p.image_bytes is not None:
            name = stem + _image_suffix(p.image_bytes)
            (images / name).write_bytes(p.image_bytes)
            record["image"] = name
        else:
            record["image"] = p.image_path
        human = {"from": "human", "value": "<image>\n" + p.prompt}
        record["conversations"] = [human, {"from": "gpt", "value": p.chosen}]
        record["rejected_conversations"] = [human, {"from": "gpt", "value": p.rejected}]
        record["chosen_noised"], record["rejected_noised"] = p.chosen_noised, p.rejected_noised
        if p.noised_image_bytes is not None:
            name = stem + ".noised.png"
            (images / name).write_bytes(p.noised_image_bytes)
            record["noised_image"] = name
        record["pair_type"] = p.pair_type
        per_domain.setdefault(p.domain, []).append(record)
    out = []
    for domain, records in sorted(per_domain.items()):
        path = root / ALIGNMENT_DIR / domain / f"mined_{domain}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        out.append(path)
    return out
