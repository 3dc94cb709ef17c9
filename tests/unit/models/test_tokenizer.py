"""Offline BPE tokenizer: single-token answers, round trips, the LLaVA-1.5 prompt format."""

from __future__ import annotations

from pathlib import Path

import pytest

from medrag_ray.models.common import ModelLoadError, read_card
from medrag_ray.models.tokenizer import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    AnswerTokenError,
    answer_token_ids,
    format_answer,
    format_prompt,
    load_tokenizer,
    train_bpe_tokenizer,
)

ROUND_TRIP = [
    "The chest x-ray shows a small left pleural effusion.",
    "Unseen words: pneumomediastinum, 3.5 cm, ünïcödé, tabs\tand\nnewlines!",
    "yes",
    "no",
]


def test_special_tokens_and_padding_side(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    assert tok.image_token == IMAGE_TOKEN
    for token in ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN):
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id or token == "<unk>"
    assert tok.padding_side == "left"
    ids = tok("USER: <image>\nIs it?")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.image_token_id) == 1  # <image> is never split
    batch = tok(["a", "a much longer sentence here"], padding=True)["input_ids"]
    assert batch[0][0] == tok.pad_token_id and batch[1][0] == tok.bos_token_id


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_encode_decode_round_trip(tiny_tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_yes_no_are_single_tokens_after_the_prompt(tiny_tokenizer) -> None:
    yes_id, no_id = answer_token_ids(tiny_tokenizer, ["yes", "no"])
    assert yes_id != no_id
    assert tiny_tokenizer.decode([yes_id]) == " yes" and tiny_tokenizer.decode([no_id]) == " no"
    # The id is what the reader meets: the last token of a full prompt + answer.
    full = tiny_tokenizer.encode(format_prompt("Is there an effusion?") + " yes", add_special_tokens=False)
    assert full[-1] == yes_id
    # Bare words (start of a text) are single tokens too.
    assert len(tiny_tokenizer.encode("yes", add_special_tokens=False)) == 1
    assert len(tiny_tokenizer.encode("no", add_special_tokens=False)) == 1


def test_forced_words_become_single_tokens_even_if_rare(corpus) -> None:
    tok = train_bpe_tokenizer(corpus, vocab_size=300, single_token_words=("yes", "no", "pneumothorax", "Yes"))
    ids = answer_token_ids(tok, ["yes", "no", "pneumothorax", "Yes"])
    assert len(set(ids)) == 4
    assert [tok.decode([i]) for i in ids] == [" yes", " no", " pneumothorax", " Yes"]


def test_multi_token_answer_fails_clearly(tiny_tokenizer) -> None:
    with pytest.raises(AnswerTokenError, match="'pneumomediastinum' is [0-9]+ tokens .* not one; retrain"):
        answer_token_ids(tiny_tokenizer, ["yes", "pneumomediastinum"])


def test_answer_ids_for_another_prompt_format(tiny_tokenizer) -> None:
    # Qwen2-VL style: the answer follows a newline with no space.
    (bare_yes,) = answer_token_ids(tiny_tokenizer, ["yes"], prefix="assistant\n", separator="")
    assert tiny_tokenizer.decode([bare_yes]) == "yes"
    assert bare_yes != answer_token_ids(tiny_tokenizer, ["yes"])[0]


def test_chat_template_matches_format_prompt(tiny_tokenizer) -> None:
    question = "Is there cardiomegaly?"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    prompt = tiny_tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    assert prompt == format_prompt(question) == f"USER: <image>\n{question} ASSISTANT:"
    answer = {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}
    full = tiny_tokenizer.apply_chat_template([user, answer], tokenize=False)
    assert full == format_prompt(question) + format_answer("yes") == prompt + " yes</s>"
    text_only = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert text_only == format_prompt(question, with_image=False)


def test_save_and_load(corpus, tmp_path: Path) -> None:
    tok = train_bpe_tokenizer(corpus, vocab_size=350, out_dir=tmp_path / "tok")
    card = read_card(tmp_path / "tok")
    assert card is not None and card.kind == "tokenizer" and card.config["vocab_size"] == 350
    loaded = load_tokenizer(tmp_path / "tok")
    for text in ROUND_TRIP + [format_prompt("Is it?")]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.image_token == IMAGE_TOKEN and loaded.padding_side == "left"
    assert loaded.chat_template == CHAT_TEMPLATE
    assert answer_token_ids(loaded) == answer_token_ids(tok)


def test_training_is_deterministic(corpus) -> None:
    a = train_bpe_tokenizer(corpus, vocab_size=320)
    b = train_bpe_tokenizer(corpus, vocab_size=320)
    assert a.get_vocab() == b.get_vocab()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"vocab_size": 100}, "vocab_size must be >= 300"),
        ({"single_token_words": ("x-ray",)}, "split by the byte-level pre-tokenizer"),
        ({"single_token_words": ("yes", "yes")}, "distinct"),
        ({"min_frequency": 0}, "min_frequency"),
    ],
)
def test_bad_arguments(corpus, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        train_bpe_tokenizer(corpus, **{"vocab_size": 300, **kwargs})


def test_empty_corpus_and_bad_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_bpe_tokenizer(["", "   "], vocab_size=300)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
