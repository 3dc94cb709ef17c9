"""MR-RAG's Importance-aware Information Flow Augmentation (IFA) in the reader's attention.

MR-RAG (``papers/mr-rag.txt``, Key Design 2) modulates, in a few *critical* decoder layers L only, the attention
logits Ã = q·kᵀ·scaling (before the causal / padding mask and the softmax) from the question tokens Q to the tokens
D_k of each retrieved document k:

    Ã'_ij = Ã_ij + λ_ij · |Ã_ij|,   λ_ij = strength · Score_k  if i ∈ Q and j ∈ D_k, else 0,

where Score_k ∈ [0, 1] is the min-max normalised retrieval (fusion) score of document k over the documents of
that input (:func:`minmax_relevance`). Multiplying by |Ã_ij| scales the bias with the attention's own magnitude.
The critical layers are found by *attention blocking* (``mode="block"``): question -> document logits set to
-inf in one layer, and the change of the reader's closed answers measured (:mod:`medrag_ray.eval.ifa_layers`).

How it plugs into transformers: :func:`enable_ifa` switches the *language model's* attention (never the vision
tower's) to :func:`ifa_attention_forward`, registered in transformers' ``AttentionInterface`` (with sdpa's mask
function). The per-forward state -- λ (or the block mask) ``[B, L, L]`` of the batch, the layers, the mode -- lives
in a :class:`contextvars.ContextVar` set by :func:`ifa_context`. Outside the context, in a layer not in
``layers`` and whenever the query or key length differs from λ's (the decode steps of ``generate``: only the
prefill is modulated, as the cached keys already carry it) the function is exactly sdpa.

Token positions (:func:`token_spans`) are those of ``engine.encode``'s ``input_ids`` (after each ``<image>`` is
expanded into the model's image tokens); :func:`batch_ifa_matrix` shifts them by each row's left padding.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel, ProcessorMixin
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from medrag_ray.reader.engine import encode, render
from medrag_ray.reader.prompts import ReaderInput

logger = logging.getLogger(__name__)

IFA_ATTENTION = "medrag_ifa"
"""The name :func:`ifa_attention_forward` is registered under in transformers' ``AttentionInterface``."""

IFA_MODES: tuple[str, ...] = ("bias", "block")

REPORT_QUESTION = "Please generate a report based on the image."
"""What Q is for the report prompt (it has no question): the final instruction sentence of
:func:`medrag_ray.reader.prompts.report_prompt`; pass it as :attr:`IFASpec.question` for report inputs."""


# ----------------------------------------------------------------------------------------- settings


def minmax_relevance(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """MR-RAG's Score_k: the documents' retrieval scores min-max normalised to [0, 1] over one input.

    All scores equal (including a single document) gives every Score_k = 1: no document is less relevant than
    another, so each keeps the full bias. No scores gives an empty array.
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError(f"scores {values.tolist()} must be finite; drop or clip non-finite retrieval scores")
    if values.size == 0:
        return values
    low, high = values.min(), values.max()
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return np.ones_like(values)
    return (values - low) / (high - low)


@dataclass(frozen=True)
class IFASpec:
    """One reader input's IFA roles: the text that is Q and the retrieved documents D_k with their scores.

    ``question`` is searched (its last occurrence, stripped) in the rendered prompt; for a report prompt, which
    has no question, pass :data:`REPORT_QUESTION`. ``doc_texts`` are the retrieved texts in prompt order (as
    given to ``closed_rag_prompt`` / ``jomed_input``; they are stripped like the prompts strip them) and
    ``doc_scores`` their retrieval scores (MR-RAG: the MCR fusion score), min-max normalised per input.
    """

    question: str
    doc_texts: tuple[str, ...] = ()
    doc_scores: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("IFASpec.question is empty; pass the question text (REPORT_QUESTION for reports)")
        object.__setattr__(self, "doc_texts", tuple(self.doc_texts))
        object.__setattr__(self, "doc_scores", tuple(float(s) for s in self.doc_scores))
        if len(self.doc_texts) != len(self.doc_scores):
            raise ValueError(
                f"IFASpec.doc_texts ({len(self.doc_texts)}) and doc_scores ({len(self.doc_scores)}) must have the "
                "same length: one retrieval score per document"
            )
        if not all(math.isfinite(s) for s in self.doc_scores):
            raise ValueError(f"IFASpec.doc_scores {list(self.doc_scores)} must be finite; clip or drop them")
        empty = [i for i, t in enumerate(self.doc_texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise ValueError(f"IFASpec.doc_texts {empty} are empty; drop empty documents from the prompt and spec")


@dataclass(frozen=True)
class IFASettings:
    """Where and how IFA acts: decoder ``layers`` (0-based, the critical layers), ``strength`` (scales λ), and
    ``mode``: ``bias`` (MR-RAG's Ã + λ|Ã|) or ``block`` (question -> document logits -inf: the critical-layer
    experiment; ``strength`` is unused there)."""

    layers: tuple[int, ...]
    strength: float = 1.0
    mode: Literal["bias", "block"] = "bias"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("IFASettings.layers is empty; name the critical decoder layers, e.g. layers=(1,)")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.layers):
            raise ValueError(f"IFASettings.layers {list(self.layers)} must be decoder layer indices >= 0")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"IFASettings.layers {list(self.layers)} has duplicates; list each layer once")
        if not (isinstance(self.strength, (int, float)) and math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"IFASettings.strength must be a finite number >= 0, got {self.strength!r}")
        if self.mode not in IFA_MODES:
            raise ValueError(f"IFASettings.mode must be one of {list(IFA_MODES)}, got {self.mode!r}")


# ------------------------------------------------------------------------------------- token spans


@dataclass(frozen=True)
class TokenSpans:
    """Positions in ``encode(processor, inp)["input_ids"]`` of the question and of each document."""

    question: tuple[int, ...]
    docs: tuple[tuple[int, ...], ...]
    length: int
    """Length of the encoded input (``input_ids``)."""


def char_spans(text: str, spec: IFASpec) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Character spans in the rendered prompt ``text`` of the question (last occurrence) and of each document
    (in order, each after the previous). ValueError names the text that is not in the prompt."""
    docs: list[tuple[int, int]] = []
    cursor = 0
    for k, doc in enumerate(spec.doc_texts):
        needle = doc.strip()
        at = text.find(needle, cursor)
        if at < 0:
            raise ValueError(f"document {k} {needle[:60]!r} is not in the rendered prompt (after the previous one); "
                             "pass the retrieved texts in the order the prompt lists them")
        docs.append((at, at + len(needle)))
        cursor = at + len(needle)
    needle = spec.question.strip()
    at = text.rfind(needle)
    if at < 0:
        raise ValueError(f"question {needle[:60]!r} is not in the rendered prompt; pass the prompt's question text "
                         f"(for a report prompt: {REPORT_QUESTION!r})")
    return (at, at + len(needle)), docs


def _expansions(ids: Sequence[int], plain: Sequence[int], image_id: int) -> list[int]:
    """How many of the processor's ``ids`` each ``<image>`` placeholder of the ``plain`` encoding became.

    The text between placeholders is the same in both encodings; what the processor puts in a placeholder's
    place differs per architecture (LLaVA: N image tokens; Qwen2-VL: N ``<|image_pad|>``; Idefics3: crops of
    image tokens framed by ``<fake_token_around_image>`` and ``<row_i_col_j>``), so each expansion is what lies
    between the text before and the text after it. Adjacent placeholders share one run: equal shares."""
    holes = [i for i, t in enumerate(plain) if t == image_id]
    bounds = [-1, *holes, len(plain)]
    texts = [list(plain[a + 1 : b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    if list(ids[: len(texts[0])]) != texts[0]:
        raise ValueError("the processor's input_ids do not start with the rendered prompt's text")
    cursor, runs = len(texts[0]), []
    pending = 0  # placeholders whose expansion is still open (adjacent ones)
    for k, text in enumerate(texts[1:], start=1):
        pending += 1
        if not text and k < len(texts) - 1:
            continue
        last = k == len(texts) - 1
        at = len(ids) - len(text) if last else _find(ids, text, cursor)
        if at < cursor or list(ids[at : at + len(text)]) != text:
            raise ValueError("the processor's input_ids do not hold the rendered prompt's text around its images")
        gap = at - cursor
        if gap % pending:
            raise ValueError(f"{pending} adjacent images expanded into {gap} tokens; cannot align them")
        runs.extend([gap // pending] * pending)
        cursor, pending = at + len(text), 0
    return runs


def _find(ids: Sequence[int], text: Sequence[int], start: int) -> int:
    """The first position at or after ``start`` where ``text`` occurs in ``ids`` (-1: nowhere)."""
    n = len(text)
    for i in range(start, len(ids) - n + 1):
        if list(ids[i : i + n]) == list(text):
            return i
    return -1


def _image_token_id(processor: ProcessorMixin) -> int:
    value = getattr(processor, "image_token_id", None)
    if value is None:
        token = getattr(processor, "image_token", None) or "<image>"
        value = processor.tokenizer.convert_tokens_to_ids(token)
    return int(value)


def expanded_token_chars(
    processor: ProcessorMixin, inp: ReaderInput, input_ids: Sequence[int] | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """``(input_ids, char offsets)``: the processor's ``input_ids`` of ``inp`` (``encode``'s, or ``input_ids``
    when the caller has encoded it already) and, per position, the character span in the rendered prompt
    (``(0, 0)`` for special tokens; an image token's span for each of its expansions)."""
    text = render(processor, inp)
    ids = [int(i) for i in input_ids] if input_ids is not None else encode(processor, inp)["input_ids"].tolist()
    tok = processor.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ValueError("IFA token spans need a fast tokenizer (offset mapping); load the reader with use_fast=True")
    plain = tok(text, return_offsets_mapping=True)
    image_id = _image_token_id(processor)
    try:
        runs = iter(_expansions(ids, plain["input_ids"], image_id))
    except ValueError as exc:
        raise ValueError(
            f"the tokenizer's encoding of the rendered prompt, with each <image> expanded, differs from the "
            f"processor's input_ids ({exc}); IFA cannot locate the question and documents for this processor"
        ) from exc
    offsets: list[tuple[int, int]] = []
    for t, span in zip(plain["input_ids"], plain["offset_mapping"], strict=True):
        offsets.extend([tuple(span)] * (next(runs) if t == image_id else 1))
    if len(offsets) != len(ids):
        raise ValueError("the aligned prompt and the processor's input_ids differ in length; IFA cannot align them")
    return ids, offsets


def token_spans(
    processor: ProcessorMixin, inp: ReaderInput, spec: IFASpec, input_ids: Sequence[int] | None = None
) -> TokenSpans:
    """The token positions of ``spec``'s question and documents in ``encode(processor, inp)["input_ids"]``.

    A token belongs to a span when its characters overlap it. Works for both prompt styles: ``mmed`` (reports
    numbered inside the prompt) and ``jomed`` ("Reference i: text" parts before the query). ``input_ids``:
    ``encode``'s ids of ``inp`` when already computed (checked against the prompt, not trusted).
    """
    ids, offsets = expanded_token_chars(processor, inp, input_ids)
    question, docs = char_spans(render(processor, inp), spec)

    def positions(span: tuple[int, int]) -> tuple[int, ...]:
        return tuple(i for i, (s, e) in enumerate(offsets) if e > s and s < span[1] and e > span[0])

    return TokenSpans(positions(question), tuple(positions(d) for d in docs), len(ids))


# --------------------------------------------------------------------------------------- λ matrices


def ifa_lambda(
    seq_len: int,
    q_positions: Sequence[int],
    doc_positions: Sequence[Sequence[int]],
    relevance: Sequence[float] | np.ndarray,
    strength: float,
) -> Tensor:
    """MR-RAG's λ ``[seq_len, seq_len]`` (float32): λ_ij = strength · relevance_k for i ∈ Q, j ∈ D_k, else 0."""
    if len(doc_positions) != len(relevance):
        raise ValueError(f"{len(doc_positions)} documents but {len(relevance)} relevance values; give one each")
    lam = torch.zeros(seq_len, seq_len, dtype=torch.float32)
    rows = torch.as_tensor(list(q_positions), dtype=torch.long)
    for cols, score in zip(doc_positions, relevance, strict=True):
        if len(rows) and len(cols):
            lam[rows[:, None], torch.as_tensor(list(cols), dtype=torch.long)[None, :]] = float(strength) * float(score)
    return lam


def block_matrix(seq_len: int, q_positions: Sequence[int], doc_positions: Sequence[Sequence[int]]) -> Tensor:
    """``[seq_len, seq_len]`` bool: True where question token i may not attend document token j (blocking)."""
    return ifa_lambda(seq_len, q_positions, doc_positions, [1.0] * len(doc_positions), 1.0) > 0


def _shift(spans: TokenSpans, pad: int) -> tuple[list[int], list[list[int]]]:
    return [p + pad for p in spans.question], [[p + pad for p in d] for d in spans.docs]


def batch_ifa_matrix(
    processor: ProcessorMixin,
    inputs: Sequence[ReaderInput],
    specs: Sequence[IFASpec | None],
    settings: IFASettings,
    width: int,
    input_ids: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """λ ``[B, width, width]`` (``bias``) or the block mask (``block``, bool) of a left-padded batch of ``width``
    columns: each row's positions shifted by its padding; a None spec leaves its row without modulation.
    ``input_ids``: each input's unpadded ``encode`` ids when the caller has them (saves encoding again)."""
    if len(inputs) != len(specs):
        raise ValueError(f"{len(inputs)} inputs but {len(specs)} IFA specs; pass one spec (or None) per input")
    ids_per_row = list(input_ids) if input_ids is not None else [None] * len(inputs)
    rows: list[Tensor] = []
    for inp, spec, ids in zip(inputs, specs, ids_per_row, strict=True):
        if spec is None:
            rows.append(torch.zeros(width, width))
            continue
        spans = token_spans(processor, inp, spec, ids)
        if spans.length > width:
            raise ValueError(f"an input of {spans.length} tokens does not fit the batch width {width}")
        q, docs = _shift(spans, width - spans.length)
        if settings.mode == "block":
            rows.append(block_matrix(width, q, docs).float())
        else:
            rows.append(ifa_lambda(width, q, docs, minmax_relevance(spec.doc_scores), settings.strength))
    out = torch.stack(rows)
    return out > 0 if settings.mode == "block" else out


# ------------------------------------------------------------------------------- attention function


@dataclass(frozen=True)
class IFAState:
    """What :func:`ifa_attention_forward` reads during one forward: the settings and λ / the block mask."""

    settings: IFASettings
    matrix: Tensor
    """``[B, L, L]``: λ (float, ``bias``) or True where blocked (bool, ``block``)."""


_STATE: ContextVar[IFAState | None] = ContextVar("medrag_ifa_state", default=None)


@contextlib.contextmanager
def ifa_context(settings: IFASettings, matrix: Tensor) -> Iterator[IFAState]:
    """Run the forwards inside with IFA: ``matrix`` is :func:`batch_ifa_matrix`'s ``[B, L, L]`` for the batch."""
    if matrix.ndim != 3 or matrix.shape[1] != matrix.shape[2]:
        raise ValueError(f"the IFA matrix must be [B, L, L], got {tuple(matrix.shape)}")
    if settings.mode == "block" and matrix.dtype != torch.bool:
        raise ValueError("mode=block needs a bool block matrix (batch_ifa_matrix with the same settings)")
    state = IFAState(settings, matrix)
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


def _active(module: torch.nn.Module, query: Tensor, key: Tensor) -> IFAState | None:
    state = _STATE.get()
    if state is None or getattr(module, "layer_idx", None) not in state.settings.layers:
        return None
    size = state.matrix.shape[-1]
    if query.shape[2] != size or key.shape[2] != size or query.shape[0] != state.matrix.shape[0]:
        return None  # a decode step (or another forward): only the prefill is modulated
    return state


def additive_mask(attention_mask: Tensor | None, q_len: int, k_len: int, like: Tensor) -> Tensor:
    """The sdpa mask as an additive float mask ``[B|1, 1, q_len, k_len]`` (None: causal, as sdpa's is_causal)."""
    if attention_mask is None:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=like.device).tril(k_len - q_len)[None, None]
    elif attention_mask.dtype == torch.bool:
        keep = attention_mask[..., :k_len]
    else:
        return attention_mask[..., :k_len].to(like.dtype)
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(keep, zero, torch.finfo(like.dtype).min)


def ifa_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Attention with MR-RAG's IFA: softmax(Ã + λ|Ã| + mask)·v (``bias``) or with question -> document logits
    -inf (``block``) in the layers of the active :func:`ifa_context`; plain sdpa everywhere else.

    ``query`` ``[B, H, Q, d]``, ``key``/``value`` ``[B, H_kv, K, d]`` (grouped heads repeated), returns
    ``([B, Q, H, d], attention weights or None)`` as transformers' attention functions do.
    """
    state = _active(module, query, key)
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key_states, value_states = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query, key_states.transpose(2, 3)) * scale
    matrix = state.matrix.to(logits.device)[:, None]
    if state.settings.mode == "block":
        logits = logits.masked_fill(matrix, float("-inf"))
    else:
        logits = logits + matrix.to(logits.dtype) * logits.abs()
    logits = logits + additive_mask(attention_mask, query.shape[2], key.shape[2], logits)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value_states).transpose(1, 2).contiguous(), weights


AttentionInterface.register(IFA_ATTENTION, ifa_attention_forward)
AttentionMaskInterface.register(IFA_ATTENTION, sdpa_mask)


def text_config(model: PreTrainedModel) -> Any:
    """The language model's config (``text_config`` of a VLM, the config itself otherwise)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def num_decoder_layers(model: PreTrainedModel) -> int:
    """How many decoder layers the reader's language model has (the layers IFA can act in)."""
    return int(text_config(model).num_hidden_layers)


def enable_ifa(model: PreTrainedModel) -> PreTrainedModel:
    """Switch the language model's attention to :func:`ifa_attention_forward` (idempotent; the vision tower
    keeps its own). Outside :func:`ifa_context` the model computes what it did with sdpa."""
    config = text_config(model)
    if config._attn_implementation == IFA_ATTENTION:
        return model
    if config is model.config:
        model.set_attn_implementation(IFA_ATTENTION)
    else:
        model.set_attn_implementation({"text_config": IFA_ATTENTION})
    if text_config(model)._attn_implementation != IFA_ATTENTION:
        raise RuntimeError(f"could not switch {type(model).__name__}'s text attention to {IFA_ATTENTION}")
    logger.info("IFA attention enabled on %s's language model", type(model).__name__)
    return model
