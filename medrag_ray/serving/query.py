"""What a client asks: the validated :class:`AnswerQuery` of one ``POST /v1/answer``.

Validation happens here (not only in the HTTP schema) so the one-process :class:`LocalAnswerer`, the Serve
ingress and the tests refuse the same inputs with the same :class:`~medrag_ray.serving.images.InputError`.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Collection, Mapping
from typing import Any

from medrag_ray.config import SERVE_FUSIONS, SERVE_TASKS, ServeLimits
from medrag_ray.reader.answers import YES_NO
from medrag_ray.retrieval.retrieval_config import ADAPTIVE_RULES
from medrag_ray.serving.images import InputError

__all__ = ["AnswerQuery", "QUERY_FIELDS", "clean_text", "parse_query"]

_ALLOWED_CONTROL = {"\n", "\t", "\r"}


def clean_text(value: object, field: str, max_chars: int, *, required: bool) -> str:
    """``value`` stripped, NFC-normalized; 422 for non-text, unencodable (lone surrogates) or control characters,
    text longer than ``max_chars``, or empty text when ``required``."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputError(422, field, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(422, field, "is not valid Unicode text (it holds lone surrogates); send UTF-8 text") from None
    text = unicodedata.normalize("NFC", value).strip()
    bad = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn")
                  and c not in _ALLOWED_CONTROL})
    if bad:
        raise InputError(422, field, f"holds control, private or unassigned characters {bad[:5]}; remove them")
    if len(text) > max_chars:
        raise InputError(422, field, f"is {len(text)} characters long; the limit is {max_chars}")
    if required and not text:
        raise InputError(422, field, "is empty; closed and open questions need the question text")
    return text


@dataclasses.dataclass(frozen=True)
class AnswerQuery:
    """One question about one image (the image travels separately, as bytes).

    ``task``: ``closed`` (answer among ``choices``, with per-class probabilities), ``open`` (free text) or
    ``report`` (report generation; no question needed). ``k`` / ``adaptive`` override the server's retrieval
    (``adaptive="none"`` keeps all k); ``fusion``: ``concat`` puts the kept documents in one prompt, ``jomed``
    scores each candidate alone and fuses by JOMED's logit fusion (closed only). ``ifa``: MR-RAG's attention
    bias. ``domain`` skips the router.
    """

    question: str = ""
    task: str = "closed"
    k: int | None = None
    adaptive: str | None = None
    fusion: str = "concat"
    ifa: bool = False
    choices: tuple[str, ...] = YES_NO
    domain: str | None = None
    max_new_tokens: int = 64


QUERY_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AnswerQuery))


def _int(value: object, field: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InputError(422, field, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _bool(value: object, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise InputError(422, field, f"must be true or false, got {value!r}")


def _choice(value: object, field: str, allowed: Collection[str]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in allowed:
        raise InputError(422, field, f"must be one of {sorted(allowed)}, got {value!r}")
    return value.strip().lower()


def _choices(value: object, limits: ServeLimits) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    if not isinstance(value, list | tuple) or not 2 <= len(value) <= limits.max_choices:
        raise InputError(422, "choices", f"must be a list of 2 to {limits.max_choices} answers, got {value!r}")
    out = tuple(clean_text(v, f"choices[{i}]", 32, required=True) for i, v in enumerate(value))
    if len({c.lower() for c in out}) != len(out):
        raise InputError(422, "choices", f"must be distinct, got {list(out)}")
    return out


def parse_query(values: Mapping[str, Any], limits: ServeLimits, domains: Collection[str]) -> AnswerQuery:
    """A validated :class:`AnswerQuery` from request fields (JSON or form values); 422 naming the field."""
    unknown = sorted(set(values) - set(QUERY_FIELDS) - {"image", "image_base64"})
    if unknown:
        raise InputError(422, unknown[0], f"is not a request field; fields are {['image', *QUERY_FIELDS]}")
    task = _choice(values.get("task", "closed") or "closed", "task", SERVE_TASKS)
    question = clean_text(values.get("question"), "question", limits.max_question_chars, required=task != "report")
    k = values.get("k")
    k = None if k in (None, "") else _int(k, "k", 1, limits.max_k)
    adaptive = values.get("adaptive")
    adaptive = None if adaptive in (None, "") else _choice(adaptive, "adaptive", ADAPTIVE_RULES)
    fusion = _choice(values.get("fusion", "concat") or "concat", "fusion", SERVE_FUSIONS)
    if fusion == "jomed" and task != "closed":
        raise InputError(422, "fusion", "jomed logit fusion fuses class probabilities: use it with task=closed")
    choices = YES_NO if values.get("choices") in (None, "", []) else _choices(values["choices"], limits)
    domain = values.get("domain")
    if domain in (None, ""):
        domain = None
    elif not isinstance(domain, str) or domain not in domains:
        raise InputError(422, "domain", f"must be one of the indexed domains {sorted(domains)}, got {domain!r}")
    max_new = values.get("max_new_tokens")
    max_new = 64 if max_new in (None, "") else _int(max_new, "max_new_tokens", 1, limits.max_new_tokens)
    return AnswerQuery(
        question=question, task=task, k=k, adaptive=adaptive, fusion=fusion,
        ifa=_bool(values.get("ifa", False), "ifa"), choices=choices, domain=domain, max_new_tokens=max_new,
    )
