"""MR-RAG's IFA: relevance, λ, the attention function by hand, spans in both prompt styles, the tiny LLaVA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medrag_ray.eval.ifa_layers import (
    BlockingEffects,
    LayerEffect,
    compare,
    critical_layers,
    gold_indices,
    layer_blocking_effects,
)
from medrag_ray.reader.engine import ReaderEngine, collate, encode, to_model, with_positions
from medrag_ray.reader.ifa import (
    IFA_ATTENTION,
    REPORT_QUESTION,
    IFASettings,
    IFASpec,
    batch_ifa_matrix,
    block_matrix,
    enable_ifa,
    ifa_attention_forward,
    ifa_context,
    ifa_lambda,
    minmax_relevance,
    num_decoder_layers,
    token_spans,
)
from medrag_ray.reader.prompts import closed_rag_prompt, jomed_input, report_prompt, single_image_input
from tests.unit.models.conftest import solid_images

QUESTION = "Is there cardiomegaly?"
DOCS = ("Mild cardiomegaly.", "The fundus photograph shows scattered drusen near the macula.")


@pytest.fixture(scope="module")
def sharp_reader(reader):
    """The tiny reader with 10x query and key projections in its language model: random weights give nearly
    uniform attention (|Ã| ~ 0.01), where a bias proportional to |Ã| barely moves the answers."""
    model, processor = reader
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in sharp.named_modules():
            if "language_model" in name and name.endswith("self_attn"):
                module.q_proj.weight.mul_(10.0)
                module.k_proj.weight.mul_(10.0)
    return sharp, processor


@pytest.fixture(scope="module")
def ifa_reader(reader):
    model, processor = reader
    return enable_ifa(copy.deepcopy(model)), processor


def mmed(image, question=QUESTION, docs=DOCS):
    return single_image_input(image, closed_rag_prompt(question, list(docs), "radiology"))


# ------------------------------------------------------------------------------------ pure parts


def test_minmax_relevance_by_hand() -> None:
    np.testing.assert_allclose(minmax_relevance([1.0, 3.0, 2.0]), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(minmax_relevance([-0.2, 0.6]), [0.0, 1.0])
    np.testing.assert_allclose(minmax_relevance([0.4, 0.4, 0.4]), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(minmax_relevance([0.7]), [1.0])
    assert minmax_relevance([]).shape == (0,)
    with pytest.raises(ValueError, match="finite"):
        minmax_relevance([0.1, float("nan")])


def test_spec_and_settings_validation() -> None:
    with pytest.raises(ValueError, match="same length"):
        IFASpec("q?", ("a",), (0.1, 0.2))
    with pytest.raises(ValueError, match="finite"):
        IFASpec("q?", ("a",), (float("inf"),))
    with pytest.raises(ValueError, match="question"):
        IFASpec("  ", (), ())
    with pytest.raises(ValueError, match="doc_texts"):
        IFASpec("q?", (" ",), (0.1,))
    with pytest.raises(ValueError, match="layers.*empty"):
        IFASettings(layers=())
    with pytest.raises(ValueError, match="layers"):
        IFASettings(layers=(-1,))
    with pytest.raises(ValueError, match="duplicates"):
        IFASettings(layers=(1, 1))
    with pytest.raises(ValueError, match="strength"):
        IFASettings(layers=(0,), strength=-0.5)
    with pytest.raises(ValueError, match="mode"):
        IFASettings(layers=(0,), mode="mask")  # type: ignore[arg-type]
    assert IFASettings(layers=[2, 0]).layers == (2, 0)  # type: ignore[arg-type]


def test_lambda_by_hand() -> None:
    # positions 0..5: doc A = {1, 2}, doc B = {3}, question = {4, 5}; relevance A 1.0, B 0.5; strength 2
    lam = ifa_lambda(6, [4, 5], [[1, 2], [3]], [1.0, 0.5], 2.0)
    expected = torch.zeros(6, 6)
    expected[4, 1] = expected[4, 2] = expected[5, 1] = expected[5, 2] = 2.0
    expected[4, 3] = expected[5, 3] = 1.0
    assert torch.equal(lam, expected)
    assert torch.equal(block_matrix(6, [4, 5], [[1, 2], [3]]), expected > 0)
    assert not ifa_lambda(6, [4, 5], [], [], 2.0).any()
    with pytest.raises(ValueError, match="relevance"):
        ifa_lambda(6, [4], [[1]], [1.0, 0.5], 1.0)


class _Attn(torch.nn.Module):
    def __init__(self, layer_idx: int, groups: int) -> None:
        super().__init__()
        self.layer_idx, self.num_key_value_groups, self.is_causal = layer_idx, groups, True


def _toy():
    """One sequence of 4 tokens, 2 query heads sharing 1 key/value head (GQA), head size 3."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 4, 3, generator=g) for h in (2, 1, 1))
    keep = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]  # sdpa's bool mask: True = may attend
    lam = ifa_lambda(4, [2, 3], [[0], [1]], [1.0, 0.25], 1.5)[None]
    return q, k, v, keep, lam


def _by_hand(q, k, v, keep, extra):
    out = torch.zeros(1, 4, 2, 3)
    for h in range(2):
        for i in range(4):
            logits = []
            for j in range(4):
                a = float(q[0, h, i] @ k[0, 0, j]) * 3**-0.5
                a = a + extra(i, j, a)
                logits.append(a if keep[0, 0, i, j] else float("-inf"))
            w = torch.softmax(torch.tensor(logits), dim=0)
            out[0, i, h] = (w[:, None] * v[0, 0]).sum(0)
    return out


def test_attention_bias_equals_the_equation_by_hand() -> None:
    q, k, v, keep, lam = _toy()
    module = _Attn(layer_idx=1, groups=2)
    with ifa_context(IFASettings(layers=(1,)), lam):
        got, _ = ifa_attention_forward(module, q, k, v, keep, scaling=3**-0.5)
        got_none_mask, _ = ifa_attention_forward(module, q, k, v, None, scaling=3**-0.5)
    expected = _by_hand(q, k, v, keep, lambda i, j, a: float(lam[0, i, j]) * abs(a))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_none_mask, expected, atol=1e-6, rtol=1e-5)  # None mask = causal (sdpa)
    plain = _by_hand(q, k, v, keep, lambda i, j, a: 0.0)
    assert (got - plain).abs().max() > 1e-3  # the bias really acts
    outside, _ = ifa_attention_forward(module, q, k, v, keep, scaling=3**-0.5)
    torch.testing.assert_close(outside, plain, atol=1e-6, rtol=1e-5)
    with ifa_context(IFASettings(layers=(0,)), lam):  # another layer: plain attention
        other, _ = ifa_attention_forward(module, q, k, v, keep, scaling=3**-0.5)
    torch.testing.assert_close(other, plain, atol=1e-6, rtol=1e-5)
    with ifa_context(IFASettings(layers=(1,)), lam):  # a decode step (query length 1): plain attention
        step, _ = ifa_attention_forward(module, q[:, :, -1:], k, v, None, scaling=3**-0.5)
    torch.testing.assert_close(step, plain[:, -1:], atol=1e-6, rtol=1e-5)


def test_block_mode_equals_an_additive_minus_inf_mask() -> None:
    q, k, v, keep, lam = _toy()
    blocked = block_matrix(4, [2, 3], [[0], [1]])
    settings = IFASettings(layers=(0,), mode="block")
    with ifa_context(settings, blocked[None]):
        got, _ = ifa_attention_forward(_Attn(0, 2), q, k, v, keep, scaling=3**-0.5)
    additive = torch.where(blocked, float("-inf"), 0.0)
    expected = _by_hand(q, k, v, keep, lambda i, j, a: float(additive[i, j]))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="bool"):
        with ifa_context(settings, blocked[None].float()):
            pass


# --------------------------------------------------------------------------------------- spans


def _decoded(processor, inp, positions) -> str:
    ids = encode(processor, inp)["input_ids"]
    return processor.tokenizer.decode(ids[list(positions)]).strip()


def test_spans_of_the_mmed_prompt(reader) -> None:
    _, processor = reader
    inp = mmed(solid_images([40], size=36)[0])
    spans = token_spans(processor, inp, IFASpec(QUESTION, DOCS, (0.2, 0.8)))
    assert _decoded(processor, inp, spans.question) == QUESTION
    assert [_decoded(processor, inp, d) for d in spans.docs] == list(DOCS)
    assert spans.length == encode(processor, inp)["input_ids"].shape[0]
    assert max(spans.docs[-1]) < min(spans.question)


def test_spans_of_the_jomed_and_report_prompts(reader) -> None:
    _, processor = reader
    images = solid_images([10, 90, 170], size=36, seed=2)
    inp = jomed_input(images[0], closed_rag_prompt(QUESTION, [], "radiology"),
                      [(images[1], " " + DOCS[0]), (images[2], DOCS[1])])
    spans = token_spans(processor, inp, IFASpec(QUESTION, (" " + DOCS[0], DOCS[1]), (0.5, 0.1)))
    assert _decoded(processor, inp, spans.question) == QUESTION
    assert [_decoded(processor, inp, d) for d in spans.docs] == list(DOCS)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = encode(processor, inp)["input_ids"]
    assert all(int(ids[p]) != image_id for d in spans.docs for p in d)
    report = single_image_input(images[0], report_prompt(list(DOCS)))
    spans = token_spans(processor, report, IFASpec(REPORT_QUESTION, DOCS, (0.5, 0.1)))
    assert _decoded(processor, report, spans.question) == REPORT_QUESTION
    assert [_decoded(processor, report, d) for d in spans.docs] == list(DOCS)


def test_missing_texts_are_named(reader) -> None:
    _, processor = reader
    inp = mmed(solid_images([40], size=36)[0])
    with pytest.raises(ValueError, match="document 1 'Absent report.'"):
        token_spans(processor, inp, IFASpec(QUESTION, (DOCS[0], "Absent report."), (0.1, 0.2)))
    with pytest.raises(ValueError, match="document 1 'Mild cardiomegaly.'"):  # out of prompt order
        token_spans(processor, inp, IFASpec(QUESTION, (DOCS[1], DOCS[0]), (0.1, 0.2)))
    with pytest.raises(ValueError, match="question 'Is there a mass\\?'"):
        token_spans(processor, inp, IFASpec("Is there a mass?", DOCS, (0.1, 0.2)))


def test_batch_matrix_shifts_by_the_left_padding(reader) -> None:
    _, processor = reader
    images = solid_images([40, 80], size=36)
    short = mmed(images[0], docs=DOCS[:1])
    spec = IFASpec(QUESTION, DOCS[:1], (0.3,))
    alone = token_spans(processor, short, spec)
    width = alone.length + 7
    matrix = batch_ifa_matrix(processor, [short, mmed(images[1])], [spec, None], IFASettings((0,), 2.0), width)
    expected = ifa_lambda(width, [p + 7 for p in alone.question], [[p + 7 for p in alone.docs[0]]], [1.0], 2.0)
    assert torch.equal(matrix[0], expected) and not matrix[1].any()


# ------------------------------------------------------------------------------------ tiny LLaVA


def _logits(model, processor, inputs, settings=None, specs=None, hidden=False):
    encoded = [encode(processor, inp) for inp in inputs]
    batch = to_model(model, collate(encoded, 0))
    kwargs = {"output_hidden_states": hidden}
    if settings is None:
        out = model(**with_positions(model, batch), **kwargs)
    else:
        matrix = batch_ifa_matrix(processor, inputs, specs, settings, batch["input_ids"].shape[1])
        with ifa_context(settings, matrix):
            out = model(**with_positions(model, batch), **kwargs)
    return out


@torch.inference_mode()
def test_enable_ifa_switches_only_the_text_attention(reader, ifa_reader) -> None:
    model, processor = reader
    patched, _ = ifa_reader
    assert patched.config.text_config._attn_implementation == IFA_ATTENTION
    assert patched.config.vision_config._attn_implementation == model.config.vision_config._attn_implementation
    assert enable_ifa(patched) is patched and num_decoder_layers(patched) == 2
    inputs = [mmed(im) for im in solid_images([30, 200], size=36)]
    specs = [IFASpec(QUESTION, DOCS, (0.1, 0.9))] * 2
    base = _logits(model, processor, inputs).logits
    torch.testing.assert_close(_logits(patched, processor, inputs).logits, base, atol=1e-5, rtol=0)
    zero = _logits(patched, processor, inputs, IFASettings((0, 1), strength=0.0), specs).logits
    torch.testing.assert_close(zero, base, atol=1e-5, rtol=0)
    biased = _logits(patched, processor, inputs, IFASettings((0, 1), strength=3.0), specs).logits
    assert (biased - base).abs().max() > 1e-4


@torch.inference_mode()
def test_ifa_changes_only_what_a_question_token_can_see(reader, ifa_reader) -> None:
    model, processor = reader
    patched, _ = ifa_reader
    inp = mmed(solid_images([120], size=36)[0])
    spec = IFASpec(QUESTION, DOCS, (0.1, 0.9))
    base = _logits(model, processor, [inp], hidden=True)
    # layer 1 only: the hidden states after layer 0 are untouched, the ones after layer 1 change
    out = _logits(patched, processor, [inp], IFASettings((1,), strength=3.0), [spec], hidden=True)
    torch.testing.assert_close(out.hidden_states[1], base.hidden_states[1], atol=1e-5, rtol=0)
    assert (out.hidden_states[2] - base.hidden_states[2]).abs().max() > 1e-4
    # and in layer 1 only the question rows change (tokens before the question attend as before)
    q_start = min(token_spans(processor, inp, spec).question)
    torch.testing.assert_close(out.hidden_states[2][0, :q_start], base.hidden_states[2][0, :q_start],
                               atol=1e-5, rtol=0)
    # no documents in the prompt: nothing to bias
    bare = mmed(solid_images([120], size=36)[0], docs=())
    none = _logits(patched, processor, [bare], IFASettings((0, 1), strength=3.0), [IFASpec(QUESTION)]).logits
    torch.testing.assert_close(none, _logits(model, processor, [bare]).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def batch_inputs():
    images = solid_images([20, 60, 100, 140, 180], size=36, seed=1)
    docs = [DOCS, DOCS[:1], (), DOCS[::-1], DOCS[1:]]
    inputs = [mmed(im, docs=d) for im, d in zip(images, docs, strict=True)]
    specs = [IFASpec(QUESTION, d, tuple(0.2 + 0.3 * i for i in range(len(d)))) for d in docs]
    specs[1] = None
    return inputs, specs


def test_engine_ifa_is_batch_invariant_under_left_padding(sharp_reader, batch_inputs) -> None:
    model, processor = sharp_reader
    inputs, specs = batch_inputs
    engine = ReaderEngine(copy.deepcopy(model), processor, batch_size=8)
    settings = IFASettings((0, 1), strength=4.0)
    plain = engine.score_closed(inputs).probs
    batched = engine.score_closed(inputs, ifa=settings, ifa_specs=specs).probs
    alone = np.concatenate([engine.score_closed([i], ifa=settings, ifa_specs=[s]).probs
                            for i, s in zip(inputs, specs, strict=True)])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(batched[[1, 2]], plain[[1, 2]], atol=1e-5)  # None spec, no documents
    assert np.abs(batched - plain).max() > 1e-4
    np.testing.assert_allclose(engine.score_closed(inputs).probs, plain, atol=1e-6)  # after enabling: as before
    with pytest.raises(ValueError, match="one IFASpec"):
        engine.score_closed(inputs, ifa=settings)
    with pytest.raises(ValueError, match="without ifa"):
        engine.score_closed(inputs, ifa_specs=specs)


def test_engine_generate_with_ifa(sharp_reader, batch_inputs) -> None:
    model, processor = sharp_reader
    inputs, specs = batch_inputs
    engine = ReaderEngine(copy.deepcopy(model), processor, batch_size=2)
    plain = engine.generate(inputs, max_new_tokens=5)
    assert engine.generate(inputs, max_new_tokens=5, ifa=IFASettings((0, 1), strength=0.0), ifa_specs=specs) == plain
    biased = engine.generate(inputs, max_new_tokens=5, ifa=IFASettings((1,), strength=5.0), ifa_specs=specs)
    assert len(biased) == len(inputs) and all(isinstance(t, str) for t in biased)


# ------------------------------------------------------------------------------ critical layers


def test_compare_and_ranking_by_hand() -> None:
    base = np.array([[0.8, 0.2], [0.4, 0.6]])
    probs = np.array([[0.6, 0.4], [0.5, 0.5]])
    gold = gold_indices(["yes", "no"], ("yes", "no"))
    effect = compare(probs, base, gold, layer=3)
    assert effect.layer == 3 and effect.accuracy == 0.5 and effect.accuracy_drop == 0.5
    assert effect.mean_p_gold == pytest.approx((0.6 + 0.5) / 2)
    assert effect.abs_delta_gold == pytest.approx((0.2 + 0.1) / 2)
    kl0 = 0.8 * np.log(0.8 / 0.6) + 0.2 * np.log(0.2 / 0.4)
    kl1 = 0.4 * np.log(0.4 / 0.5) + 0.6 * np.log(0.6 / 0.5)
    assert effect.kl == pytest.approx((kl0 + kl1) / 2, abs=1e-9)
    with pytest.raises(ValueError, match="maybe"):
        gold_indices(["maybe"], ("yes", "no"))
    effects = BlockingEffects(2, {"accuracy": 1.0, "mean_p_gold": 0.7}, (
        LayerEffect(0, 1.0, 0.7, 0.01, 0.002, 0.0),
        LayerEffect(1, 0.5, 0.5, 0.30, 0.100, 0.5),
        LayerEffect(2, 1.0, 0.6, 0.10, 0.300, 0.0),
    ))
    assert critical_layers(effects, 1) == (1,)
    assert critical_layers(effects, 2, "kl") == (1, 2)
    assert critical_layers(effects, 2, "accuracy_drop") == (0, 1)  # the tie 0 / 2 keeps the lower layer
    with pytest.raises(ValueError, match="criterion"):
        critical_layers(effects, 1, "entropy")


def test_layer_blocking_effects_on_the_tiny_reader(sharp_reader, batch_inputs) -> None:
    model, processor = sharp_reader
    inputs, specs = batch_inputs
    keep = [0, 3, 4]  # the inputs with documents
    inputs, specs = [inputs[i] for i in keep], [specs[i] for i in keep]
    labels = ["yes", "no", "yes"]
    engine = ReaderEngine(copy.deepcopy(model), processor, batch_size=4)
    effects = layer_blocking_effects(engine, inputs, specs, labels)
    assert effects.n == 3 and [e.layer for e in effects.per_layer] == [0, 1]
    base = engine.score_closed(inputs).probs
    gold = gold_indices(labels, ("yes", "no"))
    assert effects.baseline["accuracy"] == pytest.approx(float(np.mean(base.argmax(1) == gold)), abs=1e-6)
    blocked = engine.score_closed(inputs, ifa=IFASettings((1,), mode="block"), ifa_specs=specs).probs
    assert effects.per_layer[1].abs_delta_gold == pytest.approx(
        float(np.mean(np.abs(blocked[[0, 1, 2], gold] - base[[0, 1, 2], gold]))), abs=1e-6)
    # blocking in layer 0 changes the answers; in the last layer it cannot: the answer is read at the last
    # position, which is no question token, and no later layer carries the question rows' change to it
    assert effects.per_layer[0].abs_delta_gold > 1e-5 and effects.per_layer[1].abs_delta_gold < 1e-6
    assert all(e.kl >= 0 for e in effects.per_layer)
