"""Reader engine on a tiny LLaVA: chat-template encoding, left-padded batches, closed scoring, generation, fusion."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medrag_ray.models.reader import ReaderConfig, build_tiny_reader
from medrag_ray.models.tokenizer import AnswerTokenError, answer_token_ids, train_bpe_tokenizer
from medrag_ray.reader.engine import (
    IGNORE_INDEX,
    ClosedScores,
    ReaderEngine,
    answer_separator,
    choice_token_ids,
    collate,
    encode,
    encode_conversation,
    fuse_candidate_probs,
    pad_id,
    render,
)
from medrag_ray.reader.prompts import closed_prompt, closed_rag_prompt, single_image_input
from tests.unit.models.conftest import CORPUS, solid_images

QUESTIONS = [
    "Is there cardiomegaly?",
    "Is there a pleural effusion on this frontal chest radiograph view?",
    "Is it?",
    "Is there evidence of diabetic retinopathy in this fundus image?",
]
REPORTS = [
    ["Mild cardiomegaly."],
    [],
    ["The fundus photograph shows scattered drusen near the macula.", "No acute abnormality is seen."],
    [],
]


@pytest.fixture(scope="module")
def inputs():
    """Eight inputs whose encodings have different lengths (prompts with 0, 1 or 2 reports)."""
    images = solid_images([20, 60, 100, 140, 180, 220, 240, 30], size=36, seed=1)
    return [
        single_image_input(im, closed_rag_prompt(QUESTIONS[i % 4], REPORTS[i % 4], "radiology"))
        for i, im in enumerate(images)
    ]


def test_answer_separator_of_the_tiny_template(reader) -> None:
    _, processor = reader
    prompt, separator = answer_separator(processor)
    assert prompt == "USER: question ASSISTANT:"
    assert separator == " "


def test_render_prompt_and_exchange(reader, inputs) -> None:
    _, processor = reader
    inp = single_image_input(solid_images([5])[0], "Q?")
    assert render(processor, inp) == "USER: <image>\nQ? ASSISTANT:"
    assert render(processor, inp, answer="no") == "USER: <image>\nQ? ASSISTANT: no</s>"


def test_render_and_separator_errors() -> None:
    inp = single_image_input(solid_images([5])[0], "Q?")
    no_template = SimpleNamespace(chat_template=None, tokenizer=SimpleNamespace(chat_template=None))
    with pytest.raises(ValueError, match="no chat_template"):
        render(no_template, inp)

    def apply(messages, add_generation_prompt, tokenize):  # the answer turn does not extend the prompt
        return "PROMPT" if add_generation_prompt else "OTHER zq"

    odd = SimpleNamespace(chat_template="x", apply_chat_template=apply)
    with pytest.raises(ValueError, match="does not extend the generation prompt"):
        answer_separator(odd)


def test_choice_token_ids(reader) -> None:
    _, processor = reader
    ids = choice_token_ids(processor, ["yes", "no"])
    # "Yes"/"No" are not single tokens of the tiny tokenizer: one id per choice, the " yes"/" no" tokens.
    assert ids == [[i] for i in answer_token_ids(processor.tokenizer, ["yes", "no"])]
    assert ids[0] != ids[1]
    with pytest.raises(AnswerTokenError, match="share answer tokens"):
        choice_token_ids(processor, ["yes", "yes"])
    with pytest.raises(AnswerTokenError, match="not one"):
        choice_token_ids(processor, ["yes", "zebrafish"])


def test_pad_id(reader) -> None:
    _, processor = reader
    assert pad_id(processor) == processor.tokenizer.pad_token_id
    assert pad_id(SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=None, eos_token_id=7))) == 7
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        pad_id(SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=None, eos_token_id=None)))


def test_encode_masks_exactly_the_prompt(reader, inputs) -> None:
    _, processor = reader
    tok = processor.tokenizer
    inp = inputs[0]
    prompt_only = encode(processor, inp)
    assert set(prompt_only) == {"input_ids", "attention_mask", "pixel_values"}
    assert prompt_only["input_ids"].ndim == 1 and prompt_only["attention_mask"].all()
    assert int((prompt_only["input_ids"] == tok.image_token_id).sum()) == ReaderConfig().num_image_tokens
    n_prompt = prompt_only["input_ids"].shape[0]

    full = encode(processor, inp, "yes")
    ids, labels = full["input_ids"], full["labels"]
    assert ids.shape == labels.shape == full["attention_mask"].shape and ids.ndim == 1
    assert torch.equal(ids[:n_prompt], prompt_only["input_ids"])
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    assert ids.shape[0] > n_prompt
    assert tok.decode(labels[labels != IGNORE_INDEX]) == " yes" + tok.eos_token
    assert labels[n_prompt].item() == answer_token_ids(tok, ["yes"])[0]
    assert torch.equal(full["pixel_values"], prompt_only["pixel_values"])
    assert full["pixel_values"].shape == (1, 3, 32, 32)


def test_encode_conversation_labels_every_answer_and_nothing_else(reader, inputs) -> None:
    """One turn is exactly ``encode``; with follow-ups the ids are the rendered conversation's and the labels are
    each answer's tokens and end-of-turn, in order."""
    _, processor = reader
    tok = processor.tokenizer
    for inp in inputs[:3]:
        single, conversation = encode(processor, inp, "yes"), encode_conversation(processor, inp, "yes", [])
        assert set(single) == set(conversation)
        assert all(torch.equal(single[k], conversation[k]) for k in single)
    follow_ups = [(closed_prompt("Is there a pleural effusion?"), "no"), (closed_prompt("Is it?"), "yes")]
    full = encode(processor, inputs[1], "no", follow_ups)
    ids, labels = full["input_ids"], full["labels"]
    assert ids.shape == labels.shape == full["attention_mask"].shape
    assert tok.decode(labels[labels != IGNORE_INDEX]) == (" no" + tok.eos_token) * 2 + " yes" + tok.eos_token
    turns = "".join(f"USER: {p} ASSISTANT: {a}{tok.eos_token}" for p, a in follow_ups)
    text = render(processor, inputs[1], "no") + turns
    expected = processor(images=inputs[1].images, text=[text], return_tensors="pt")["input_ids"][0]
    assert torch.equal(ids, expected)
    first = encode(processor, inputs[1], "no")
    n = first["input_ids"].shape[0]
    assert torch.equal(ids[:n], first["input_ids"]) and torch.equal(labels[:n], first["labels"])
    assert torch.equal(full["pixel_values"], first["pixel_values"])
    with pytest.raises(ValueError, match="follow_ups need the first turn's answer"):
        encode(processor, inputs[1], None, follow_ups)


def test_collate_left_pads_by_hand() -> None:
    a = {
        "input_ids": torch.tensor([5, 6, 7]),
        "attention_mask": torch.tensor([1, 1, 1]),
        "labels": torch.tensor([-100, 6, 7]),
        "pixel_values": torch.full((1, 3, 2, 2), 1.0),
    }
    b = {
        "input_ids": torch.tensor([8, 9, 10, 11, 12]),
        "attention_mask": torch.tensor([1, 1, 1, 1, 1]),
        "labels": torch.tensor([-100, -100, -100, 11, 12]),
        "pixel_values": torch.full((1, 3, 2, 2), 2.0),
    }
    batch = collate([a, b], pad=0)
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 6, 7], [-100, -100, -100, 11, 12]]
    assert batch["pixel_values"].shape == (2, 3, 2, 2)
    assert batch["pixel_values"][0].eq(1.0).all() and batch["pixel_values"][1].eq(2.0).all()
    no_labels = collate([{k: v for k, v in e.items() if k != "labels"} for e in (b, a)], pad=3)
    assert "labels" not in no_labels
    assert no_labels["input_ids"].tolist() == [[8, 9, 10, 11, 12], [3, 3, 5, 6, 7]]
    assert no_labels["pixel_values"][0].eq(2.0).all()


def test_collate_pads_every_per_token_tensor_and_refuses_mixed_inputs() -> None:
    """Qwen2-VL's processor returns ``mm_token_type_ids`` per token (1 on image tokens): padded like the mask,
    never concatenated; ``image_grid_thw`` (one row per image) is concatenated."""
    a = {"input_ids": torch.tensor([5, 6, 7]), "mm_token_type_ids": torch.tensor([0, 1, 0]),
         "image_grid_thw": torch.tensor([[1, 2, 2]])}
    b = {"input_ids": torch.tensor([8, 9, 10, 11]), "mm_token_type_ids": torch.tensor([1, 1, 0, 0]),
         "image_grid_thw": torch.tensor([[1, 4, 2]])}
    batch = collate([a, b], pad=0)
    assert batch["mm_token_type_ids"].tolist() == [[0, 0, 1, 0], [1, 1, 0, 0]]
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 2]]
    with pytest.raises(ValueError, match="different inputs"):
        collate([a, {k: v for k, v in b.items() if k != "image_grid_thw"}], pad=0)


def test_collate_zero_pads_per_example_image_stacks_of_different_counts() -> None:
    """Idefics3 / SmolVLM give ``[1, n_crops, C, H, W]`` with n_crops by image size: padded with zero images (the
    model drops them); Qwen2-VL's ``[patches, dim]`` rows of different counts are concatenated as they are."""
    a = {"input_ids": torch.tensor([5, 6]), "pixel_values": torch.ones(1, 5, 3, 2, 2),
         "pixel_attention_mask": torch.ones(1, 5, 2, 2, dtype=torch.bool)}
    b = {"input_ids": torch.tensor([7]), "pixel_values": torch.full((1, 3, 3, 2, 2), 2.0),
         "pixel_attention_mask": torch.ones(1, 3, 2, 2, dtype=torch.bool)}
    batch = collate([a, b], pad=0)
    assert batch["pixel_values"].shape == (2, 5, 3, 2, 2)
    assert batch["pixel_values"][1, :3].eq(2.0).all() and batch["pixel_values"][1, 3:].eq(0.0).all()
    assert batch["pixel_attention_mask"][1].flatten(1).all(dim=1).tolist() == [True] * 3 + [False] * 2
    q = collate([{"input_ids": torch.tensor([1]), "pixel_values": torch.ones(16, 8)},
                 {"input_ids": torch.tensor([2]), "pixel_values": torch.zeros(20, 8)}], pad=0)
    assert q["pixel_values"].shape == (36, 8)


def test_encode_returns_per_token_processor_outputs_one_dimensional(reader, inputs) -> None:
    _, processor = reader
    e = encode(processor, inputs[0], "yes")
    assert {k for k, v in e.items() if v.dim() == 1} == {"input_ids", "attention_mask", "labels"}
    assert e["pixel_values"].dim() == 4


def test_collate_of_encoded_inputs(reader, inputs) -> None:
    _, processor = reader
    encoded = [encode(processor, inp, "no") for inp in inputs[:3]]
    lengths = [e["input_ids"].shape[0] for e in encoded]
    assert len(set(lengths)) == 3
    batch = collate(encoded, pad=pad_id(processor))
    width = max(lengths)
    assert batch["input_ids"].shape == (3, width)
    for row, e in enumerate(encoded):
        pad = width - e["input_ids"].shape[0]
        assert (batch["input_ids"][row, :pad] == pad_id(processor)).all()
        assert torch.equal(batch["input_ids"][row, pad:], e["input_ids"])
        assert (batch["attention_mask"][row, :pad] == 0).all() and batch["attention_mask"][row, pad:].all()
        assert (batch["labels"][row, :pad] == IGNORE_INDEX).all()
        assert torch.equal(batch["labels"][row, pad:], e["labels"])
    assert torch.equal(batch["pixel_values"], torch.cat([e["pixel_values"] for e in encoded]))


def test_score_closed_is_batch_invariant_and_normalised(reader, inputs) -> None:
    model, processor = reader
    lengths = {encode(processor, inp)["input_ids"].shape[0] for inp in inputs}
    assert len(lengths) >= 3  # left padding is exercised
    one = ReaderEngine(model, processor, batch_size=1).score_closed(inputs)
    eight = ReaderEngine(model, processor, batch_size=8).score_closed(inputs)
    assert one.probs.shape == (8, 2) and one.choices == ("yes", "no")
    assert np.allclose(one.probs.sum(axis=1), 1.0, atol=1e-6)
    assert np.allclose(one.probs, eight.probs, atol=1e-5)
    assert not np.allclose(one.probs[0], one.probs[1], atol=1e-4)  # the inputs differ, so do the scores
    empty = ReaderEngine(model, processor).score_closed([])
    assert empty.probs.shape == (0, 2) and empty.answers == []


def test_score_closed_equals_manual_forward(reader, inputs) -> None:
    model, processor = reader
    engine = ReaderEngine(model, processor, batch_size=8)
    scores = engine.score_closed(inputs)
    [[yes], [no]] = choice_token_ids(processor, ["yes", "no"])
    for i in (1, 2):
        e = encode(processor, inputs[i])
        with torch.no_grad():
            logits = model(
                input_ids=e["input_ids"][None], attention_mask=e["attention_mask"][None], pixel_values=e["pixel_values"]
            ).logits[0, -1]
        expected = torch.softmax(torch.stack([logits[yes], logits[no]]), dim=0).numpy()
        assert np.allclose(scores.probs[i], expected, atol=1e-5)
    assert scores.answers == [("yes", "no")[j] for j in scores.probs.argmax(axis=1)]


def test_capitalised_variant_is_pooled_by_logsumexp(inputs) -> None:
    tokenizer = train_bpe_tokenizer(CORPUS * 4, vocab_size=400, single_token_words=("yes", "no", "Yes"))
    torch.manual_seed(3)
    model, processor = build_tiny_reader(ReaderConfig(), tokenizer)
    yes, no, cap = answer_token_ids(tokenizer, ["yes", "no", "Yes"])
    assert choice_token_ids(processor, ["yes", "no"]) == [[yes, cap], [no]]
    engine = ReaderEngine(model, processor)
    got = engine.score_closed(inputs[:2]).probs
    e = collate([encode(processor, inp) for inp in inputs[:2]], pad_id(processor))
    with torch.no_grad():
        logits = model(**e).logits[:, -1]
    yes_score = torch.logaddexp(logits[:, yes], logits[:, cap])
    expected = torch.softmax(torch.stack([yes_score, logits[:, no]], dim=-1), dim=-1).numpy()
    assert np.allclose(got, expected, atol=1e-5)


def test_closed_scores_answers() -> None:
    scores = ClosedScores(("yes", "no"), np.array([[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]]))
    assert scores.answers == ["yes", "no", "yes"]  # ties go to the first choice (argmax)
    three = ClosedScores(("a", "b", "c"), np.array([[0.2, 0.3, 0.5]]))
    assert three.answers == ["c"]


def test_engine_batch_size_must_be_positive(reader) -> None:
    model, processor = reader
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ReaderEngine(model, processor, batch_size=0)


def test_generate_is_deterministic_greedy(reader, inputs) -> None:
    model, processor = reader
    engine = ReaderEngine(model, processor, batch_size=4)
    first = engine.generate(inputs[:4], max_new_tokens=3)
    assert len(first) == 4 and all(isinstance(t, str) for t in first)
    assert engine.generate(inputs[:4], max_new_tokens=3) == first
    # Left padding in generate: one by one gives the same greedy continuation as the padded batch.
    assert ReaderEngine(model, processor, batch_size=1).generate(inputs[:4], max_new_tokens=3) == first
    # The first greedy token is the argmax of the forward pass's last logits.
    e = encode(processor, inputs[0])
    with torch.no_grad():
        logits = model(**{k: (v[None] if v.ndim == 1 else v) for k, v in e.items()}).logits[0, -1]
    one = engine.generate(inputs[:1], max_new_tokens=1)
    assert one == [processor.tokenizer.decode([int(logits.argmax())], skip_special_tokens=True).strip()]


def test_fuse_candidate_probs_by_hand() -> None:
    cand = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [1.0, 0.0]]])
    retr = np.array([[0.75, 0.25], [0.4, 0.6]])
    # row 0: 0.75*[.9,.1] + 0.25*[.2,.8] = [.725, .275]; row 1: 0.4*[.5,.5] + 0.6*[1, 0] = [.8, .2]
    assert np.allclose(fuse_candidate_probs(cand, retr), [[0.725, 0.275], [0.8, 0.2]])
    assert np.allclose(fuse_candidate_probs(cand.tolist(), retr.tolist()).sum(axis=1), 1.0)
    with pytest.raises(ValueError, match=r"must be \[B, K, C\]"):
        fuse_candidate_probs(cand, np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    with pytest.raises(ValueError, match=r"must be \[B, K, C\]"):
        fuse_candidate_probs(cand[0], retr[0])
    with pytest.raises(ValueError, match="rows must sum to 1"):
        fuse_candidate_probs(cand, np.array([[0.5, 0.4], [0.4, 0.6]]))
