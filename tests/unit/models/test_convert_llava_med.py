"""The original LLaVA-Med v1.5 layout -> llava-hf: a tiny fake original checkpoint, converted, scores exactly as the
llava-hf model it was written from; bad checkpoints get errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medrag_ray.models.common import ModelLoadError
from medrag_ray.models.convert_llava_med import convert_llava_med, hf_key
from medrag_ray.models.reader import load_reader
from medrag_ray.reader.engine import ReaderEngine, render
from medrag_ray.reader.prompts import closed_prompt, closed_rag_prompt, single_image_input
from tests.unit.conformance.builders import image, llava_med_direct, write_llava_med_original


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return llava_med_direct(tmp_path_factory.mktemp("llava_med"))


def inputs() -> list:
    return [single_image_input(image(40 + 60 * i, (56 + 14 * i, 56)), prompt) for i, prompt in enumerate(
        [closed_prompt("Is there cardiomegaly?"), closed_rag_prompt("Is there an effusion?", ["Small left pleural "
         "effusion."], "radiology"), closed_prompt("Is there drusen near the macula?")])]


@pytest.mark.parametrize("with_tower", [False, True], ids=["tower-from-clip-dir", "tower-in-checkpoint"])
def test_converted_checkpoint_scores_as_the_direct_construction(direct, tmp_path: Path, with_tower: bool) -> None:
    direct_dir, tower_dir = direct
    write_llava_med_original(direct_dir, tmp_path / "original", with_tower=with_tower)
    out = convert_llava_med(tmp_path / "original", tower_dir, tmp_path / "hf")
    note = json.loads((out / "medrag_conversion.json").read_text(encoding="utf-8"))
    assert note["added_tokens"] == ["<image>", "<pad>"] and note["model_type"] == "llava_mistral"

    converted, processor = load_reader(out)
    reference, ref_processor = load_reader(direct_dir)
    assert converted.config.text_config.model_type == "mistral"
    assert converted.config.vision_feature_layer == -2 and converted.config.vision_feature_select_strategy == "default"
    assert render(processor, inputs()[0]).startswith("[INST] <image>\n") and render(processor, inputs()[0]).endswith(
        " [/INST]")
    got = ReaderEngine(converted, processor, batch_size=3).score_closed(inputs()).probs
    want = ReaderEngine(reference, ref_processor, batch_size=3).score_closed(inputs()).probs
    assert np.abs(got - want).max() < 1e-6
    new_rows = converted.model.language_model.embed_tokens.weight[-2:]
    old_mean = converted.model.language_model.embed_tokens.weight[:-2].mean(dim=0)
    assert torch.allclose(new_rows, old_mean.expand_as(new_rows), atol=1e-6)


def test_key_mapping() -> None:
    assert hf_key("model.mm_projector.0.weight") == "model.multi_modal_projector.linear_1.weight"
    assert hf_key("model.mm_projector.2.bias") == "model.multi_modal_projector.linear_2.bias"
    assert hf_key("model.layers.3.self_attn.q_proj.weight") == "model.language_model.layers.3.self_attn.q_proj.weight"
    assert hf_key("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == (
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight")
    assert hf_key("lm_head.weight") == "lm_head.weight" and hf_key("rotary.inv_freq") is None


def test_bad_checkpoints_name_the_fix(direct, tmp_path: Path) -> None:
    direct_dir, tower_dir = direct
    write_llava_med_original(direct_dir, tmp_path / "linear", with_tower=False, mm_projector_type="linear")
    with pytest.raises(ModelLoadError, match="mlp2x_gelu"):
        convert_llava_med(tmp_path / "linear", tower_dir, tmp_path / "out")
    write_llava_med_original(direct_dir, tmp_path / "qwen", with_tower=False, model_type="qwen2_vl")
    with pytest.raises(ModelLoadError, match="not an original LLaVA checkpoint"):
        convert_llava_med(tmp_path / "qwen", tower_dir, tmp_path / "out")
    with pytest.raises(ModelLoadError, match="already in llava-hf format"):
        convert_llava_med(direct_dir, tower_dir, tmp_path / "out")
    write_llava_med_original(direct_dir, tmp_path / "ok", with_tower=False)
    (tmp_path / "not_clip").mkdir()
    with pytest.raises(ModelLoadError, match="vision_tower_dir"):
        convert_llava_med(tmp_path / "ok", tmp_path / "not_clip", tmp_path / "out")
    other = tmp_path / "other_tower"  # a tower of another depth, no weights: config and processor only
    config = json.loads((tower_dir / "config.json").read_text(encoding="utf-8"))
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}), encoding="utf-8")
    (other / "preprocessor_config.json").write_bytes((tower_dir / "preprocessor_config.json").read_bytes())
    with pytest.raises(ModelLoadError, match="no CLIP weights"):
        convert_llava_med(tmp_path / "ok", other, tmp_path / "out")
    write_llava_med_original(direct_dir, tmp_path / "with_tower", with_tower=True)
    with pytest.raises(ModelLoadError, match=r"do not fit.*mm_vision_tower"):
        convert_llava_med(tmp_path / "with_tower", other, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_llava_llama_checkpoint_converts_to_llama_with_the_vicuna_turn(direct, tmp_path: Path) -> None:
    direct_dir, tower_dir = direct
    write_llava_med_original(direct_dir, tmp_path / "v1", with_tower=True, model_type="llava_llama",
                             architectures=["LlavaLlamaForCausalLM"])
    converted, processor = load_reader(convert_llava_med(tmp_path / "v1", tower_dir, tmp_path / "hf"))
    assert converted.config.text_config.model_type == "llama"
    text = render(processor, inputs()[0])
    assert text.startswith("USER: <image>\n") and text.endswith("ASSISTANT:")
    probs = ReaderEngine(converted, processor, batch_size=3).score_closed(inputs()).probs
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6) and np.ptp(probs[:, 0]) > 1e-4
