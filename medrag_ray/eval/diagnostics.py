"""Diagnostics that tell which stage fails when retrieval does not help: the retriever, or the reader.

On data with per-case ground truth (the synthetic manifest: each case's phenotype and findings), three
measurements separate the stages:

* **Retrieval that matters for answers** (:func:`retrieval_quality`): per domain, the share of the kept
  documents whose case has the query's phenotype (*phenotype precision*: cases of one phenotype share the
  subtle findings, so this is what retrieval must get right), and the accuracy of answering each
  subtle-finding question by the **majority of the kept reports** (each report read with
  :func:`~medrag_ray.data.synthetic.parse_findings`; a tie or no report stating the finding counts as wrong).
  No reader is involved: this is what a perfect reader of the retrieved reports would get.
* **The reader with oracle context** (:func:`oracle_contexts`): the prompt holds ``k`` reports of other cases
  of the query's phenotype (never its own case) -- the ceiling of reading with perfect retrieval.
* **Every row by finding kind** (:func:`finding_kinds`): *visible* findings are drawn plainly in the image and
  independent per case; *subtle* ones are nearly invisible and shared by phenotype. Retrieval should lift
  the subtle rows and leave the visible ones alone.

Also here: the distribution of the number of documents adaptive-k keeps (:func:`kept_distribution`) and
MMed-RAG's Fig. 2 similarity-drop curve (:func:`similarity_curve`: mean ``S_i / S_1`` by rank).
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medrag_ray.data.schema import CorpusDoc, Sample
from medrag_ray.data.synthetic import parse_findings
from medrag_ray.reader.context import SampleContext
from medrag_ray.retrieval.retriever import RetrievalResult

OVERALL = "overall"


@dataclass(frozen=True)
class CaseTruth:
    """A case's ground truth from the synthetic manifest."""

    domain: str
    phenotype: int
    findings: Mapping[str, bool]


def load_case_truths(manifest_path: str | Path) -> dict[str, CaseTruth]:
    """``{case_id: CaseTruth}`` from a synthetic dataset's ``manifest.json`` (``cases``)."""
    manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    cases = manifest.get("cases")
    if not isinstance(cases, list):
        raise ValueError(f"{manifest_path} has no 'cases' list; diagnostics need a synthetic dataset's manifest.json")
    return {c["case_id"]: CaseTruth(c["domain"], int(c["phenotype"]), dict(c["findings"])) for c in cases}


def _meta(sample: Sample) -> dict[str, Any]:
    return json.loads(sample.meta) if sample.meta else {}


def finding_kinds(samples: Sequence[Sample]) -> tuple[str | None, ...]:
    """Each sample's ``meta.finding_kind`` (``visible`` / ``subtle``), None where the data has none (real data)."""
    return tuple(_meta(s).get("finding_kind") for s in samples)


def case_id(sample: Sample) -> str:
    """The sample's case: ``meta.case_id``, else its own id."""
    return str(_meta(sample).get("case_id", sample.id))


def _query_truth(sample: Sample, truths: Mapping[str, CaseTruth]) -> tuple[CaseTruth, str | None]:
    case = case_id(sample)
    if case not in truths:
        raise ValueError(f"sample {sample.id}: case {case!r} is not in the manifest; pass the dataset's own manifest")
    return truths[case], _meta(sample).get("finding")


def report_majority(texts: Sequence[str], domain: str, finding: str) -> bool | None:
    """The finding's value stated by most of ``texts`` (None on a tie or when no text states it)."""
    votes = [parse_findings(t, domain).get(finding) for t in texts]
    yes, no = sum(v is True for v in votes), sum(v is False for v in votes)
    return None if yes == no else yes > no


def retrieval_quality(
    samples: Sequence[Sample], results: Sequence[RetrievalResult], truths: Mapping[str, CaseTruth]
) -> dict[str, dict[str, float | int]]:
    """Per domain and overall: phenotype precision of the kept documents, the mean kept count, and the
    majority-of-reports accuracy on subtle-finding questions (see the module docstring)."""
    if len(samples) != len(results):
        raise ValueError(f"{len(samples)} samples but {len(results)} retrieval results")
    precision: dict[str, list[float]] = defaultdict(list)
    kept: dict[str, list[int]] = defaultdict(list)
    majority: dict[str, list[bool]] = defaultdict(list)
    for sample, result in zip(samples, results, strict=True):
        truth, finding = _query_truth(sample, truths)
        hits = result.kept_hits
        same = [truths[h.doc_id].phenotype == truth.phenotype for h in hits if h.doc_id in truths]
        for group in (sample.domain, OVERALL):
            kept[group].append(len(hits))
            if same:
                precision[group].append(float(np.mean(same)))
        kind = _meta(sample).get("finding_kind")
        if kind == "subtle" and finding is not None:
            answer = report_majority([h.text for h in hits], result.domain, finding)
            for group in (sample.domain, OVERALL):
                majority[group].append(answer is not None and answer == truth.findings[finding])
    out = {}
    for group in sorted(kept, key=lambda g: (g == OVERALL, g)):
        out[group] = {
            "n": len(kept[group]),
            "phenotype_precision": float(np.mean(precision[group])) if precision[group] else float("nan"),
            "mean_kept": float(np.mean(kept[group])),
            "n_subtle": len(majority[group]),
            "majority_accuracy_subtle": float(np.mean(majority[group])) if majority[group] else float("nan"),
        }
    return out


def oracle_contexts(
    samples: Sequence[Sample], corpus: Sequence[CorpusDoc], truths: Mapping[str, CaseTruth], k: int, seed: int = 0
) -> list[SampleContext]:
    """For each sample, ``k`` corpus reports of *other* cases of its domain and phenotype (a seeded choice per
    sample id, so every reader is asked with the same reports); fewer when the corpus has fewer."""
    by_phenotype: dict[tuple[str, int], list[CorpusDoc]] = defaultdict(list)
    for doc in corpus:
        if doc.id in truths:
            by_phenotype[(doc.domain, truths[doc.id].phenotype)].append(doc)
    out = []
    for sample in samples:
        truth, _ = _query_truth(sample, truths)
        pool = [d for d in by_phenotype[(sample.domain, truth.phenotype)] if d.id not in (case_id(sample), sample.id)]
        docs = random.Random(f"{seed}:{sample.id}").sample(pool, min(k, len(pool)))
        out.append(SampleContext(sample.domain, None, tuple(d.id for d in docs), tuple(d.text for d in docs),
                                 tuple(1.0 for _ in docs), tuple(d.image_bytes for d in docs)))
    return out


def kept_distribution(contexts: Sequence[SampleContext]) -> dict[int, int]:
    """``{number of kept documents: queries}``, ascending."""
    return dict(sorted(Counter(len(c.texts) for c in contexts).items()))


def similarity_curve(results: Sequence[RetrievalResult]) -> list[float]:
    """MMed-RAG Fig. 2: the mean over queries of ``S_i / S_1`` for rank i = 1..K (queries with K hits and S_1 > 0)."""
    rows = [[h.score for h in r.hits] for r in results if r.hits and r.hits[0].score > 0]
    if not rows:
        return []
    width = max(len(r) for r in rows)
    rows = [r for r in rows if len(r) == width]
    scores = np.asarray(rows, dtype=np.float64)
    return [float(x) for x in (scores / scores[:, :1]).mean(axis=0)]
