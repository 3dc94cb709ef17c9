"""The tiny reader's reading curriculum: the stand-in for a pretrained VLM that can read the reports in its prompt.

A real reader (LLaVA-Med, Qwen2-VL) arrives able to read: given "No pulmonary nodule." in its prompt it can
answer "Is there a pulmonary nodule?", and a page of text before the question does not make it forget how to look
at the image. The tiny default reader learns its questions from images alone in ``pretrain_reader`` (prompts of
~120 tokens), and measured on the synthetic test split that reader (issue 16's closing notes):

* answers visible findings 0.97 without reports but 0.57 with three random reports and 0.61 with three reports'
  worth of neutral filler text: a longer prompt alone breaks its image reading (raising RoPE's theta to 1e6 did not
  help: it is not a rotation effect);
* answers subtle findings at chance even when the three reports are of the query's phenotype.

So ``jobs/configs/train_reader_reading.yaml`` (``context_source=phenotype``) continues the pretraining on the same
separate synthetic set with reports in the prompt, built here from that set's ground truth (the manifest's
phenotypes), never from a retriever:

* a **subtle-finding** question gets ``k`` reports of *other* cases of its phenotype (the majority of them states
  the case's finding ~90% of the time, as ``subtle_consistency`` sets): only reading answers it;
* a **visible-finding** question gets ``k`` random reports of its domain with probability ``visible_fraction``
  (else none): they say nothing about this case, so the reader must keep looking at the image.

The pretraining set has other phenotypes than the evaluation data (another seed), so what transfers is the skill
of reading, not the answers; RAG-SFT then adapts the reader to the real retriever's reports. What it buys in
the pipeline (3 epochs, ~8 more minutes on 2 cores, so opt-in): README, "Reader and preference mining".
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence

from medrag_ray.data.schema import CorpusDoc, Sample
from medrag_ray.eval.diagnostics import CaseTruth, finding_kinds, oracle_contexts
from medrag_ray.reader.context import SampleContext, self_doc_ids


def reading_contexts(
    samples: Sequence[Sample],
    corpus: Sequence[CorpusDoc],
    truths: Mapping[str, CaseTruth],
    k: int,
    visible_fraction: float,
    seed: int = 0,
) -> list[SampleContext]:
    """Per sample, the curriculum's reports (module docstring): a subtle-finding question (or a report sample)
    gets ``k`` reports of other cases of its phenotype; any other sample ``k`` random reports of its domain with
    probability ``visible_fraction`` (seeded per sample id), else an empty context (asked without reports); never
    the sample's own case."""
    if k < 1:
        raise ValueError(f"k must be >= 1 reports per prompt, got {k}")
    if not 0.0 <= visible_fraction <= 1.0:
        raise ValueError(f"visible_fraction must be in [0, 1], got {visible_fraction}")
    by_domain: dict[str, list[CorpusDoc]] = defaultdict(list)
    for doc in corpus:
        by_domain[doc.domain].append(doc)
    kinds = finding_kinds(samples)
    reads = [kind == "subtle" or s.answer_type == "report" for s, kind in zip(samples, kinds, strict=True)]
    oracle = iter(oracle_contexts([s for s, r in zip(samples, reads, strict=True) if r], corpus, truths, k, seed))
    out = []
    for sample, read in zip(samples, reads, strict=True):
        if read:
            out.append(next(oracle))
            continue
        rng = random.Random(f"{seed}:reading:{sample.id}")
        own = self_doc_ids(sample)
        pool = [d for d in by_domain.get(sample.domain, ()) if d.id not in own]
        if rng.random() >= visible_fraction or not pool:
            out.append(SampleContext(sample.domain, None))
            continue
        docs = rng.sample(pool, min(k, len(pool)))
        out.append(
            SampleContext(
                sample.domain, None, tuple(d.id for d in docs), tuple(d.text for d in docs),
                tuple(1.0 for _ in docs), tuple(d.image_bytes for d in docs),
            )
        )
    return out
