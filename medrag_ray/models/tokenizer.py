"""The tiny reader's tokenizer: a byte-level BPE trained offline with ``tokenizers``, and the prompt format.

* :func:`train_bpe_tokenizer` trains on the corpus (reports, questions) and wraps the result in a
  ``PreTrainedTokenizerFast`` with ``<pad> <s> </s> <unk> <image>`` special tokens, ``image_token`` set
  (what ``LlavaProcessor`` reads), left padding (batched generation) and a LLaVA-1.5 chat template.
* Closed questions are scored from the logits of the answer tokens (``yes`` / ``no``). The trainer
  guarantees that each word of ``single_token_words`` is ONE token, both at the start of a text and
  after a space (as it follows ``ASSISTANT:``), by appending the missing BPE merges after training.
  :func:`answer_token_ids` finds those ids the way the reader meets them -- encoded right after the
  prompt -- and fails clearly when an answer spans several tokens (also for real tokenizers).
* The prompt is LLaVA-1.5's: ``USER: <image>\\n{prompt} ASSISTANT:`` and the answer follows after one
  space, then ``</s>``. :func:`format_prompt` and the tokenizer's ``chat_template`` render the same text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from medrag_ray.models.common import (
    ModelCard,
    ModelLoadError,
    check_card_kind,
    read_card,
    require_directory,
    write_card,
)

logger = logging.getLogger(__name__)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)
USER_TAG = "USER:"
ASSISTANT_TAG = "ASSISTANT:"
ANSWER_SEPARATOR = " "
"""What separates ``ASSISTANT:`` from the answer (LLaVA-1.5: one space)."""
PROMPT_TEMPLATE = USER_TAG + " {image}{prompt} " + ASSISTANT_TAG
DEFAULT_SINGLE_TOKEN_WORDS: tuple[str, ...] = ("yes", "no")
MIN_VOCAB_SIZE = 300
"""256 byte symbols + the special tokens + room for merges."""

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ text + eos_token }}{% endgeneration %}"
    "{%- else -%}{{ text + ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
"""LLaVA-1.5 conversation format as a chat template; renders exactly what :func:`format_prompt` builds."""


class AnswerTokenError(ValueError):
    """An answer that is not exactly one token after the prompt; the message shows its tokens and the fix."""


def format_prompt(prompt: str, *, with_image: bool = True, image_token: str = IMAGE_TOKEN) -> str:
    """``USER: <image>\\n{prompt} ASSISTANT:`` -- the text the reader continues with the answer."""
    image = f"{image_token}\n" if with_image else ""
    return PROMPT_TEMPLATE.format(image=image, prompt=prompt)


def format_answer(answer: str, eos_token: str = EOS_TOKEN) -> str:
    """What follows :func:`format_prompt` in a training example: ``" {answer}</s>"``."""
    return f"{ANSWER_SEPARATOR}{answer}{eos_token}"


# ------------------------------------------------------------------------------------------ training


def _append_merges(tokenizer: Tokenizer, pieces: Sequence[str], added: list[str]) -> Tokenizer:
    """Append the merges that join ``pieces`` left to right (lowest priority) and the tokens they make."""
    state = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges: list[Any] = state["model"]["merges"]
    as_str = bool(merges) and isinstance(merges[0], str)
    next_id = max([*vocab.values(), *(t["id"] for t in state.get("added_tokens", []))]) + 1
    left = pieces[0]
    for right in pieces[1:]:
        merged = left + right
        merges.append(f"{left} {right}" if as_str else [left, right])
        if merged not in vocab:
            vocab[merged] = next_id
            next_id += 1
            added.append(merged)
        left = merged
    return Tokenizer.from_str(json.dumps(state))


def _force_single_tokens(tokenizer: Tokenizer, words: Sequence[str]) -> tuple[Tokenizer, list[str]]:
    """Append BPE merges so that each word, bare and after a space, is one token; returns the added tokens.

    Merges apply by rank, so a word's pieces depend on merges added for earlier words (``yes`` before
    `` yes``): each variant is re-tokenized with the merges added so far until it is one token.
    """
    added: list[str] = []
    for word in words:
        for variant in (word, ANSWER_SEPARATOR + word):
            pieces = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str(variant)]
            if len(pieces) != 1:
                raise ValueError(
                    f"single_token_words: {word!r} is split by the byte-level pre-tokenizer into {pieces}; "
                    "use a single word of letters or digits"
                )
            for _ in range(len(pieces[0]) + 1):
                current = [t.value for t in tokenizer.model.tokenize(pieces[0])]
                if len(current) == 1:
                    break
                tokenizer = _append_merges(tokenizer, current, added)
            else:  # pragma: no cover - each round joins all pieces of the word, so one round suffices
                raise RuntimeError(f"could not make {variant!r} a single token")
    return tokenizer, added


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    out_dir: str | Path | None = None,
    *,
    single_token_words: Sequence[str] = DEFAULT_SINGLE_TOKEN_WORDS,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline on ``texts``; save it to ``out_dir`` when given.

    ``vocab_size`` counts the 256 byte symbols and the special tokens; forcing ``single_token_words``
    may add a few tokens beyond it. The result encodes with a leading ``<s>`` and pads on the left.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if model_max_length < 16:
        raise ValueError(f"model_max_length must be >= 16, got {model_max_length}")
    words = [w.strip() for w in single_token_words]
    if any(not w for w in words) or len(set(words)) != len(words):
        raise ValueError(
            f"single_token_words must be distinct non-empty words, got {list(single_token_words)}"
        )

    corpus = [t for t in texts if isinstance(t, str) and t.strip()]
    if not corpus:
        raise ValueError("train_bpe_tokenizer got no non-empty texts; pass the reports/questions to train on")
    # The prompt scaffolding and the answers belong to every example the reader sees.
    corpus += [format_prompt("") + ANSWER_SEPARATOR + w for w in words]

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tok, added = _force_single_tokens(tok, words)
    if added:
        logger.info("added %d BPE merges so that %s are single tokens: %s", len(added), words, added)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=model_max_length,
    )
    hf.chat_template = CHAT_TEMPLATE
    answer_token_ids(hf, words)  # the guarantee above, checked the way the reader uses it
    logger.info("trained BPE tokenizer: %d tokens on %d texts", len(hf), len(corpus))
    if out_dir is not None:
        out = Path(out_dir)
        hf.save_pretrained(str(out))
        config = {
            "vocab_size": vocab_size,
            "single_token_words": words,
            "min_frequency": min_frequency,
            "model_max_length": model_max_length,
        }
        write_card(
            out, ModelCard(kind="tokenizer", config=config, extra={"n_texts": len(corpus), "size": len(hf)})
        )
    return hf


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved by :func:`train_bpe_tokenizer` (or any local HF tokenizer directory), offline."""
    path = require_directory(directory, "load_tokenizer")
    card = read_card(path)
    if card is not None:
        check_card_kind(
            card, "tokenizer", path, "pass a tokenizer directory (a reader directory has one too)"
        )
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ModelLoadError(
            f"directory {path} has no tokenizer files (tokenizer.json / tokenizer_config.json); pass a "
            "directory "
            "written by medrag_ray.models.tokenizer.train_bpe_tokenizer or a Hugging Face tokenizer directory"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ------------------------------------------------------------------------------------------ answers


def answer_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    answers: Sequence[str] = DEFAULT_SINGLE_TOKEN_WORDS,
    *,
    prefix: str = ASSISTANT_TAG,
    separator: str = ANSWER_SEPARATOR,
) -> list[int]:
    """The single token id of each answer as it is encoded after ``prefix + separator``.

    Defaults match the LLaVA-1.5 format (``"ASSISTANT: yes"`` -> the id of ``"Ġyes"`` / ``"▁yes"``). For a
    model whose generation prompt ends differently (Qwen2-VL: ``"<|im_start|>assistant\\n"``, no space),
    pass that ``prefix`` and ``separator=""``. Raises :class:`AnswerTokenError` when an answer is several
    tokens or two answers share a token.
    """
    if not answers:
        raise ValueError("answer_token_ids needs at least one answer")
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    ids: list[int] = []
    for answer in answers:
        full = tokenizer.encode(prefix + separator + answer, add_special_tokens=False)
        if full[: len(prefix_ids)] != prefix_ids:
            raise AnswerTokenError(
                f"answer {answer!r} changes how the prompt end {prefix!r} is tokenized; pass the exact "
                "prefix "
                "and separator the reader uses"
            )
        rest = full[len(prefix_ids) :]
        if len(rest) != 1:
            pieces = tokenizer.convert_ids_to_tokens(rest)
            raise AnswerTokenError(
                f"answer {answer!r} is {len(rest)} tokens {pieces} after {prefix!r}, not one; retrain the "
                "tokenizer "
                f"with train_bpe_tokenizer(single_token_words=[..., {answer!r}]) or score it by summed token "
                "log-probs instead of one logit"
            )
        ids.append(rest[0])
    if len(set(ids)) != len(ids):
        raise AnswerTokenError(f"answers {list(answers)} map to the same token ids {ids}; they must differ")
    return ids
