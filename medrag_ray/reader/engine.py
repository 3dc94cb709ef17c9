"""Running the reader: closed answers scored from the answer-token logits, free generation, SFT examples.

Every input goes through the processor's chat template (:meth:`ReaderInput.messages`), is encoded one example
at a time (the processor expands each ``<image>`` into the model's image tokens) and batches are
**left-padded** here, so the last position of every row is its prompt's last token whatever the tokenizer's
own padding side. A closed question is then one forward pass for the whole batch: the logits at the last
position, restricted to the choice tokens (``yes`` / ``no`` or class tokens; a choice's capitalised variant is
pooled with it by log-sum-exp when it is also one token), softmaxed over the choices.

The answer prefix (what the chat template puts between the generation prompt and the answer: one space for
LLaVA-1.5, nothing for Qwen2-VL) is read from the template itself (:func:`answer_separator`), so the choice
tokens are the ones the model would actually emit.

With ``ifa=IFASettings(...)`` (and one :class:`~medrag_ray.reader.ifa.IFASpec` or None per input),
:meth:`ReaderEngine.score_closed` and :meth:`ReaderEngine.generate` run each batch inside MR-RAG's IFA context
(:mod:`medrag_ray.reader.ifa`): the question -> document attention logits of the chosen layers are biased by
the documents' min-max normalised scores (or blocked); without ``ifa`` nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel, ProcessorMixin

from medrag_ray.models.tokenizer import AnswerTokenError, answer_token_ids
from medrag_ray.reader.prompts import ReaderInput

if TYPE_CHECKING:
    from medrag_ray.reader.ifa import IFASettings, IFASpec

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_PROBE = "zq"
"""An answer used to read the chat template's answer separator."""


def render(processor: ProcessorMixin, inp: ReaderInput, answer: str | None = None) -> str:
    """The text of ``inp`` through the processor's chat template (generation prompt, or the full exchange)."""
    return _apply_template(processor, inp.messages(answer), generation_prompt=answer is None)


def _apply_template(processor: ProcessorMixin, messages: list[dict[str, object]], generation_prompt: bool) -> str:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "the reader's processor has no chat_template; save the processor with one (the original model card's "
            "template, e.g. LLaVA-1.5's 'USER: <image>\\n... ASSISTANT:') so prompts render as the model was trained"
        )
    return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def answer_separator(processor: ProcessorMixin) -> tuple[str, str]:
    """``(generation prompt end, separator)``: what the template renders between the prompt and an answer."""
    probe = ReaderInput(("question",))
    prompt = render(processor, probe)
    full = render(processor, probe, answer=_PROBE)
    if not full.startswith(prompt) or _PROBE not in full[len(prompt) :]:
        raise ValueError(
            "the chat template renders the assistant turn in a way that does not extend the generation prompt; "
            "closed answers cannot be scored from the next-token logits with this template"
        )
    rest = full[len(prompt) :]
    return prompt, rest[: rest.index(_PROBE)]


def choice_token_ids(processor: ProcessorMixin, choices: Sequence[str]) -> list[list[int]]:
    """For each choice, the single-token ids the model can answer it with (the word, and Capitalised if one token)."""
    prompt, separator = answer_separator(processor)
    prefix = prompt[-40:]
    ids: list[list[int]] = []
    for choice in choices:
        [main] = answer_token_ids(processor.tokenizer, [choice], prefix=prefix, separator=separator)
        variants = [main]
        capital = choice[:1].upper() + choice[1:]
        if capital != choice:
            try:
                [other] = answer_token_ids(processor.tokenizer, [capital], prefix=prefix, separator=separator)
                variants.append(other)
            except AnswerTokenError:
                pass
        ids.append(variants)
    flat = [i for v in ids for i in v]
    if len(set(flat)) != len(flat):
        raise AnswerTokenError(f"choices {list(choices)} share answer tokens {ids}; they must differ")
    return ids


def pad_id(processor: ProcessorMixin) -> int:
    tok = processor.tokenizer
    value = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if value is None:
        raise ValueError("the reader's tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(value)


def encode(
    processor: ProcessorMixin, inp: ReaderInput, answer: str | None = None, follow_ups: Sequence[tuple[str, str]] = ()
) -> dict[str, Tensor]:
    """One example as model inputs (``input_ids`` 1-D). With ``answer``: the full exchange and ``labels``
    that are ``-100`` on the prompt, so only the answer tokens (and the end-of-turn) are learned. With
    ``follow_ups`` (``(prompt, answer)`` turns after the first answer): the whole conversation, every answer
    labelled (:func:`encode_conversation`)."""
    if follow_ups:
        if answer is None:
            raise ValueError("follow_ups need the first turn's answer")
        return encode_conversation(processor, inp, answer, follow_ups)
    prompt_text = render(processor, inp)
    images = inp.images or None
    prompt = processor(images=images, text=[prompt_text], return_tensors="pt")
    out = {k: v for k, v in prompt.items()}
    if answer is not None:
        full = processor(images=images, text=[render(processor, inp, answer=answer)], return_tensors="pt")
        n_prompt = prompt["input_ids"].shape[1]
        if not torch.equal(full["input_ids"][0, :n_prompt], prompt["input_ids"][0]):
            raise ValueError("the chat template's full exchange does not start with its generation prompt")
        out = {k: v for k, v in full.items()}
        labels = full["input_ids"][0].clone()
        labels[:n_prompt] = IGNORE_INDEX
        out["labels"] = labels[None]
    return {k: (v[0] if _per_token(v, out["input_ids"]) else v) for k, v in out.items()}


def encode_conversation(
    processor: ProcessorMixin, inp: ReaderInput, answer: str, follow_ups: Sequence[tuple[str, str]]
) -> dict[str, Tensor]:
    """A multi-turn training example: ``inp`` answered with ``answer``, then each ``(prompt, answer)`` of
    ``follow_ups`` as a text-only turn; ``labels`` hold every answer's tokens (and end-of-turn), ``-100`` elsewhere.

    The conversation is rendered and run through the processor once; each answer's characters (between the
    conversation up to its question, with the generation prompt, and up to its answer) are mapped to tokens
    with the tokenizer's offsets. The processor only expands the images, which all come before the first answer,
    so the answers' tokens sit at the same offset from the end in both encodings (checked token by token)."""
    messages = inp.messages(answer, follow_ups)
    text = _apply_template(processor, messages, generation_prompt=False)
    spans = []
    for turn in range(1, len(messages), 2):
        prompt = _apply_template(processor, messages[:turn], generation_prompt=True)
        full = _apply_template(processor, messages[: turn + 1], generation_prompt=False)
        if not (full.startswith(prompt) and text.startswith(full)):
            raise ValueError("the chat template's conversation does not extend its turns' generation prompts")
        spans.append((len(prompt), len(full)))
    out = {k: v for k, v in processor(images=inp.images or None, text=[text], return_tensors="pt").items()}
    plain = processor.tokenizer(text, return_offsets_mapping=True)
    ids = out["input_ids"][0]
    shift = int(ids.shape[0]) - len(plain["input_ids"])
    labels = torch.full_like(ids, IGNORE_INDEX)
    for position, (token, (begin, _)) in enumerate(zip(plain["input_ids"], plain["offset_mapping"], strict=True)):
        if any(lo <= begin < hi for lo, hi in spans):
            if int(ids[position + shift]) != token:
                raise ValueError(
                    "the processor's encoding of the conversation differs from its tokenizer's around the answers; "
                    "put every image in the first turn"
                )
            labels[position + shift] = token
    out["labels"] = labels[None]
    return {k: (v[0] if _per_token(v, out["input_ids"]) else v) for k, v in out.items()}


def _per_token(value: Tensor, input_ids: Tensor) -> bool:
    """Whether a processor output holds one value per prompt token (``[1, L]`` like ``input_ids``):
    ``attention_mask``, Qwen2-VL's ``mm_token_type_ids``, ``token_type_ids``, ..."""
    return isinstance(value, Tensor) and value.dim() == 2 and tuple(value.shape) == tuple(input_ids.shape)


def collate(examples: Sequence[Mapping[str, Tensor]], pad: int) -> dict[str, Tensor]:
    """Left-pad every per-token tensor (the 1-D ones :func:`encode` returns: ``input_ids``, ``attention_mask``,
    ``labels`` and whatever else the processor gives per token, e.g. Qwen2-VL's ``mm_token_type_ids``, padded
    with 0); concatenate the image tensors (``pixel_values``, ``image_grid_thw``, ...) in example order."""
    keys = set(examples[0])
    odd = [sorted(keys ^ set(e)) for e in examples if set(e) != keys]
    if odd:
        raise ValueError(
            f"examples of one batch have different inputs ({odd[0]}): batch prompts with images apart from "
            "prompts without them"
        )
    width = max(int(e["input_ids"].shape[0]) for e in examples)
    fill = {"input_ids": pad, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch: dict[str, Tensor] = {}
    for key in examples[0]:
        if examples[0][key].dim() == 1:
            value = fill.get(key, 0)
            rows = [torch.nn.functional.pad(e[key], (width - e[key].shape[0], 0), value=value) for e in examples]
            batch[key] = torch.stack(rows)
        else:
            batch[key] = torch.cat(_padded_images([e[key] for e in examples]), dim=0)
    return batch


def _padded_images(values: Sequence[Tensor]) -> list[Tensor]:
    """Per-example image stacks ``[1, n_images, ...]`` of different ``n_images`` (Idefics3 / SmolVLM split each
    image into a number of crops that depends on its size) zero-padded to the largest, as the processor pads a
    batch itself (the model drops all-zero images; their ``pixel_attention_mask`` rows are 0). Tensors with one
    row per patch or per image (LLaVA's ``[1, C, H, W]``, Qwen2-VL's ``[patches, dim]``) are returned as they are."""
    shapes = {tuple(v.shape[1:]) for v in values}
    if len(shapes) == 1 or any(v.shape[0] != 1 for v in values):
        return list(values)
    if len({v.dim() for v in values}) != 1:
        raise ValueError(f"image tensors of one batch have different ranks: {sorted(shapes)}")
    target = [max(size) for size in zip(*shapes, strict=True)]
    out = []
    for v in values:
        pad: list[int] = []
        for have, want in zip(reversed(v.shape[1:]), reversed(target), strict=True):
            pad += [0, want - have]
        out.append(torch.nn.functional.pad(v, pad, value=0))
    return out


_OWN_POSITIONS = ("qwen2_vl", "qwen2_5_vl")
"""Models that derive their (multimodal rope) positions from the attention mask themselves."""


def to_model(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` on the model's device, floating tensors (pixel values) in its floating dtype."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    return {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
            for k, v in batch.items()}


def with_positions(model: PreTrainedModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add ``position_ids`` that start at 0 on each row's first real token: a plain forward numbers positions
    from the first column, so without them a left-padded row would be scored at shifted positions and its
    answer would depend on the batch it is in."""
    if getattr(model.config, "model_type", "") in _OWN_POSITIONS or "attention_mask" not in batch:
        return batch
    positions = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return {**batch, "position_ids": positions}


def answer_loss(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the ``labels`` that are not ``IGNORE_INDEX`` (the answer tokens), with
    the language-model head run only from the first labelled position on (``logits_to_keep``): a prompt of
    retrieved reports is hundreds of tokens, the answer a few, and the head over every prompt position is a
    third of a training step on the tiny reader. Equal to the model's own ``loss`` (tested)."""
    labels = batch["labels"]
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any()):
        raise ValueError("batch has no answer token to learn (every label is IGNORE_INDEX); check the examples")
    first = int(labelled.float().argmax(dim=1)[labelled.any(dim=1)].min())
    keep = labels.shape[1] - first + 1  # the logit at position i predicts token i + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits[:, :-1]
    targets = labels[:, labels.shape[1] - keep + 1 :]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


@dataclass(frozen=True)
class ClosedScores:
    """Probabilities over ``choices`` per input (``probs`` ``[B, C]``, rows sum to 1) and the argmax answers."""

    choices: tuple[str, ...]
    probs: np.ndarray

    @property
    def answers(self) -> list[str]:
        return [self.choices[i] for i in self.probs.argmax(axis=1)]


class ReaderEngine:
    """A loaded reader (model + processor) that scores closed questions and generates, in batches.

    Args:
        model, processor: from :func:`medrag_ray.models.reader.load_reader` or ``build_tiny_reader``.
        batch_size: inputs per forward pass.
    """

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.pad = pad_id(processor)
        self._choice_ids: dict[tuple[str, ...], list[list[int]]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batch(self, inputs: Sequence[ReaderInput]) -> dict[str, Tensor]:
        return to_model(self.model, collate([encode(self.processor, inp) for inp in inputs], self.pad))

    def choice_ids(self, choices: Sequence[str]) -> list[list[int]]:
        key = tuple(choices)
        if key not in self._choice_ids:
            self._choice_ids[key] = choice_token_ids(self.processor, key)
        return self._choice_ids[key]

    def _ifa_scope(
        self,
        inputs: Sequence[ReaderInput],
        batch: Mapping[str, Tensor],
        ifa: IFASettings | None,
        specs: Sequence[IFASpec | None] | None,
    ) -> contextlib.AbstractContextManager[object]:
        """The IFA context of one left-padded batch (a no-op without ``ifa``)."""
        if ifa is None:
            return contextlib.nullcontext()
        from medrag_ray.reader.ifa import batch_ifa_matrix, enable_ifa, ifa_context

        enable_ifa(self.model)
        mask = batch["attention_mask"]
        ids = [row[mask_row.bool()].tolist() for row, mask_row in zip(batch["input_ids"], mask, strict=True)]
        matrix = batch_ifa_matrix(self.processor, inputs, specs or [], ifa, int(mask.shape[1]), input_ids=ids)
        return ifa_context(ifa, matrix)

    @staticmethod
    def _check_ifa(inputs: Sequence[ReaderInput], ifa: object, specs: Sequence[object] | None) -> None:
        if ifa is None and specs is not None:
            raise ValueError("ifa_specs given without ifa; pass ifa=IFASettings(layers=...) to apply them")
        if ifa is not None and (specs is None or len(specs) != len(inputs)):
            raise ValueError(
                f"ifa needs ifa_specs with one IFASpec (or None) per input: {len(inputs)} inputs, "
                f"{'no' if specs is None else len(specs)} specs"
            )

    @torch.inference_mode()
    def score_closed(
        self,
        inputs: Sequence[ReaderInput],
        choices: Sequence[str] = ("yes", "no"),
        ifa: IFASettings | None = None,
        ifa_specs: Sequence[IFASpec | None] | None = None,
    ) -> ClosedScores:
        """p(choice | input) from the next-token logits after each prompt: one forward pass per batch (with
        ``ifa``: MR-RAG's IFA in its layers, from each input's ``ifa_specs`` entry; None = no bias there)."""
        self._check_ifa(inputs, ifa, ifa_specs)
        ids = self.choice_ids(choices)
        rows: list[np.ndarray] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            batch = self._batch(chunk)
            specs = ifa_specs[start : start + self.batch_size] if ifa_specs is not None else None
            with self._ifa_scope(chunk, batch, ifa, specs):
                logits = self.model(**with_positions(self.model, batch)).logits[:, -1].float()
            per_choice = torch.stack([torch.logsumexp(logits[:, v], dim=-1) for v in ids], dim=-1)
            rows.append(torch.softmax(per_choice, dim=-1).cpu().numpy())
        probs = np.concatenate(rows) if rows else np.zeros((0, len(ids)), dtype=np.float32)
        return ClosedScores(tuple(choices), probs)

    @torch.inference_mode()
    def generate(
        self,
        inputs: Sequence[ReaderInput],
        max_new_tokens: int = 64,
        ifa: IFASettings | None = None,
        ifa_specs: Sequence[IFASpec | None] | None = None,
    ) -> list[str]:
        """Greedy answers (decoded new tokens, special tokens dropped, stripped) for open questions and reports
        (with ``ifa``: the prompt's prefill runs with MR-RAG's IFA; the decode steps attend as usual)."""
        self._check_ifa(inputs, ifa, ifa_specs)
        out: list[str] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            batch = self._batch(chunk)
            specs = ifa_specs[start : start + self.batch_size] if ifa_specs is not None else None
            with self._ifa_scope(chunk, batch, ifa, specs):
                tokens = self.model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad
                )
            new = tokens[:, batch["input_ids"].shape[1] :]
            out.extend(t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


def fuse_candidate_probs(candidate_probs: np.ndarray, retriever_probs: np.ndarray) -> np.ndarray:
    """JOMED inference by logit fusion: p(a|q) = Σ_k p(a | (i_k, t_k)∘q) · p_R(k|q).

    ``candidate_probs`` ``[B, K, C]`` (the reader's answer distribution with candidate k prepended),
    ``retriever_probs`` ``[B, K]`` (the retriever's distribution over the K candidates; rows sum to 1).
    """
    cand = np.asarray(candidate_probs, dtype=np.float64)
    pr = np.asarray(retriever_probs, dtype=np.float64)
    if cand.ndim != 3 or pr.shape != cand.shape[:2]:
        raise ValueError(f"candidate_probs {cand.shape} must be [B, K, C] and retriever_probs {pr.shape} [B, K]")
    if not np.allclose(pr.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("retriever_probs rows must sum to 1 (softmax the retrieval scores over the K candidates)")
    return np.einsum("bkc,bk->bc", cand, pr)
