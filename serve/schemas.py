"""Pydantic schemas of the HTTP API (what ``/openapi.json`` and ``/docs`` show).

Validation of the values themselves is :func:`medrag_ray.serving.query.parse_query` (shared with the one-process
answerer); these models document the shapes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class AnswerRequest(BaseModel):
    """``POST /v1/answer`` as JSON. As ``multipart/form-data`` the same fields are form fields and the image is a
    file part named ``image`` (``image/png`` or ``image/jpeg``)."""

    image_base64: str = Field(description="The PNG or JPEG file, base64-encoded (a data: URL prefix is accepted)")
    question: str = Field("", description="The question; required for closed and open tasks")
    task: Literal["closed", "open", "report"] = "closed"
    k: int | None = Field(None, ge=1, description="Top-K documents retrieved (adaptive-k keeps a prefix of them)")
    adaptive: Literal["gap", "ratio", "none"] | None = Field(
        None, description="gap: MMed-RAG's rule; ratio: the reference code's; none: keep all k")
    fusion: Literal["concat", "jomed"] = Field(
        "concat", description="concat: kept documents in one prompt; jomed: JOMED logit fusion (closed only)")
    ifa: bool = Field(False, description="MR-RAG's attention bias from question to retrieved documents")
    choices: list[str] | None = Field(None, description="Answers of a closed question (default [yes, no])")
    domain: str | None = Field(None, description="Skip the router and use this indexed domain")
    max_new_tokens: int = Field(64, ge=1, description="Longest open answer or report")


class EvidenceItem(BaseModel):
    id: str
    text: str
    score: float
    rank: int
    kept: bool = Field(description="Kept by adaptive-k (concat) or used as a candidate (jomed)")
    weight: float | None = Field(None, description="JOMED's p_R(k|q)")


class Consistency(BaseModel):
    consistent: bool = Field(description="Whether every retrieved document alone leads to the same answer")
    candidate_answers: list[str]


class AnswerResponse(BaseModel):
    answer: str
    task: str
    probabilities: dict[str, float] | None = Field(None, description="Per-class probabilities (closed questions)")
    domain: str = Field(description="The indexed domain retrieved from, or 'unknown' when the router could not place "
                        "the image in one (then nothing is retrieved and the reader answers from the image alone)")
    domain_confidence: float | None = Field(None, description="The router's calibrated probability of its top domain; "
                                            "null if domain was given")
    evidence: list[EvidenceItem]
    k_kept: int
    fusion: str
    retriever: str = Field(description="fine-tuned (the index's retriever), jomed (distilled heads) or none "
                           "(domain 'unknown')")
    ifa: bool
    consistency: Consistency | None
    reader: str
    timings_ms: dict[str, float]


class ErrorDetail(BaseModel):
    status: int
    field: str
    message: str


class ErrorResponse(BaseModel):
    detail: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    domains: list[str]
    deployments: dict[str, str]
