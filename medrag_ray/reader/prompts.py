"""Reader prompts: the MMed-RAG (RULE lineage) wording with retrieved reports, and JOMED's prepended pairs.

A :class:`ReaderInput` is one user turn -- an ordered list of images and text pieces -- rendered through the
reader processor's own chat template (:func:`messages`), so the same input works for the tiny LLaVA and for
a real local VLM (LLaVA-Med in Hugging Face format, Qwen2-VL).

Wording (DESIGN.md, "What MMed-RAG's public reference code does"; identical to the human turns of the
released ``training/alignment/*.json``):

* closed question with k reports: "You are provided with a {image noun}, a image-related question and {k}
  reference report(s): 1. r1 2. r2 \\nPlease answer the question based on the image and report and choose
  from the following two options: [yes, no]. It should be noted that ... Question: {q}"
* closed question without retrieval: "{q} Please answer the question based on the image and choose from the
  following two options: [yes, no]."
* report generation: "You are a professional radiologist. You are provided with an X-ray image and {k}
  reference report(s): ... Please generate a report based on the image. ..."

With zero retrieved reports the retrieval prompts fall back to the no-retrieval wording (adaptive-k may keep
nothing), so no prompt ever announces "0 reference report(s)".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

IMAGE_NOUNS: dict[str, str] = {
    "radiology": "chest X-ray image",
    "ophthalmology": "fundus image",
    "pathology": "pathology image",
    "dermatology": "dermatoscopy image",
}
"""The image noun of the closed-question prompt per domain (MMed-RAG's radiology wording is IU-Xray/MIMIC's)."""

RAG_CAVEAT = (
    "It should be noted that the diagnostic information in the reference reports cannot be directly used as "
    "the basis for diagnosis, but should only be used for reference and comparison."
)


def choice_list(choices: Sequence[str]) -> str:
    """``"two options: [yes, no]"`` -- the options clause of MMed-RAG's closed prompts."""
    counts = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
    if len(choices) < 2:
        raise ValueError(f"choices {list(choices)}: a closed question needs at least two options")
    return f"{counts.get(len(choices), str(len(choices)))} options: [{', '.join(choices)}]"


def numbered(reports: Sequence[str]) -> str:
    """``"1. r1 2. r2 "`` -- the reference list exactly as MMed-RAG's prompts join it."""
    return "".join(f"{i}. {r.strip()} " for i, r in enumerate(reports, start=1))


def closed_prompt(question: str, choices: Sequence[str] = ("yes", "no")) -> str:
    """M(x_v, x_t): the closed question without retrieval."""
    _require_question(question)
    return (
        f"{question.strip()} Please answer the question based on the image and choose from the following "
        f"{choice_list(choices)}."
    )


def closed_rag_prompt(
    question: str,
    reports: Sequence[str],
    domain: str,
    choices: Sequence[str] = ("yes", "no"),
    image_noun: str | None = None,
) -> str:
    """M(x_v, x_t + x_r): the closed question with the retrieved reports numbered in the prompt."""
    if not reports:
        return closed_prompt(question, choices)
    _require_question(question)
    noun = image_noun or IMAGE_NOUNS.get(domain, "medical image")
    return (
        f"You are provided with a {noun}, a image-related question and {len(reports)} reference report(s): "
        f"{numbered(reports)}\nPlease answer the question based on the image and report and choose from the "
        f"following {choice_list(choices)}. {RAG_CAVEAT} Question: {question.strip()}"
    )


def report_prompt(reports: Sequence[str]) -> str:
    """Report generation, with the retrieved reports as references when there are any."""
    if not reports:
        return (
            "You are a professional radiologist. Please generate a report based on the image. Please only "
            "include the content of the report in your response."
        )
    return (
        f"You are a professional radiologist. You are provided with an X-ray image and {len(reports)} reference "
        f"report(s): {numbered(reports)}\nPlease generate a report based on the image. {RAG_CAVEAT} Please only "
        "include the content of the report in your response."
    )


def open_prompt(question: str, reports: Sequence[str] = ()) -> str:
    """An open question, with the retrieved reports as references when there are any."""
    _require_question(question)
    if not reports:
        return f"{question.strip()} Please answer the question based on the image."
    return (
        f"You are provided with a medical image, a image-related question and {len(reports)} reference "
        f"report(s): {numbered(reports)}\nPlease answer the question based on the image and report. {RAG_CAVEAT} "
        f"Question: {question.strip()}"
    )


def _require_question(question: str) -> None:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty; a closed or open prompt needs the question text")


@dataclass(frozen=True)
class ReaderInput:
    """One user turn: images and texts in order (``parts`` holds PIL images and strings)."""

    parts: tuple[Image.Image | str, ...]

    def __post_init__(self) -> None:
        if not any(isinstance(p, str) and p.strip() for p in self.parts):
            raise ValueError("ReaderInput.parts has no text; add the prompt")
        bad = [type(p).__name__ for p in self.parts if not isinstance(p, (str, Image.Image))]
        if bad:
            raise TypeError(f"ReaderInput.parts holds {bad}; only PIL images and strings (decode images first)")

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]

    def messages(
        self, answer: str | None = None, follow_ups: Sequence[tuple[str, str]] = ()
    ) -> list[dict[str, Any]]:
        """The chat messages for ``processor.apply_chat_template`` (with the assistant turn when ``answer``), then
        one user turn and its answer per ``(prompt, answer)`` of ``follow_ups`` (text only: a conversation about
        the same image and context)."""
        content: list[dict[str, Any]] = [
            {"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in self.parts
        ]
        turns: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if answer is not None:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        elif follow_ups:
            raise ValueError("follow_ups need the first turn's answer")
        for prompt, reply in follow_ups:
            turns.append({"role": "user", "content": [{"type": "text", "text": prompt}]})
            turns.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        return turns


def single_image_input(image: Image.Image, prompt: str) -> ReaderInput:
    """The MMed-RAG input: the query image, then the prompt (retrieved reports are inside the prompt)."""
    return ReaderInput((image, prompt))


def jomed_input(image: Image.Image, prompt: str, pairs: Sequence[tuple[Image.Image, str]]) -> ReaderInput:
    """JOMED: each retrieved (image, text) pair prepended to the query, then the query image and prompt."""
    parts: list[Image.Image | str] = []
    for i, (pair_image, text) in enumerate(pairs, start=1):
        parts.extend([pair_image, f"Reference {i}: {text.strip()}"])
    parts.extend([image, prompt])
    return ReaderInput(tuple(parts))
