"""Preference mining of a batch (MMed-RAG Algorithm 1) with a scripted reader and a stub retriever."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import CorpusDoc, Sample
from medrag_ray.mining.miner import MiningSettings, PreferenceMiner, Reject, check_sample, outcomes_of
from medrag_ray.mining.noise import noisy_image, sample_seed
from medrag_ray.mining.rules import ReaderOutcomes
from medrag_ray.reader.engine import ClosedScores
from medrag_ray.reader.prompts import ReaderInput, closed_prompt, closed_rag_prompt
from medrag_ray.retrieval.retriever import Hit, RetrievalConfig, RetrievalResult

P_YES = {"yes": 0.9, "no": 0.2}
KEPT_TEXT = "Mild cardiomegaly."


def png(value: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


FAR_DOC = CorpusDoc(id="far-doc", domain="radiology", split="train", source="stub", text="far",
                    image_bytes=png(250), image_available=True)

# sample -> (ground truth, answers per pass (rag, no_rag, noisy_rag, noisy_no_rag))
SCRIPT = {
    "cm_oa1": ("yes", ("yes", "no", "yes", "no")),
    "oa2": ("no", ("yes", "no", "no", "no")),
    "cm_only": ("yes", ("yes", "yes", "yes", "yes")),  # algorithm: cm; text rule: noisy_no_rag == y -> none
    "nothing": ("no", ("no", "no", "yes", "yes")),
}


def question(name: str) -> str:
    return f"Is there finding {name}?"


def closed_sample(name: str, answer: str, value: int, **kw: object) -> Sample:
    fields: dict[str, object] = dict(
        id=name, domain="radiology", split="train", source="stub-src", question=question(name), answer=answer,
        answer_type="closed", image_bytes=png(value), image_available=True,
    )
    fields.update(kw)
    return Sample(**fields)  # type: ignore[arg-type]


def good_samples() -> list[Sample]:
    # Ground truths written as the released test files write them ("Yes.", "- No.").
    raw = {"yes": "Yes.", "no": "- No."}
    return [closed_sample(name, raw[y], 10 + 20 * i) for i, (name, (y, _)) in enumerate(SCRIPT.items())]


class StubRetriever:
    def __init__(self) -> None:
        self.retrieve_calls: list[dict[str, object]] = []
        self.least_calls: list[tuple[int, list[str]]] = []

    def retrieve(self, images, questions, domains=None, cfg=None, exclude_ids=None):  # noqa: ANN001, ANN201
        self.retrieve_calls.append(dict(n=len(images), questions=questions, domains=domains, cfg=cfg,
                                        exclude_ids=exclude_ids))
        hits = [Hit("doc-a", KEPT_TEXT, 0.9, True, 0), Hit("doc-b", "Not kept.", 0.4, False, 1)]
        return [RetrievalResult("radiology", 0.8, hits, k_kept=1) for _ in images]

    def least_similar_docs(self, images, domains):  # noqa: ANN001, ANN201
        self.least_calls.append((len(images), list(domains)))
        return [FAR_DOC for _ in images]


class ScriptedEngine:
    """Answers per (sample, pass), recognising the pass from the input: x_v or not, references or not."""

    def __init__(self, originals: dict[str, Image.Image]) -> None:
        self.originals = originals
        self.calls: list[list[str]] = []

    def pass_of(self, inp: ReaderInput) -> tuple[str, str]:
        [image] = inp.images
        prompt = next(p for p in inp.parts if isinstance(p, str))
        name = prompt.split("Is there finding ", 1)[1].split("?", 1)[0]
        real = np.array_equal(np.asarray(image), np.asarray(self.originals[name]))
        rag = "reference report(s)" in prompt
        return name, {(True, True): "rag", (True, False): "no_rag", (False, True): "noisy_rag",
                      (False, False): "noisy_no_rag"}[(real, rag)]

    def score_closed(self, inputs, choices=("yes", "no")):  # noqa: ANN001, ANN201
        assert tuple(choices) == ("yes", "no")
        passes = [self.pass_of(inp) for inp in inputs]
        self.calls.append([f"{n}:{p}" for n, p in passes])
        order = ("rag", "no_rag", "noisy_rag", "noisy_no_rag")
        answers = [SCRIPT[n][1][order.index(p)] for n, p in passes]
        return ClosedScores(("yes", "no"), np.array([[P_YES[a], 1.0 - P_YES[a]] for a in answers]))


def make_miner(samples: list[Sample], **settings: object) -> tuple[PreferenceMiner, StubRetriever, ScriptedEngine]:
    originals = {s.id: load_image(s.image_bytes) for s in samples if s.id in SCRIPT}
    retriever, engine = StubRetriever(), ScriptedEngine(originals)
    cfg = MiningSettings(retrieval=RetrievalConfig(k=2, adaptive="none"), noise_step=300, seed=5, **settings)
    return PreferenceMiner(retriever, engine, cfg), retriever, engine


def test_mine_batch_pairs_follow_the_rules() -> None:
    samples = good_samples()
    miner, retriever, engine = make_miner(samples)
    result = miner.mine_batch(samples)
    assert result.rejects == []
    assert [p.id for p in result.pairs] == ["cm_oa1/cm", "cm_oa1/oa1", "oa2/oa2", "cm_only/cm"]
    by_id = {p.id: p for p in result.pairs}

    # One shared scoring call over the three passes of all four samples, in pass order.
    [call] = engine.calls
    assert len(call) == 12
    assert call[:4] == [f"{n}:rag" for n in SCRIPT] and call[4:8] == [f"{n}:no_rag" for n in SCRIPT]
    assert call[8:] == [f"{n}:noisy_rag" for n in SCRIPT]

    expected = {  # id -> (chosen, rejected, chosen_noised, rejected_noised, chosen_pass, rejected_pass)
        "cm_oa1/cm": ("yes", "yes", 0, 1, "rag", "noisy_rag"),
        "cm_oa1/oa1": ("yes", "no", 0, 0, "rag", "no_rag"),
        "oa2/oa2": ("no", "yes", 0, 0, "no_rag", "rag"),
        "cm_only/cm": ("yes", "yes", 0, 1, "rag", "noisy_rag"),
    }
    for pair_id, (chosen, rejected, c_noised, r_noised, c_pass, r_pass) in expected.items():
        pair = by_id[pair_id]
        name = pair_id.split("/")[0]
        sample = next(s for s in samples if s.id == name)
        meta = json.loads(pair.meta)
        assert (pair.chosen, pair.rejected, pair.chosen_noised, pair.rejected_noised) == (
            chosen, rejected, c_noised, r_noised)
        assert (meta["chosen_pass"], meta["rejected_pass"]) == (c_pass, r_pass)
        assert pair.pair_type == pair_id.split("/")[1]
        assert pair.domain == "radiology" and pair.source == "stub-src"
        assert pair.image_bytes == sample.image_bytes and pair.image_available
        assert pair.prompt == closed_rag_prompt(question(name), [KEPT_TEXT], "radiology")
        assert meta["no_rag_prompt"] == closed_prompt(question(name))
        y, answers = SCRIPT[name]
        assert meta["sample_id"] == name
        assert meta["answers"] == dict(zip(("rag", "no_rag", "noisy_rag"), answers[:3], strict=True))
        assert meta["p_yes"] == {k: pytest.approx(P_YES[a]) for k, a in meta["answers"].items()}
        seed = sample_seed(5, name)
        assert meta["noise"] == {"source_doc": "far-doc", "step": 300, "kind": "diffusion", "seed": seed}
        assert meta["retrieved_ids"] == ["doc-a"] and meta["retrieved_scores"] == [0.9]
        assert meta["routed_domain"] == "radiology" and meta["domain_confidence"] == 0.8
        if pair.pair_type == "cm":
            # x_v*: the least similar document's image, diffused with the sample's own seed.
            expected_noise = noisy_image(load_image(FAR_DOC.image_bytes), 300, seed, "diffusion")
            assert pair.noised_image_bytes is not None
            assert np.array_equal(np.asarray(load_image(pair.noised_image_bytes)), np.asarray(expected_noise))
        else:
            assert pair.noised_image_bytes is None

    # Outcomes: one row per mined sample, normalised answers.
    assert [o["sample_id"] for o in result.outcomes] == list(SCRIPT)
    assert outcomes_of(result.outcomes) == [
        ReaderOutcomes(y, *answers[:3]) for y, answers in SCRIPT.values()
    ]
    first = result.outcomes[0]
    assert first["domain"] == "radiology" and first["routed_domain"] == "radiology" and first["answer"] == "yes"
    assert "noisy_no_rag" not in first

    # The retriever saw the questions, routing on, and each sample's own id excluded.
    [rcall] = retriever.retrieve_calls
    assert rcall["n"] == 4 and rcall["domains"] is None
    assert rcall["questions"] == [question(n) for n in SCRIPT]
    assert rcall["exclude_ids"] == [{n} for n in SCRIPT]
    assert retriever.least_calls == [(4, ["radiology"] * 4)]


def test_noise_is_deterministic_per_sample() -> None:
    samples = good_samples()
    first = make_miner(samples)[0].mine_batch(samples)
    # The same sample mined alone (another batch) gets the same x_v*.
    alone = make_miner(samples[:1])[0].mine_batch(samples[:1])
    a = next(p for p in first.pairs if p.id == "cm_oa1/cm")
    b = next(p for p in alone.pairs if p.id == "cm_oa1/cm")
    assert a.noised_image_bytes == b.noised_image_bytes
    other = next(p for p in first.pairs if p.id == "cm_only/cm")
    assert other.noised_image_bytes != a.noised_image_bytes  # seeds differ per sample


def test_bad_samples_are_rejected_and_the_batch_goes_on() -> None:
    report = Sample(id="report", domain="radiology", split="train", source="s", text="No effusion.",
                    answer_type="report", image_bytes=png(1))
    maybe = closed_sample("maybe", "maybe", 2)
    garbage = closed_sample("garbage", "yes", 3, image_bytes=b"not an image at all")
    no_image = closed_sample("noimage", "no", 4, image_bytes=None, image_available=False)
    samples = [report, *good_samples()[:2], maybe, garbage, no_image]
    miner, retriever, engine = make_miner(samples)
    result = miner.mine_batch(samples)
    assert [r.sample_id for r in result.rejects] == ["report", "maybe", "garbage", "noimage"]
    fields = {r.sample_id: r.field for r in result.rejects}
    assert fields == {"report": "answer_type", "maybe": "answer", "garbage": "image", "noimage": "image_bytes"}
    reasons = {r.sample_id: r.reason for r in result.rejects}
    assert "preference mining needs closed" in reasons["report"]
    assert "'maybe' is not a yes/no answer" in reasons["maybe"]
    assert "sample garbage" in reasons["garbage"]
    assert [p.id for p in result.pairs] == ["cm_oa1/cm", "cm_oa1/oa1", "oa2/oa2"]
    assert [o["sample_id"] for o in result.outcomes] == ["cm_oa1", "oa2"]
    assert retriever.retrieve_calls[0]["n"] == 2 and len(engine.calls[0]) == 6


class BrokenFarDocRetriever(StubRetriever):
    """The least similar document of sample ``oa2`` has an unreadable image."""

    def least_similar_docs(self, images, domains):  # noqa: ANN001, ANN201
        docs = super().least_similar_docs(images, domains)
        broken = CorpusDoc(id="broken-doc", domain="radiology", split="train", source="stub", text="far",
                           image_bytes=b"truncated", image_available=True)
        return [broken if i == 1 else d for i, d in enumerate(docs)]


def test_unreadable_noise_source_rejects_that_sample_only() -> None:
    samples = good_samples()
    miner, _, engine = make_miner(samples)
    miner.retriever = BrokenFarDocRetriever()
    result = miner.mine_batch(samples)
    [reject] = result.rejects
    assert (reject.sample_id, reject.field) == ("oa2", "noise.source_doc") and "broken-doc" in reject.reason
    assert [o["sample_id"] for o in result.outcomes] == ["cm_oa1", "cm_only", "nothing"]
    assert [p.id for p in result.pairs] == ["cm_oa1/cm", "cm_oa1/oa1", "cm_only/cm"]
    assert len(engine.calls[0]) == 9 and not any(c.startswith("oa2:") for c in engine.calls[0])


class UnknownForOa2Retriever(StubRetriever):
    """The router places sample ``oa2``'s image in no indexed domain."""

    def retrieve(self, images, questions, domains=None, cfg=None, exclude_ids=None):  # noqa: ANN001, ANN201
        results = super().retrieve(images, questions, domains, cfg, exclude_ids)
        results[1] = RetrievalResult("unknown", 0.4, [], k_kept=0)
        return results


def test_an_unknown_domain_route_rejects_that_sample_only() -> None:
    samples = good_samples()
    miner, _, engine = make_miner(samples)
    miner.retriever = UnknownForOa2Retriever()
    result = miner.mine_batch(samples)
    [reject] = result.rejects
    assert (reject.sample_id, reject.field) == ("oa2", "domain") and "routed 'unknown'" in reject.reason
    assert miner.retriever.least_calls == [(3, ["radiology"] * 3)]  # no noise source asked for the unknown one
    assert [o["sample_id"] for o in result.outcomes] == ["cm_oa1", "cm_only", "nothing"]
    assert not any(c.startswith("oa2:") for c in engine.calls[0])


def test_all_rejected_batch_calls_nothing() -> None:
    samples = [closed_sample("maybe", "maybe", 2)]
    miner, retriever, engine = make_miner(samples)
    result = miner.mine_batch(samples)
    assert result.pairs == [] and result.outcomes == []
    assert [(r.sample_id, r.field) for r in result.rejects] == [("maybe", "answer")]
    assert isinstance(result.rejects[0], Reject)
    assert retriever.retrieve_calls == [] and engine.calls == []


def test_text_dcm_rule_adds_the_fourth_pass() -> None:
    samples = good_samples()
    miner, retriever, engine = make_miner(samples, dcm_rule="text", route=False)
    result = miner.mine_batch(samples)
    [call] = engine.calls
    assert len(call) == 16 and call[12:] == [f"{n}:noisy_no_rag" for n in SCRIPT]
    # cm_only: noisy_no_rag == y, so the text rule gives no cm pair; cm_oa1 keeps it (noisy_no_rag != y).
    assert [p.id for p in result.pairs] == ["cm_oa1/cm", "cm_oa1/oa1", "oa2/oa2"]
    meta = json.loads(result.pairs[0].meta)
    assert meta["answers"]["noisy_no_rag"] == "no" and meta["p_yes"]["noisy_no_rag"] == pytest.approx(0.2)
    assert result.outcomes[2]["noisy_no_rag"] == "yes"
    assert outcomes_of(result.outcomes)[0] == ReaderOutcomes("yes", "yes", "no", "yes", "no")
    assert retriever.retrieve_calls[0]["domains"] == ["radiology"] * 4  # route=False: labelled domains


def test_check_sample() -> None:
    image, answer = check_sample(closed_sample("x", " - No. (the heart is normal)", 9))
    assert answer == "no" and image.mode == "RGB" and image.size == (8, 8)
