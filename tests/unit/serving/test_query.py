"""Request validation: every field's refusal names the field; the retrieval settings a request maps to."""

from __future__ import annotations

from typing import Any

import pytest

from medrag_ray.config import ServeLimits
from medrag_ray.retrieval.retrieval_config import RetrievalConfig
from medrag_ray.serving.answer import retrieval_config
from medrag_ray.serving.images import InputError
from medrag_ray.serving.query import AnswerQuery, parse_query

LIMITS = ServeLimits(max_question_chars=50, max_k=10, max_new_tokens=32)
DOMAINS = ("pathology", "radiology")


def refused(values: dict[str, Any]) -> InputError:
    with pytest.raises(InputError) as info:
        parse_query(values, LIMITS, DOMAINS)
    return info.value


def test_defaults_and_form_strings_are_parsed() -> None:
    q = parse_query({"question": "  Is there an effusion?  "}, LIMITS, DOMAINS)
    assert q == AnswerQuery(question="Is there an effusion?")
    form = parse_query({"question": "q?", "k": "3", "adaptive": "ratio", "ifa": "true", "choices": "left,right",
                        "domain": "radiology", "max_new_tokens": "8", "task": "CLOSED"}, LIMITS, DOMAINS)
    assert (form.k, form.adaptive, form.ifa, form.choices, form.domain, form.max_new_tokens, form.task) == (
        3, "ratio", True, ("left", "right"), "radiology", 8, "closed")
    report = parse_query({"task": "report"}, LIMITS, DOMAINS)
    assert report.question == "" and report.task == "report"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"question": "q", "task": "segment"}, "task"),
        ({"question": "   "}, "question"),
        ({"task": "open"}, "question"),
        ({"question": "x" * 51}, "question"),
        ({"question": "bad \ud800 surrogate"}, "question"),
        ({"question": "nul \x00 inside"}, "question"),
        ({"question": 42}, "question"),
        ({"question": "q", "k": 0}, "k"),
        ({"question": "q", "k": 11}, "k"),
        ({"question": "q", "k": True}, "k"),
        ({"question": "q", "adaptive": "top"}, "adaptive"),
        ({"question": "q", "fusion": "sum"}, "fusion"),
        ({"question": "q", "task": "open", "fusion": "jomed"}, "fusion"),
        ({"question": "q", "choices": ["yes"]}, "choices"),
        ({"question": "q", "choices": ["yes", "Yes"]}, "choices"),
        ({"question": "q", "choices": ["yes", ""]}, "choices[1]"),
        ({"question": "q", "domain": "dermatology"}, "domain"),
        ({"question": "q", "ifa": "maybe"}, "ifa"),
        ({"question": "q", "max_new_tokens": 33}, "max_new_tokens"),
        ({"question": "q", "image_path": "/etc/passwd"}, "image_path"),
    ],
)
def test_each_bad_field_is_a_422_naming_it(values: dict[str, Any], field: str) -> None:
    err = refused(values)
    assert err.status == 422 and err.field == field, err


def test_unicode_text_is_accepted_and_normalized() -> None:
    q = parse_query({"question": "Is there a cafe\u0301 sign — 肺 nodule?\n"}, LIMITS, DOMAINS)
    assert q.question == "Is there a caf\u00e9 sign — 肺 nodule?"


def test_request_retrieval_settings() -> None:
    base = RetrievalConfig(k=5, k_max=3, adaptive="gap", gamma=0.1)
    assert retrieval_config(base, AnswerQuery(question="q"), jomed_k=4) is base
    wider = retrieval_config(base, AnswerQuery(question="q", k=8, adaptive="none"), jomed_k=4)
    assert (wider.k, wider.k_max, wider.adaptive, wider.gamma) == (8, None, "none", 0.1)
    narrow = retrieval_config(base, AnswerQuery(question="q", k=1), jomed_k=4)
    assert (narrow.k, narrow.k_max, narrow.k_min) == (1, None, 1)
    jomed = retrieval_config(base, AnswerQuery(question="q", fusion="jomed"), jomed_k=4)
    assert (jomed.k, jomed.mode, jomed.adaptive) == (4, "text", "none")
    assert retrieval_config(base, AnswerQuery(question="q", fusion="jomed", k=2), jomed_k=4).k == 2
