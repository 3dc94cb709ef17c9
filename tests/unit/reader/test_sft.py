"""RAG-SFT of the reader with LoRA: example building, Parquet round trip, LoRA targets, training and export."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from torch import nn

from medrag_ray.config import LoraSettings
from medrag_ray.data.schema import Sample
from medrag_ray.models.reader import ReaderConfig, build_tiny_reader, load_reader, save_reader
from medrag_ray.models.tokenizer import train_bpe_tokenizer
from medrag_ray.reader.context import SampleContext
from medrag_ray.reader.engine import IGNORE_INDEX, ClosedScores, answer_loss, collate, encode, pad_id, with_positions
from medrag_ray.reader.sft import (
    ADAPTER_DIR,
    ReaderSFTTask,
    SFTDataset,
    SFTExample,
    add_lora,
    build_sft_examples,
    closed_accuracy,
    example_input,
    lora_targets,
    make_reader_sft_task,
    read_sft_examples,
    resolve_modules_to_save,
    sft_answer,
    write_sft_examples,
)
from tests.unit.models.conftest import CORPUS

LORA = LoraSettings(r=4, alpha=8, dropout=0.05)
QUESTION = "Is there cardiomegaly?"
LM_SUFFIXES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def png(value: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(-8, 9, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def closed_samples(n: int) -> list[Sample]:
    """Bright images answer "yes", dark ones "no"."""
    out = []
    for i in range(n):
        bright = i % 2 == 0
        out.append(
            Sample(
                id=f"s{i:03d}", domain="radiology", split="train", source="test", question=QUESTION,
                answer="yes" if bright else "no", answer_type="closed",
                image_bytes=png(200 + i % 7 if bright else 40 + i % 7), image_available=True,
            )
        )
    return out


def contexts_for(samples: list[Sample], every: int = 2) -> list[SampleContext]:
    """Every ``every``-th sample has retrieved text (with an image), the others retrieved nothing."""
    return [
        SampleContext("radiology", 0.9, (f"d{i}",), ("Mild cardiomegaly.",), (0.8,), (png(120),))
        if i % every == 0 else SampleContext("radiology", 0.9)
        for i in range(len(samples))
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS * 4, vocab_size=400)


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    torch.manual_seed(0)
    model, processor = build_tiny_reader(ReaderConfig(), tokenizer)
    return save_reader(model, processor, tmp_path_factory.mktemp("sft") / "reader")


# ---------------------------------------------------------------------------------------- data


def test_build_sft_examples_rag_fraction() -> None:
    samples = closed_samples(40)
    contexts = contexts_for(samples, every=4)  # 10 with context texts
    with_text = {s.id for s, c in zip(samples, contexts, strict=True) if c.texts}
    assert len(with_text) == 10

    def rag_ids(fraction: float, seed: int = 0, order: list[int] | None = None) -> set[str]:
        idx = order or list(range(len(samples)))
        examples = build_sft_examples([samples[i] for i in idx], [contexts[i] for i in idx], fraction, seed)
        return {e.id for e in examples if e.use_rag}

    assert rag_ids(0.0) == set()
    assert rag_ids(1.0) == with_text  # examples without context texts never use rag
    half = rag_ids(0.5)
    assert half <= with_text and 0 < len(half) < len(with_text)
    assert rag_ids(0.5) == half  # deterministic
    assert rag_ids(0.5, order=list(range(39, -1, -1))) == half  # per sample id, not per position
    assert rag_ids(0.3) <= half <= rag_ids(0.8)  # one uniform draw per id: the share grows monotonically
    assert any(rag_ids(0.5, seed=s) != half for s in (1, 2, 3))  # the seed matters

    big = closed_samples(400)
    share = np.mean([e.use_rag for e in build_sft_examples(big, contexts_for(big, every=1), 0.5, 7)])
    assert 0.4 < share < 0.6


def test_build_sft_examples_fields_and_errors() -> None:
    samples = closed_samples(2)
    ctx = SampleContext("ophthalmology", 0.7, ("d1", "d2"), ("t1", "t2"), (0.9, 0.8), (b"img1", None))
    [first, second] = build_sft_examples(samples, [ctx, SampleContext("radiology", None)], 1.0, 0)
    assert first == SFTExample(
        id="s000", domain="radiology", answer_type="closed", question=QUESTION, answer="yes",
        image_bytes=samples[0].image_bytes, use_rag=True, context_domain="ophthalmology",
        context_texts=("t1", "t2"), context_ids=("d1", "d2"), context_images=(b"img1",),
    )
    assert not second.use_rag and second.context() is None
    assert first.context() == SampleContext("ophthalmology", None, ("d1", "d2"), ("t1", "t2"), (), (b"img1",))
    assert first.sample().id == "s000" and first.sample().answer == "yes"
    with pytest.raises(ValueError, match="2 samples but 1 contexts"):
        build_sft_examples(samples, [ctx], 0.5, 0)
    no_image = replace(samples[0], image_bytes=None)
    with pytest.raises(ValueError, match="no inline image_bytes"):
        build_sft_examples([no_image], [ctx], 0.5, 0)
    report = Sample(id="r", domain="radiology", split="train", source="t", text="No effusion.",
                    answer_type="report", image_bytes=png(3))
    assert sft_answer(report) == "No effusion." and sft_answer(samples[1]) == "no"
    [rep] = build_sft_examples([report], [SampleContext("radiology", None)], 0.0, 0)
    assert rep.answer == "No effusion." and rep.question == ""


def test_write_read_round_trip(tmp_path: Path) -> None:
    samples = closed_samples(4)
    examples = build_sft_examples(samples, contexts_for(samples), 1.0, 0)
    examples.append(replace(examples[0], id="extra", context_images=(b"a", b"b"), context_texts=("x", "y"),
                            context_ids=("i", "j")))
    examples.append(replace(examples[1], id="conversation", follow_ups=(("Is it?", "no"), ("Is there X?", "yes"))))
    path = tmp_path / "nested" / "train.parquet"
    assert write_sft_examples(examples, path) == 6
    back = read_sft_examples(path)
    assert back == examples
    assert isinstance(back[0].context_texts, tuple) and isinstance(back[1].context_ids, tuple)


def test_example_input_uses_context_only_with_rag() -> None:
    samples = closed_samples(2)
    examples = build_sft_examples(samples, contexts_for(samples, every=1), 1.0, 0)
    rag = example_input(examples[0], "mmed")
    plain = example_input(replace(examples[0], use_rag=False), "mmed")
    assert "1 reference report(s): 1. Mild cardiomegaly." in rag.parts[1]
    assert "reference report" not in plain.parts[1]
    jomed = example_input(examples[0], "jomed")
    assert jomed.parts[1] == "Reference 1: Mild cardiomegaly." and len(jomed.images) == 2


# ---------------------------------------------------------------------------------------- LoRA


def test_lora_targets(tokenizer) -> None:
    model, _ = build_tiny_reader(ReaderConfig(), tokenizer)
    names = lora_targets(model)
    assert len(names) == ReaderConfig().text_layers * 7
    assert {n.split(".")[-1] for n in names} == LM_SUFFIXES
    for name in names:
        assert isinstance(model.get_submodule(name), nn.Linear)
        assert not {"vision_tower", "multi_modal_projector", "lm_head"} & set(name.split("."))
    only_qv = lora_targets(model, suffixes=("q_proj", "v_proj"))
    assert len(only_qv) == 4 and all("language_model" in n for n in only_qv)
    assert len(lora_targets(model, exclude=("mlp",))) == 8
    with pytest.raises(ValueError, match="no linear layer"):
        lora_targets(model, suffixes=("no_such_proj",))


def test_add_lora_trains_only_adapters_and_saved_modules(tokenizer) -> None:
    model, _ = build_tiny_reader(ReaderConfig(), tokenizer)
    peft_model = add_lora(model, LORA)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 14 and sum("lora_B" in n for n in trainable) == 14
    saved = [n for n in trainable if "modules_to_save" in n]
    assert any("multi_modal_projector" in n for n in saved) and any("lm_head" in n for n in saved)
    assert not any("vision_tower" in n for n in trainable)

    bare, _ = build_tiny_reader(ReaderConfig(), tokenizer)
    adapters_only = add_lora(bare, LoraSettings(r=2, alpha=4, dropout=0.0, modules_to_save=()))
    trainable = [n for n, p in adapters_only.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    other, _ = build_tiny_reader(ReaderConfig(), tokenizer)
    with pytest.raises(ValueError, match=r"modules_to_save names \['visual_merger'\].*'multi_modal_projector'"):
        add_lora(other, LoraSettings(modules_to_save=("visual_merger",)))


def test_a_projector_name_in_modules_to_save_means_the_models_own_projector(tokenizer) -> None:
    model, _ = build_tiny_reader(ReaderConfig(), tokenizer)
    assert resolve_modules_to_save(model, ("merger", "lm_head")) == ["multi_modal_projector", "lm_head"]
    assert resolve_modules_to_save(model, ("multi_modal_projector", "connector")) == ["multi_modal_projector"]
    assert resolve_modules_to_save(model, ()) == []
    with pytest.raises(ValueError, match=r"\['no_such'\]"):
        resolve_modules_to_save(model, ("no_such",))


# ------------------------------------------------------------------------------- task: training


def _mean_loss(task: ReaderSFTTask, model: nn.Module, dataset: SFTDataset) -> float:
    model.eval()
    with torch.no_grad():
        batch = task.collate([dataset[i] for i in range(len(dataset))])
        return float(task.loss(model, batch))


@pytest.fixture(scope="module")
def trained(reader_dir: Path):
    samples = closed_samples(32)
    examples = build_sft_examples(samples, contexts_for(samples), 0.5, 0)
    assert 0 < sum(e.use_rag for e in examples) < 32
    task = ReaderSFTTask("sft", reader_dir, examples, examples[:6], LORA)
    torch.manual_seed(0)
    model = task.build_model()
    dataset = task.train_dataset()
    before = _mean_loss(task, model, dataset)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    for step in range(30):
        idx = [(step * 8 + j) % len(dataset) for j in range(8)]
        opt.zero_grad()
        loss = task.loss(model, task.collate([dataset[i] for i in idx]))
        loss.backward()
        opt.step()
    after = _mean_loss(task, model, dataset)
    return task, model, dataset, before, after


def test_task_dataset_items_mask_the_prompt(trained) -> None:
    task, _, dataset, _, _ = trained
    item = dataset[0]
    labels = item["labels"]
    assert (labels[: -2] == IGNORE_INDEX).all()  # everything but " yes</s>" is prompt
    assert task.processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == " yes</s>"
    assert task.collate is not None and task.collate([item])["input_ids"].shape == (1, item["input_ids"].shape[0])


def test_a_conversation_item_labels_every_turn(trained) -> None:
    task, _, _, _, _ = trained
    [first] = build_sft_examples(closed_samples(1), contexts_for(closed_samples(1)), 1.0, 0)
    example = replace(first, follow_ups=(("Is there an effusion?", "no"), ("Is it enlarged?", "yes")))
    item = SFTDataset([example], task.processor, "mmed")[0]
    labels = item["labels"]
    tok = task.processor.tokenizer
    assert tok.decode(labels[labels != IGNORE_INDEX]) == f" {example.answer}</s> no</s> yes</s>"
    turns = "USER: Is there an effusion? ASSISTANT: no</s>USER: Is it enlarged? ASSISTANT:"
    assert turns in tok.decode(item["input_ids"])


def test_short_training_lowers_the_loss(trained) -> None:
    _, _, _, before, after = trained
    assert math.isfinite(before) and before > 2.0  # a random reader: ~log(vocab) on the answer tokens
    assert after < 0.5 * before, (before, after)


def test_answer_loss_equals_the_model_loss(trained) -> None:
    """The head over the answer positions only gives the loss of the head over every position (answers of
    different lengths, left-padded, with and without reports)."""
    task, model, dataset, _, _ = trained
    long = encode(task.processor, example_input(task.train_examples[1], "mmed"), "no pleural effusion is seen today")
    batch = with_positions(model, task.collate([dataset[0], dataset[3], long]))
    model.eval()
    with torch.no_grad():
        reference = model(**batch).loss
        got = answer_loss(model, batch)
    assert float(got) == pytest.approx(float(reference), rel=1e-5)
    assert float(task.loss(model, batch)) == pytest.approx(float(reference), rel=1e-5)
    with pytest.raises(ValueError, match="no answer token"):
        answer_loss(model, {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)})


def test_export_loads_as_a_reader_with_the_same_logits(trained, tmp_path: Path) -> None:
    task, model, dataset, _, _ = trained
    model.eval()
    batch = collate([dataset[i] for i in (0, 1, 2, 5)], pad_id(task.processor))
    with torch.no_grad():
        reference = model(**batch).logits
    task.export(model, tmp_path / "export")
    assert (tmp_path / "export" / ADAPTER_DIR / "adapter_config.json").is_file()
    card = json.loads((tmp_path / "export" / ADAPTER_DIR / "medrag_sft.json").read_text(encoding="utf-8"))
    assert card["base_reader"] == str(task.reader_dir) and card["style"] == "mmed" and card["lora"]["r"] == 4
    loaded, processor = load_reader(tmp_path / "export", dtype="float32")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        merged = loaded(**batch).logits
        again = model(**batch).logits  # export merges a copy: the trained peft model is unchanged
    assert torch.allclose(merged, reference, atol=1e-4)
    assert torch.equal(again, reference)
    assert processor.tokenizer.pad_token_id == task.processor.tokenizer.pad_token_id


def test_evaluate_reports_both_accuracies(trained) -> None:
    task, model, _, _, _ = trained
    metrics = task.evaluate(model)
    assert set(metrics) == {"val_accuracy_no_rag", "val_accuracy_rag"}
    n_rag = sum(bool(e.context_texts) for e in task.val_examples)
    assert round(metrics["val_accuracy_no_rag"] * 6, 6) in set(range(7))
    assert round(metrics["val_accuracy_rag"] * n_rag, 6) in set(range(n_rag + 1))
    assert ReaderSFTTask("e", task.reader_dir, task.train_examples, [], LORA).evaluate(model) == {}


class ScriptedEngine:
    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.seen = 0

    def score_closed(self, inputs, choices):  # noqa: ANN001, ANN201
        self.seen = len(inputs)
        probs = np.array([[0.9, 0.1] if a == "yes" else [0.1, 0.9] for a in self.answers])
        return ClosedScores(tuple(choices), probs)


def test_closed_accuracy_counts_closed_examples_only() -> None:
    samples = closed_samples(3)
    examples = build_sft_examples(samples, [SampleContext("radiology", None)] * 3, 0.0, 0)  # yes, no, yes
    opened = replace(examples[0], id="open", answer_type="open", answer="a nodule")
    engine = ScriptedEngine(["yes", "yes", "yes"])
    assert closed_accuracy(engine, [examples[0], opened, examples[1], examples[2]], "mmed") == pytest.approx(2 / 3)
    assert engine.seen == 3
    assert math.isnan(closed_accuracy(engine, [opened], "mmed"))


def test_task_errors_and_factory(tmp_path: Path, reader_dir: Path) -> None:
    with pytest.raises(ValueError, match="no training examples"):
        ReaderSFTTask("sft", reader_dir, [], [], LORA)
    samples = closed_samples(4)
    examples = build_sft_examples(samples, contexts_for(samples), 0.5, 0)
    task = ReaderSFTTask("sft", reader_dir, examples, [], LORA)
    with pytest.raises(RuntimeError, match="call build_model"):
        task.train_dataset()
    write_sft_examples(examples, tmp_path / "train.parquet")
    write_sft_examples(examples[:3], tmp_path / "val.parquet")
    made = make_reader_sft_task("m", str(reader_dir), str(tmp_path), LORA, "jomed", max_val=2)
    assert made.train_examples == examples and made.val_examples == examples[:2] and made.style == "jomed"
    assert make_reader_sft_task("m", str(reader_dir), str(tmp_path), LORA, "mmed", max_val=0).val_examples == []


def test_full_finetune_trains_every_parameter_and_exports_without_adapter(reader_dir: Path, tmp_path: Path) -> None:
    samples = closed_samples(8)
    examples = build_sft_examples(samples, [SampleContext("radiology", None)] * 8, 0.0, 0)
    task = ReaderSFTTask("pre", reader_dir, examples, [], LORA, finetune="full")
    torch.manual_seed(0)
    model = task.build_model()
    assert not isinstance(model, PeftModel)
    assert all(p.requires_grad for p in model.parameters())
    dataset = task.train_dataset()
    batch = task.collate([dataset[i] for i in range(len(dataset))])
    vision = next(p for n, p in model.named_parameters() if "vision_tower" in n)
    start = vision.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task.loss(model, batch).backward()
    opt.step()
    assert not torch.equal(vision.detach(), start)  # the vision tower trains too (LoRA freezes it)
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
    task.export(model, tmp_path / "export")
    assert not (tmp_path / "export" / ADAPTER_DIR).exists()
    loaded, _ = load_reader(tmp_path / "export", dtype="float32")
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, reference, atol=1e-5)
    with pytest.raises(ValueError, match="finetune must be 'lora' or 'full'"):
        ReaderSFTTask("pre", reader_dir, examples, [], LORA, finetune="qlora")


def test_full_finetune_with_a_frozen_vision_tower_trains_everything_else(reader_dir: Path) -> None:
    samples = closed_samples(8)
    examples = build_sft_examples(samples, [SampleContext("radiology", None)] * 8, 0.0, 0)
    task = ReaderSFTTask("pre", reader_dir, examples, [], LORA, finetune="full", freeze_vision_tower=True)
    model = task.build_model()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n, _ in model.named_parameters() if "vision_tower" in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dataset = task.train_dataset()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    task.loss(model, task.collate([dataset[i] for i in range(len(dataset))])).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == set(before) - frozen  # projector, language model and lm_head all moved
