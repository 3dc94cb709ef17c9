"""Every reader path on every real architecture (tiny random checkpoints from :mod:`.builders`).

Per architecture: load from the directory; closed scoring (rows sum to 1, a row does not depend on its
batch-mates: images of different sizes, prompts with and without reports, left padding); greedy generation
(batch = one by one); ``encode`` with an answer (labels on the answer and the end of turn only); RAG-SFT with the
default LoRA settings (targets in the language model only, the projector found per architecture, the loss
falls, the merged export scores like the trained model); DPO on both pair kinds (ln 2 at step 0, the loss
falls); MR-RAG's IFA (blocking question -> document attention changes the answer probabilities, and the bias
mode too); JOMED's interleaved (image, text) candidates.

Each test runs on the CPU in float32 and, where a GPU is visible, again on CUDA in the dtype ``load_reader``
picks there (bfloat16) with transformers' sdpa attention; bf16 rounding loosens the batch tolerance there
(:data:`TOLERANCE`) and greedy generation is compared on its first token only. (With ``flash_attn`` installed the
GPU runs use flash-attention 2 instead: :func:`~medrag_ray.models.reader.attention_implementation`.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medrag_ray.config import LoraSettings
from medrag_ray.data.schema import PreferencePair
from medrag_ray.models.reader import attention_implementation, load_reader
from medrag_ray.reader.dpo import ReaderDPOTask
from medrag_ray.reader.engine import IGNORE_INDEX, ReaderEngine, answer_separator, encode
from medrag_ray.reader.ifa import IFASettings, IFASpec, num_decoder_layers
from medrag_ray.reader.prompts import closed_prompt, closed_rag_prompt, jomed_input, single_image_input
from medrag_ray.reader.sft import PROJECTORS, ReaderSFTTask, SFTExample, example_input
from tests.unit.conformance.builders import READERS, image, png

ARCHS = sorted(READERS)
QUESTIONS = ("Is there cardiomegaly?", "Is there a small left pleural effusion on the frontal view?",
             "Is there drusen near the macula?", "Does the slide show glandular tissue with mild atypia?")
REPORTS = ("Mild cardiomegaly with clear lungs and no pneumothorax.", "The chest x-ray shows a small left pleural "
           "effusion.", "No acute cardiopulmonary abnormality is seen on this radiograph.")
SIZES = ((56, 56), (84, 56), (112, 84), (128, 28))


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest, reader_dirs: dict[str, Path]) -> tuple[str, Path]:
    return request.param, reader_dirs[request.param]


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the bf16 / sdpa path runs where a GPU is visible")
    return request.param


TOLERANCE = {"cpu": 1e-4, "cuda": 3e-2}
"""Largest change of a probability between batchings (fp32 on the CPU, bf16 on CUDA)."""
EFFECT = 1e-3
"""Smallest change of p(answer) IFA must cause (measured on the CPU: blocking 0.006-0.032, bias 0.007-0.046;
an IFA that does not reach the answer changes nothing: the same kernel on the same inputs)."""


def mixed_inputs() -> list:
    """Four closed prompts: images of four sizes, two with reports and two without (different lengths)."""
    out = []
    for i, (q, size) in enumerate(zip(QUESTIONS, SIZES, strict=True)):
        prompt = closed_rag_prompt(q, REPORTS[: i % 3 + 1], "radiology") if i % 2 else closed_prompt(q)
        out.append(single_image_input(image(40 + 50 * i, size), prompt))
    return out


# ------------------------------------------------------------------------------------ inference


def test_load_gives_the_architecture_and_its_processor(arch, device) -> None:
    name, directory = arch
    model, processor = load_reader(directory, device=device)
    expected = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "llava_1_5": "Llava", "llava_med_mistral": "Llava",
                "idefics3": "Idefics3"}
    assert type(model).__name__.startswith(expected[name])
    assert type(processor).__name__.startswith(expected[name].replace("_", "_"))
    if name == "llava_med_mistral":
        assert model.config.text_config.model_type == "mistral"
    assert not model.training
    param = next(model.parameters())
    assert param.device.type == device and param.dtype == (torch.float32 if device == "cpu" else torch.bfloat16)
    assert model.config.get_text_config()._attn_implementation == attention_implementation(param.device, param.dtype)


def test_closed_scores_do_not_depend_on_the_batch(arch, device) -> None:
    _, directory = arch
    model, processor = load_reader(directory, device=device)
    inputs = mixed_inputs()
    batched = ReaderEngine(model, processor, batch_size=4).score_closed(inputs).probs
    alone = np.stack([ReaderEngine(model, processor, batch_size=1).score_closed([x]).probs[0] for x in inputs])
    assert np.allclose(batched.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(batched - alone).max() < TOLERANCE[device]
    assert np.ptp(batched[:, 0]) > 1e-5, "the four different inputs scored identically: the inputs do not reach it"


def test_generation_in_a_batch_equals_one_by_one(arch, device) -> None:
    _, directory = arch
    model, processor = load_reader(directory, device=device)
    inputs = mixed_inputs()
    n = 5 if device == "cpu" else 1
    batched = ReaderEngine(model, processor, batch_size=4).generate(inputs, max_new_tokens=n)
    alone = [ReaderEngine(model, processor, batch_size=1).generate([x], max_new_tokens=n)[0] for x in inputs]
    assert batched == alone
    assert all(isinstance(t, str) for t in batched) and any(t for t in batched)


def test_encode_labels_only_the_answer_and_the_end_of_turn(arch) -> None:
    _, directory = arch
    _, processor = load_reader(directory)
    inp = mixed_inputs()[1]
    prompt = encode(processor, inp)
    full = encode(processor, inp, answer="yes")
    n = prompt["input_ids"].shape[0]
    labels = full["labels"]
    assert labels.shape == full["input_ids"].shape == full["attention_mask"].shape
    assert (labels[:n] == IGNORE_INDEX).all() and (labels[n:] != IGNORE_INDEX).all()
    assert torch.equal(labels[n:], full["input_ids"][n:])
    _, separator = answer_separator(processor)
    answer = processor.tokenizer.decode(labels[n:])
    assert answer.startswith(f"{separator}yes"), answer
    first = n + len(processor.tokenizer(f"{separator}yes", add_special_tokens=False)["input_ids"])
    rest = processor.tokenizer.decode(full["input_ids"][first:], skip_special_tokens=True)
    assert rest.strip() == "", answer  # after the answer only the end-of-turn marker, nothing of the prompt


def test_jomed_candidates_score_with_interleaved_images(arch, device) -> None:
    _, directory = arch
    model, processor = load_reader(directory, device=device)
    query = closed_prompt(QUESTIONS[0])
    inputs = [
        jomed_input(image(60 + 40 * i, SIZES[i]), query, [(image(200 - 30 * i, SIZES[3 - i]), REPORTS[i % 3])])
        for i in range(4)
    ]
    batched = ReaderEngine(model, processor, batch_size=4).score_closed(inputs).probs
    alone = np.stack([ReaderEngine(model, processor, batch_size=1).score_closed([x]).probs[0] for x in inputs])
    assert np.allclose(batched.sum(axis=1), 1.0, atol=1e-5) and np.abs(batched - alone).max() < TOLERANCE[device]


def test_ifa_block_and_bias_change_the_answer_probabilities(arch, device) -> None:
    """Blocking every layer's question -> report attention must move p(yes) (a prompt whose question reaches
    the reports); with no report span marked the IFA forward equals the plain one."""
    _, directory = arch
    model, processor = load_reader(directory, device=device)
    reports = REPORTS
    inputs = [single_image_input(image(80 + 30 * i, SIZES[i]), closed_rag_prompt(q, reports, "radiology"))
              for i, q in enumerate(QUESTIONS)]
    specs = [IFASpec(question=q, doc_texts=reports, doc_scores=(0.9, 0.5, 0.1)) for q in QUESTIONS]
    layers = tuple(range(num_decoder_layers(model)))
    engine = ReaderEngine(model, processor, batch_size=4)
    plain = engine.score_closed(inputs).probs
    blocked = engine.score_closed(inputs, ifa=IFASettings(layers=layers, mode="block"), ifa_specs=specs).probs
    biased = engine.score_closed(inputs, ifa=IFASettings(layers=layers, strength=2.0), ifa_specs=specs).probs
    untouched = engine.score_closed(inputs, ifa=IFASettings(layers=layers, mode="block"),
                                    ifa_specs=[None] * len(inputs)).probs
    assert np.abs(untouched - plain).max() < TOLERANCE[device]  # IFA's attention kernel, nothing marked = sdpa
    # against the same kernel with nothing marked, so only the marking differs (in bf16 the two kernels
    # differ by up to 0.01 on these sharp random readers, measured on an H200; blocking moves p by 0.013-0.028)
    assert np.abs(blocked - untouched).max() > EFFECT, (untouched, blocked)
    assert np.abs(biased - untouched).max() > EFFECT, (untouched, biased)


# ------------------------------------------------------------------------------------- training


def sft_examples(n: int) -> list[SFTExample]:
    out = []
    for i in range(n):
        bright = i % 2 == 0
        out.append(SFTExample(
            id=f"s{i}", domain="radiology", answer_type="closed", question=QUESTIONS[0],
            answer="yes" if bright else "no", image_bytes=png(210 if bright else 30, SIZES[i % 4]),
            use_rag=i % 3 == 0, context_domain="radiology",
            context_texts=(REPORTS[i % 3],) if i % 3 == 0 else (), context_ids=(f"d{i}",) if i % 3 == 0 else (),
        ))
    return out


def _mean_loss(task, model, items) -> float:
    model.eval()
    with torch.no_grad():
        value = float(task.loss(model, task.collate(items)))
    model.train()
    return value


def on(model, device: str):  # noqa: ANN001, ANN201
    """The model where training runs: fp32 on the CPU, bf16 on CUDA (DeepSpeed's bf16 mode)."""
    return model if device == "cpu" else model.to("cuda", torch.bfloat16)


def test_rag_sft_lora_with_the_default_settings(arch, device, tmp_path: Path) -> None:
    _, directory = arch
    examples = sft_examples(12)
    task = ReaderSFTTask("sft", directory, examples, examples[:4], LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    model = on(task.build_model(), device)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = [n for n in trainable if "lora_" in n]
    saved = [n for n in trainable if "modules_to_save" in n]
    assert adapted and all(not {"vision_tower", "visual", *PROJECTORS} & set(n.split(".")) for n in adapted)
    assert any(set(PROJECTORS) & set(n.split(".")) for n in saved) and any("lm_head" in n for n in saved)
    dataset = task.train_dataset()
    items = [dataset[i] for i in range(len(dataset))]
    before = _mean_loss(task, model, items)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for step in range(12):
        opt.zero_grad()
        task.loss(model, task.collate([items[(step * 4 + j) % len(items)] for j in range(4)])).backward()
        opt.step()
    after = _mean_loss(task, model, items)
    assert math.isfinite(before) and after < 0.3 * before, (before, after)  # measured on the CPU: 0.01-0.03x

    model.eval()
    probe = [example_input(e, "mmed") for e in examples[:4]]
    trained = ReaderEngine(model, task.processor, batch_size=4).score_closed(probe).probs
    task.export(model, tmp_path / "sft")
    merged, processor = load_reader(tmp_path / "sft", device=device)
    merged_probs = ReaderEngine(merged, processor, batch_size=4).score_closed(probe).probs
    assert np.abs(merged_probs - trained).max() < TOLERANCE[device]


def dpo_pairs() -> list[PreferencePair]:
    prompt = closed_rag_prompt(QUESTIONS[0], REPORTS[:1], "radiology")
    pairs = []
    for i in range(4):
        answer, other = ("yes", "no") if i % 2 == 0 else ("no", "yes")
        common = dict(domain="radiology", source="test", prompt=prompt, image_bytes=png(200 if i % 2 == 0 else 40,
                      SIZES[i]), image_available=True)
        pairs.append(PreferencePair(id=f"s{i}/oa1", pair_type="oa1", chosen=answer, rejected=other, **common))
        pairs.append(PreferencePair(id=f"s{i}/cm", pair_type="cm", chosen=answer, rejected=answer, rejected_noised=1,
                                    noised_image_bytes=png(128 + i, SIZES[3 - i]), **common))
    return pairs


def test_dpo_is_ln2_at_step_0_and_then_falls(arch, device) -> None:
    _, directory = arch
    pairs = dpo_pairs()
    task = ReaderDPOTask("dpo", directory, pairs, [], LoraSettings(r=4, alpha=8, dropout=0.0), beta=0.1)
    torch.manual_seed(0)
    model = on(task.build_model(), device)
    dataset = task.train_dataset()
    batch = task.collate([dataset[i] for i in range(len(dataset))])
    first = task.loss(model, batch)
    assert float(first) == pytest.approx(math.log(2), abs=1e-5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(8):
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    assert float(task.loss(model, batch)) < float(first) - 0.2  # measured on the CPU: 0.69 -> 0.02-0.13

