"""RAG-PT DPO of the reader: pair sides, split, the ln 2 invariant on a real reader, training and export."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medrag_ray.config import LoraSettings
from medrag_ray.data.schema import PreferencePair, write_parquet
from medrag_ray.mining.noise import noisy_image, sample_seed
from medrag_ray.models.reader import ReaderConfig, build_tiny_reader, load_reader, save_reader
from medrag_ray.models.tokenizer import train_bpe_tokenizer
from medrag_ray.reader.dpo import (
    NoiseSettings,
    ReaderDPOTask,
    make_reader_dpo_task,
    pair_kind,
    read_pairs,
    side_images,
    split_pairs,
)
from medrag_ray.reader.engine import IGNORE_INDEX, to_model, with_positions
from medrag_ray.reader.prompts import closed_rag_prompt
from medrag_ray.reader.sft import ADAPTER_DIR
from tests.unit.models.conftest import CORPUS

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
PROMPT = closed_rag_prompt("Is there cardiomegaly?", ["Mild cardiomegaly."], "radiology")


def png(value: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(-8, 9, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pair(i: int, pair_type: str = "oa1", **kw: object) -> PreferencePair:
    fields: dict[str, object] = dict(
        id=f"s{i:03d}/{pair_type}", domain="radiology", source="test", pair_type=pair_type, prompt=PROMPT,
        chosen="yes" if i % 2 == 0 else "no", rejected="no" if i % 2 == 0 else "yes",
        image_bytes=png(200 if i % 2 == 0 else 40), image_available=True,
    )
    fields.update(kw)
    return PreferencePair(**fields)  # type: ignore[arg-type]


def cm_pair(i: int) -> PreferencePair:
    answer = "yes" if i % 2 == 0 else "no"
    return pair(i, "cm", chosen=answer, rejected=answer, rejected_noised=1, noised_image_bytes=png(128 + i))


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model, processor = build_tiny_reader(ReaderConfig(), train_bpe_tokenizer(CORPUS * 4, vocab_size=400))
    return save_reader(model, processor, tmp_path_factory.mktemp("dpo") / "reader")


def test_pair_kind_of_mined_and_released_pairs() -> None:
    assert [pair_kind(pair(0, t)) for t in ("cm", "oa1", "oa2")] == ["cm", "oa1", "oa2"]
    assert pair_kind(pair(0, "unknown", rejected_noised=1)) == "cm"  # the reference code's stage-1 pairs
    assert pair_kind(pair(0, "unknown")) == "oa"


def test_side_images() -> None:
    clean = Image.open(io.BytesIO(png(200))).convert("RGB")
    c, r = side_images(cm_pair(0), NoiseSettings())
    assert np.array_equal(np.asarray(c), np.asarray(clean))
    assert np.array_equal(np.asarray(r), np.asarray(Image.open(io.BytesIO(png(128))).convert("RGB")))
    c, r = side_images(pair(0, "oa1"), NoiseSettings())
    assert np.array_equal(np.asarray(c), np.asarray(r))
    released = pair(0, "unknown", chosen="yes", rejected="yes", rejected_noised=1)  # no stored x_v*
    noise = NoiseSettings(kind="diffusion", step=300, seed=4)
    _, r = side_images(released, noise)
    expected = noisy_image(clean, 300, sample_seed(4, released.id), "diffusion")
    assert np.array_equal(np.asarray(r), np.asarray(expected)) and not np.array_equal(np.asarray(r), np.asarray(clean))
    with pytest.raises(ValueError, match="image_root"):
        side_images(pair(0, image_bytes=None, image_available=False), noise)


def test_split_pairs_is_seeded_and_keeps_a_sample_together() -> None:
    pairs = [p for i in range(200) for p in (pair(i, "cm"), pair(i, "oa1"))]
    train, val = split_pairs(pairs, 0.25, seed=1)
    assert (train, val) == split_pairs(pairs, 0.25, seed=1) and split_pairs(pairs, 0.25, seed=2) != (train, val)
    val_samples = {p.id.split("/")[0] for p in val}
    assert val_samples.isdisjoint({p.id.split("/")[0] for p in train})
    assert len(val) % 2 == 0 and 0.15 < len(val) / len(pairs) < 0.35


def test_read_pairs_filters_the_stage_kinds(tmp_path: Path) -> None:
    pairs = [cm_pair(1), pair(0, "oa1"), pair(2, "oa2"), pair(3, "unknown")]
    write_parquet(pairs, PreferencePair, tmp_path / "p.parquet")
    assert [p.id for p in read_pairs(tmp_path / "p.parquet", ["cm"])] == ["s001/cm"]
    assert [p.id for p in read_pairs(tmp_path, ["oa1", "oa2", "oa"])] == ["s000/oa1", "s002/oa2", "s003/unknown"]


def test_batches_put_chosen_then_rejected_and_label_only_answers(reader_dir: Path) -> None:
    task = ReaderDPOTask("dpo", reader_dir, [pair(0), pair(1)], [], LORA, beta=0.1)
    task.build_model()
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    tok = task.processor.tokenizer
    answers = [tok.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    assert answers == [" yes</s>", " no</s>", " no</s>", " yes</s>"]


def test_loss_is_ln2_when_the_policy_is_the_reference(reader_dir: Path) -> None:
    pairs = [pair(i) for i in range(3)] + [cm_pair(i) for i in range(3)]
    task = ReaderDPOTask("dpo", reader_dir, pairs, pairs, LORA, beta=0.1)
    model = task.build_model()  # LoRA's B is 0 and the saved modules are copies: policy == reference
    out, chosen, rejected = task.dpo(model, task.collate([task.train_dataset()[i] for i in range(6)]))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.all(out.chosen_rewards == 0) and torch.all(chosen < 0) and torch.all(rejected < 0)
    assert task.evaluate(model)["val_loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.fixture(scope="module")
def trained(reader_dir: Path):
    pairs = [pair(i) for i in range(16)] + [cm_pair(i) for i in range(16)]
    task = ReaderDPOTask("dpo", reader_dir, pairs, pairs, LORA, beta=0.5)
    torch.manual_seed(0)
    model = task.build_model()
    dataset = task.train_dataset()
    batch = task.collate([dataset[i] for i in range(len(dataset))])
    moved = to_model(model, batch)
    with torch.no_grad(), model.disable_adapter():
        reference_before = model(**with_positions(model, {k: v for k, v in moved.items() if k != "labels"})).logits
    before = task.evaluate(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(25):
        idx = [(step * 8 + j) % len(dataset) for j in range(8)]
        opt.zero_grad()
        task.loss(model, task.collate([dataset[i] for i in idx])).backward()
        opt.step()
    return task, model, batch, reference_before, before, task.evaluate(model)


def test_training_moves_chosen_up_and_keeps_the_reference_frozen(trained) -> None:
    task, model, batch, reference_before, before, after = trained
    assert before["val_reward_accuracy"] == 0.0 and before["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["val_loss"] < 0.5 * math.log(2), after
    assert after["val_reward_accuracy"] > 0.9 and after["val_reward_margin"] > 0
    assert after["val_policy_prefers_chosen"] > before["val_policy_prefers_chosen"]
    moved = to_model(model, batch)
    with torch.no_grad(), model.disable_adapter():
        reference_after = model(**with_positions(model, {k: v for k, v in moved.items() if k != "labels"})).logits
    assert torch.equal(reference_before, reference_after)


def test_export_merges_the_adapter(trained, tmp_path: Path) -> None:
    task, model, batch, _, _, _ = trained
    model.eval()
    inputs = {k: v for k, v in to_model(model, batch).items() if k != "labels"}
    with torch.no_grad():
        expected = model(**with_positions(model, inputs)).logits
    task.export(model, tmp_path / "out")
    info = json.loads((tmp_path / "out" / ADAPTER_DIR / "medrag_sft.json").read_text())
    assert info["beta"] == 0.5 and info["pairs"] == 32
    merged, _ = load_reader(tmp_path / "out", dtype="float32")
    with torch.no_grad():
        assert torch.allclose(merged(**with_positions(merged, inputs)).logits, expected, atol=1e-4)


def test_task_errors_and_factory(reader_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no training pairs"):
        ReaderDPOTask("dpo", reader_dir, [], [], LORA, beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        ReaderDPOTask("dpo", reader_dir, [pair(0)], [], LORA, beta=0.0)
    write_parquet([pair(0), pair(1)], PreferencePair, tmp_path / "train.parquet")
    task = make_reader_dpo_task("dpo", str(reader_dir), str(tmp_path), LORA, 0.1, NoiseSettings())
    assert [p.id for p in task.train_pairs] == ["s000/oa1", "s001/oa1"] and task.val_pairs == []
