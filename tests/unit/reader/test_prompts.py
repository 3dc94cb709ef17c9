"""Reader prompts: MMed-RAG's exact wording (checked against the released alignment data) and JOMED's pairs."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medrag_ray.reader.prompts import (
    ReaderInput,
    choice_list,
    closed_prompt,
    closed_rag_prompt,
    jomed_input,
    numbered,
    open_prompt,
    report_prompt,
    single_image_input,
)
from tests.conftest import require

CAVEAT = (
    "It should be noted that the diagnostic information in the reference reports cannot be directly used as "
    "the basis for diagnosis, but should only be used for reference and comparison."
)


def _image(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value, value, value))


def test_closed_rag_prompt_two_reports_exact_wording() -> None:
    got = closed_rag_prompt(
        "  Is there drusen near the macula? ", [" Scattered drusen near the macula.", "Optic disc is normal.  "],
        "ophthalmology",
    )
    expected = (
        "You are provided with a fundus image, a image-related question and 2 reference report(s): "
        "1. Scattered drusen near the macula. 2. Optic disc is normal. \n"
        "Please answer the question based on the image and report and choose from the following two options: "
        "[yes, no]. It should be noted that the diagnostic information in the reference reports cannot be "
        "directly used as the basis for diagnosis, but should only be used for reference and comparison. "
        "Question: Is there drusen near the macula?"
    )
    assert got == expected


def test_closed_rag_prompt_image_nouns_and_choices() -> None:
    assert closed_rag_prompt("Q?", ["r"], "radiology").startswith("You are provided with a chest X-ray image, ")
    assert closed_rag_prompt("Q?", ["r"], "pathology").startswith("You are provided with a pathology image, ")
    assert closed_rag_prompt("Q?", ["r"], "dermatology").startswith("You are provided with a dermatoscopy image, ")
    assert closed_rag_prompt("Q?", ["r"], "elsewhere").startswith("You are provided with a medical image, ")
    assert closed_rag_prompt("Q?", ["r"], "radiology", image_noun="CT slice").startswith(
        "You are provided with a CT slice, "
    )
    three = closed_rag_prompt("Which?", ["r1"], "radiology", choices=("a", "b", "c"))
    assert "choose from the following three options: [a, b, c]. It should" in three
    assert "1 reference report(s): 1. r1 \nPlease" in three


def test_closed_rag_prompt_without_reports_is_the_closed_prompt() -> None:
    expected = (
        "Is there an effusion? Please answer the question based on the image and choose from the following two "
        "options: [yes, no]."
    )
    assert closed_prompt(" Is there an effusion? ") == expected
    assert closed_rag_prompt("Is there an effusion?", [], "radiology") == expected
    assert "reference report" not in closed_rag_prompt("Is there an effusion?", (), "radiology")
    assert closed_prompt("Which?", ("a", "b", "c")).endswith("from the following three options: [a, b, c].")


def test_choice_list() -> None:
    assert choice_list(["yes", "no"]) == "two options: [yes, no]"
    assert choice_list(("normal", "benign", "malignant")) == "three options: [normal, benign, malignant]"
    assert choice_list([str(i) for i in range(8)]) == "8 options: [0, 1, 2, 3, 4, 5, 6, 7]"
    with pytest.raises(ValueError, match="at least two options"):
        choice_list(["yes"])
    with pytest.raises(ValueError, match="at least two options"):
        closed_prompt("Q?", ["yes"])


def test_numbered() -> None:
    assert numbered(["a ", " b"]) == "1. a 2. b "
    assert numbered([]) == ""


def test_report_prompt() -> None:
    assert report_prompt([]) == (
        "You are a professional radiologist. Please generate a report based on the image. Please only include "
        "the content of the report in your response."
    )
    assert report_prompt(["No effusion.", " Mild cardiomegaly. "]) == (
        "You are a professional radiologist. You are provided with an X-ray image and 2 reference report(s): "
        "1. No effusion. 2. Mild cardiomegaly. \nPlease generate a report based on the image. " + CAVEAT
        + " Please only include the content of the report in your response."
    )


def test_open_prompt() -> None:
    assert open_prompt(" What is shown? ") == "What is shown? Please answer the question based on the image."
    assert open_prompt("What is shown?", ["A nodule."]) == (
        "You are provided with a medical image, a image-related question and 1 reference report(s): 1. A nodule. "
        "\nPlease answer the question based on the image and report. " + CAVEAT + " Question: What is shown?"
    )


@pytest.mark.parametrize("question", ["", "   ", None])
def test_empty_question_is_refused(question) -> None:
    with pytest.raises(ValueError, match="question is empty"):
        closed_prompt(question)
    with pytest.raises(ValueError, match="question is empty"):
        closed_rag_prompt(question, ["r"], "radiology")
    with pytest.raises(ValueError, match="question is empty"):
        open_prompt(question, ["r"])


def test_jomed_input_part_order() -> None:
    ref1, ref2, query = _image(10), _image(20), _image(30)
    inp = jomed_input(query, "PROMPT", [(ref1, " first report "), (ref2, "second report")])
    assert len(inp.parts) == 6
    assert inp.parts[0] is ref1 and inp.parts[1] == "Reference 1: first report"
    assert inp.parts[2] is ref2 and inp.parts[3] == "Reference 2: second report"
    assert inp.parts[4] is query and inp.parts[5] == "PROMPT"
    assert inp.images == [ref1, ref2, query]
    bare = jomed_input(query, "PROMPT", [])
    assert bare.parts == (query, "PROMPT") == single_image_input(query, "PROMPT").parts


def test_messages_with_and_without_answer() -> None:
    ref, query = _image(1), _image(2)
    inp = jomed_input(query, "Q?", [(ref, "R")])
    user = {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "Reference 1: R"},
            {"type": "image"},
            {"type": "text", "text": "Q?"},
        ],
    }
    assert inp.messages() == [user]
    assert inp.messages(answer="yes") == [user, {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]
    assert inp.messages(answer="") == [user, {"role": "assistant", "content": [{"type": "text", "text": ""}]}]
    text_only = ReaderInput(("just text",))
    assert text_only.images == []
    assert text_only.messages() == [{"role": "user", "content": [{"type": "text", "text": "just text"}]}]


def test_reader_input_errors() -> None:
    with pytest.raises(ValueError, match="no text"):
        ReaderInput((_image(1),))
    with pytest.raises(ValueError, match="no text"):
        ReaderInput((_image(1), "   "))
    with pytest.raises(ValueError, match="no text"):
        ReaderInput(())
    with pytest.raises(TypeError, match=r"\['bytes'\].*decode images first"):
        ReaderInput((b"\x89PNG", "prompt"))


def test_rebuilds_the_released_harvard_vqa_prompt(shared_data) -> None:
    path = require(shared_data, "mmed_rag", "training", "alignment", "ophthalmology", "harvard_vqa.json")
    records = json.loads(path.read_text(encoding="utf-8"))
    record = next(r for r in records if "1 reference report(s)" in r["conversations"][0]["value"])
    human = record["conversations"][0]["value"]
    assert human.startswith("<image>\n")
    report = human.split("reference report(s): 1. ", 1)[1].split(" \nPlease", 1)[0]
    question = human.split("Question: ", 1)[1]
    assert report and question
    assert closed_rag_prompt(question, [report], "ophthalmology") == human[len("<image>\n") :]
