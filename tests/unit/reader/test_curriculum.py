"""The tiny reader's pretraining conversations: every finding of a case asked about one image and its reports."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from medrag_ray.config import SyntheticDataConfig
from medrag_ray.data.synthetic import generate, manifest, parse_findings
from medrag_ray.eval.diagnostics import case_id, load_case_truths
from medrag_ray.reader.curriculum import reading_conversations
from medrag_ray.reader.prompts import closed_prompt


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    ds = generate(SyntheticDataConfig(domains=("radiology", "pathology"), n_per_domain=60, n_phenotypes=3))
    path = tmp_path_factory.mktemp("curriculum") / "manifest.json"
    path.write_text(json.dumps(manifest(ds, {})))
    closed = [s for s in ds.samples["train"] if s.answer_type == "closed"]
    return closed, ds.corpus, load_case_truths(path)


def test_conversations_ask_visible_findings_of_the_image_and_subtle_ones_of_the_reports(dataset) -> None:
    samples, corpus, truths = dataset
    examples = reading_conversations(samples, corpus, truths, k=3, rag_fraction=0.75, draws=2, seed=0)
    docs = {d.id: d for d in corpus}
    by_case = {case_id(s): s for s in samples}
    questions = {(case_id(s), s.question): s for s in samples}
    asked = {closed_prompt(s.question): s.question for s in samples}
    assert len(examples) == 2 * len(by_case) and len({e.id for e in examples}) == len(examples)
    with_reports, phenotype_docs, subtle_turns = 0, Counter(), 0
    for e in examples:
        case = e.id.rsplit("-d", 1)[0]
        truth = truths[case]
        assert case not in e.context_ids and all(docs[d].domain == e.domain for d in e.context_ids)
        assert e.context_texts == tuple(docs[d].text for d in e.context_ids) and len(e.context_ids) in (0, 3)
        assert e.image_bytes == by_case[case].image_bytes and e.use_rag == bool(e.context_texts)
        with_reports += e.use_rag
        phenotype_docs[all(truths[d].phenotype == truth.phenotype for d in e.context_ids)] += e.use_rag
        assert all(prompt in asked for prompt, _ in e.follow_ups)  # later turns: the closed prompt's wording
        turns = [(e.question, e.answer), *((asked[prompt], a) for prompt, a in e.follow_ups)]
        kinds = Counter()
        for question, answer in turns:
            meta = json.loads(questions[(case, question)].meta)
            kinds[meta["finding_kind"]] += 1
            if meta["finding_kind"] == "visible":  # the image's truth, whatever the reports say
                assert answer == questions[(case, question)].answer
            else:  # what most reports state
                subtle_turns += 1
                stated = [parse_findings(t, e.domain)[meta["finding"]] for t in e.context_texts]
                assert answer == ("yes" if sum(stated) >= 2 else "no"), (stated, answer)
        n_findings = len({q for (c, q) in questions if c == case})
        assert kinds["visible"] + kinds["subtle"] == len(turns)
        assert len(turns) == (n_findings if e.use_rag else kinds["visible"])  # subtle only with reports
    assert 0.65 < with_reports / len(examples) < 0.85  # rag_fraction 0.75
    assert 0.35 < phenotype_docs[True] / with_reports < 0.7  # half the draws read the query's phenotype
    assert subtle_turns > 0
    assert reading_conversations(samples, corpus, truths, k=3, rag_fraction=0.75, draws=2, seed=0) == examples
    orders = {(e.question, *(p for p, _ in e.follow_ups)) for e in examples}
    assert len(orders) > len(by_case)  # each draw asks in its own order


def test_without_reports_subtle_findings_are_not_asked(dataset) -> None:
    samples, corpus, truths = dataset
    examples = reading_conversations(samples, corpus, truths, k=3, rag_fraction=0.0)
    asked = {closed_prompt(s.question): s.question for s in samples}
    kinds = {json.loads(s.meta)["finding_kind"] for s in samples for e in examples
             if s.question in {e.question, *(asked[p] for p, _ in e.follow_ups)}
             and case_id(s) == e.id.rsplit("-d", 1)[0]}
    assert kinds == {"visible"} and not any(e.context_texts for e in examples)


def test_bad_arguments_name_the_fix(dataset) -> None:
    samples, corpus, truths = dataset
    with pytest.raises(ValueError, match="k must be >= 1"):
        reading_conversations(samples, corpus, truths, k=0, rag_fraction=0.5)
    with pytest.raises(ValueError, match="rag_fraction"):
        reading_conversations(samples, corpus, truths, k=3, rag_fraction=1.5)
    with pytest.raises(ValueError, match="draws must be >= 1"):
        reading_conversations(samples, corpus, truths, k=3, rag_fraction=0.5, draws=0)
    with pytest.raises(ValueError, match="not in the manifest"):
        reading_conversations(samples, corpus, {}, k=3, rag_fraction=0.5)
