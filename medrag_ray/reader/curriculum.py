"""The tiny reader's pretraining conversations: the stand-in for a pretrained VLM that looks at its image *and*
reads the reports in its prompt.

A real reader (LLaVA-Med, Qwen2-VL) arrives able to do both: given "No pulmonary nodule." in its prompt it can
answer "Is there a pulmonary nodule?", and a page of text before the question does not make it forget how to look
at the image. The tiny default reader starts with a trained vision tower (``pretrain_vision``) and a random
language model, and learns both here, on its separate synthetic set (another seed, so other phenotypes: what
transfers is the skill, not the answers), from the set's ground truth, never from a retriever.

One training example per case and draw is a **conversation** (LLaVA's multi-turn visual instruction data): the
case's image, with probability ``rag_fraction`` ``k`` reference reports, then every finding of the case asked as
one turn, in a random order (the first turn is the MMed-RAG prompt with the reports, the later ones the closed
prompt without them, :func:`~medrag_ray.reader.prompts.closed_prompt`):

* a **visible** finding is answered with the case's truth: the reports (other cases) say nothing about this image,
  so the reader must keep looking at the image whatever they state;
* a **subtle** finding (nearly invisible in the pixels) is asked only when there are reports, and answered with
  **what most of the reports state** -- reading comprehension. Half of the draws take the reports from other cases
  of the query's phenotype (they mostly agree, as retrieval at its best), half from random cases of its domain
  (they often split 2-1, so the reader must read all of them).

Why conversations: one example supervises every finding of a case for one prompt's worth of compute, and the
visible and subtle questions about the *same* reports make the reader tell apart findings it must read from the
image from findings it must read from the reports. Measured against one question per example with the same
mix, budget and model (issue 16's closing notes): the one-question reader still copied the reports for visible
findings after 1,000 steps of 32 (0.60 with three random reports), the conversation reader did not (0.94).
Each later turn carries the closed prompt's full wording, as evaluation asks it: with the bare question instead
(~40% less compute per step) the pipeline's base reader answered 0.70-0.76 of its validation questions with
retrieved reports instead of 0.91.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence

from medrag_ray.data.schema import CorpusDoc, Sample
from medrag_ray.eval.diagnostics import CaseTruth, case_id, report_majority
from medrag_ray.reader.context import self_doc_ids
from medrag_ray.reader.prompts import closed_prompt
from medrag_ray.reader.sft import SFTExample

PHENOTYPE_SHARE = 0.5
"""Share of the draws with reports whose reports are other cases of the query's phenotype (the rest: random
cases of its domain)."""


def reading_conversations(
    samples: Sequence[Sample],
    corpus: Sequence[CorpusDoc],
    truths: Mapping[str, CaseTruth],
    k: int,
    rag_fraction: float,
    draws: int = 1,
    seed: int = 0,
) -> list[SFTExample]:
    """``draws`` conversations per case of the closed ``samples`` (module docstring): the case's image, ``k``
    reports of other cases with probability ``rag_fraction`` (seeded per case and draw), every finding asked as a
    turn -- visible ones with the truth, subtle ones (only with reports) with the reports' majority."""
    if k < 1:
        raise ValueError(f"k must be >= 1 reports per prompt, got {k}")
    if not 0.0 <= rag_fraction <= 1.0:
        raise ValueError(f"rag_fraction must be in [0, 1], got {rag_fraction}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1 conversations per case, got {draws}")
    by_domain: dict[str, list[CorpusDoc]] = defaultdict(list)
    by_phenotype: dict[tuple[str, int], list[CorpusDoc]] = defaultdict(list)
    for doc in corpus:
        by_domain[doc.domain].append(doc)
        if doc.id in truths:
            by_phenotype[(doc.domain, truths[doc.id].phenotype)].append(doc)
    cases: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.answer_type == "closed":
            cases[case_id(s)].append(s)
    out = []
    for case, questions in cases.items():
        if case not in truths:
            raise ValueError(f"case {case!r} is not in the manifest; pass the dataset's own manifest")
        for draw in range(draws):
            rng = random.Random(f"{seed}:conversation:{case}:{draw}")
            docs = _reports(rng, questions[0], truths[case], by_domain, by_phenotype, k, rag_fraction)
            example = _conversation(rng, questions, docs, f"{case}-d{draw}")
            if example is not None:
                out.append(example)
    return out


def _reports(
    rng: random.Random,
    sample: Sample,
    truth: CaseTruth,
    by_domain: Mapping[str, list[CorpusDoc]],
    by_phenotype: Mapping[tuple[str, int], list[CorpusDoc]],
    k: int,
    rag_fraction: float,
) -> list[CorpusDoc]:
    if rng.random() >= rag_fraction:
        return []
    group = by_phenotype if rng.random() < PHENOTYPE_SHARE else by_domain
    key = (sample.domain, truth.phenotype) if group is by_phenotype else sample.domain
    own = self_doc_ids(sample) | {case_id(sample)}
    pool = [d for d in group.get(key, ()) if d.id not in own]  # type: ignore[call-overload]
    return rng.sample(pool, min(k, len(pool)))


def _conversation(
    rng: random.Random, questions: Sequence[Sample], docs: Sequence[CorpusDoc], example_id: str
) -> SFTExample | None:
    texts = tuple(d.text for d in docs)
    turns = []
    for s in rng.sample(list(questions), len(questions)):
        meta = json.loads(s.meta)
        if meta.get("finding_kind") != "subtle":
            turns.append((s.question, s.answer))
            continue
        stated = report_majority(texts, s.domain, meta["finding"]) if texts else None
        if stated is not None:
            turns.append((s.question, "yes" if stated else "no"))
    if not turns:
        return None
    first = questions[0]
    if first.image_bytes is None:
        raise ValueError(f"sample {first.id} has no inline image_bytes; pretraining conversations need inline images")
    return SFTExample(
        id=example_id,
        domain=first.domain,
        answer_type="closed",
        question=turns[0][0],
        answer=turns[0][1],
        image_bytes=first.image_bytes,
        use_rag=bool(texts),
        context_domain=first.domain,
        context_texts=texts,
        context_ids=tuple(d.id for d in docs),
        follow_ups=tuple((closed_prompt(q), a) for q, a in turns[1:]),
    )
