"""The tiny reader's reading curriculum: phenotype reports for subtle findings, random ones (or none) for visible."""

from __future__ import annotations

import json

import pytest

from medrag_ray.config import SyntheticDataConfig
from medrag_ray.data.synthetic import generate, manifest
from medrag_ray.eval.diagnostics import load_case_truths, report_majority
from medrag_ray.reader.curriculum import reading_contexts


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    ds = generate(SyntheticDataConfig(domains=("radiology", "pathology"), n_per_domain=60, n_phenotypes=3))
    path = tmp_path_factory.mktemp("curriculum") / "manifest.json"
    path.write_text(json.dumps(manifest(ds, {})))
    closed = [s for s in ds.samples["train"] if s.answer_type == "closed"]
    return closed, ds.corpus, load_case_truths(path)


def test_subtle_questions_read_their_phenotype_visible_ones_get_random_reports(dataset) -> None:
    samples, corpus, truths = dataset
    contexts = reading_contexts(samples, corpus, truths, k=3, visible_fraction=0.5, seed=0)
    docs = {d.id: d for d in corpus}
    subtle_right, visible_with, visible = 0, 0, 0
    for s, c in zip(samples, contexts, strict=True):
        meta = json.loads(s.meta)
        case = truths[meta["case_id"]]
        assert meta["case_id"] not in c.doc_ids and all(docs[d].domain == s.domain for d in c.doc_ids)
        assert c.texts == tuple(docs[d].text for d in c.doc_ids)
        if meta["finding_kind"] == "subtle":
            assert len(c.texts) == 3 and all(truths[d].phenotype == case.phenotype for d in c.doc_ids)
            subtle_right += report_majority(c.texts, s.domain, meta["finding"]) == case.findings[meta["finding"]]
        else:
            visible += 1
            visible_with += bool(c.texts)
            assert len(c.texts) in (0, 3)
    n_subtle = len(samples) - visible
    assert subtle_right / n_subtle > 0.8  # the phenotype's reports answer the subtle question (consistency 0.9)
    assert 0.4 < visible_with / visible < 0.6  # visible_fraction 0.5
    assert reading_contexts(samples, corpus, truths, k=3, visible_fraction=0.5, seed=0) == contexts  # seeded
    none = reading_contexts(samples, corpus, truths, k=3, visible_fraction=0.0, seed=0)
    visible = [c for s, c in zip(samples, none, strict=True) if json.loads(s.meta)["finding_kind"] == "visible"]
    assert visible and not any(c.texts for c in visible)


def test_bad_arguments_name_the_fix(dataset) -> None:
    samples, corpus, truths = dataset
    with pytest.raises(ValueError, match="k must be >= 1"):
        reading_contexts(samples, corpus, truths, k=0, visible_fraction=0.5)
    with pytest.raises(ValueError, match="visible_fraction"):
        reading_contexts(samples, corpus, truths, k=3, visible_fraction=1.5)
