"""Tiny *random* models of the real architectures users bring -- readers, dual encoders, the original LLaVA-Med
release -- saved in the layout they have on disk.

Each builder makes the model from transformers' own config class (a few layers, 32-64 wide), the processor
from the real image-processor class with the model card's chat template and special tokens, and
``save_pretrained``s both to ``out_dir`` -- a directory ``load_reader`` reads exactly as it reads a downloaded
checkpoint. The tokenizer is a byte-level BPE trained on a few report sentences (no hub), wrapped with the
architecture's special tokens; ``yes`` / ``no`` are single tokens with and without a leading space, as in the
real vocabularies.

The decoders are initialised 10x sharper than transformers' default (:data:`TEXT_INIT_STD`): at the default
every attention row is nearly uniform and p(answer) hardly depends on the input, so a test that IFA, batching or
a LoRA export changes nothing -- or something -- could not fail.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tok_decoders
from transformers import (
    AddedToken,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from medrag_ray.models.convert_llava_med import LLAVA_MED_CHAT_TEMPLATE
from medrag_ray.models.tokenizer import train_bpe_tokenizer
from tests.unit.models.conftest import CORPUS

QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The chat template of Qwen2-VL-*-Instruct's model card (Qwen2.5-VL's is the same)."""

LLAVA_1_5_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""llava-hf/llava-1.5-7b-hf's chat template (images first, then the texts)."""


TEXT_INIT_STD = 0.2
"""The decoders' init std (transformers' default 0.02 makes every attention row nearly uniform and p(answer)
nearly constant: 10x sharper weights make the answer depend on what the question tokens attend to)."""

QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)


def image(value: int, size: tuple[int, int] = (56, 56)) -> Image.Image:
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(-30, 31, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def png(value: int, size: tuple[int, int] = (56, 56)) -> bytes:
    buf = io.BytesIO()
    image(value, size).save(buf, format="PNG")
    return buf.getvalue()


def _bpe(specials: tuple[str, ...], **special_roles: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE (``yes``/``no`` single tokens) with ``specials`` added and their roles set."""
    base = train_bpe_tokenizer(CORPUS * 4, vocab_size=400)
    backend = base.backend_tokenizer
    backend.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **special_roles)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's special tokens: no BOS, ``<|im_end|>`` ends a turn, ``<|endoftext|>`` pads."""
    return _bpe(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _qwen_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(list(QWEN_SPECIALS)), strict=True))
    return {
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }


def _qwen_text(tok: PreTrainedTokenizerFast) -> dict[str, object]:
    return dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 2, 4]},
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=TEXT_INIT_STD,
    )


def _qwen_image_processor() -> Qwen2VLImageProcessor:
    # the real min/max pixels, scaled down: 28x28 patches merged 2x2, 4 to 16 image tokens per image
    return Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)


def _save(model: torch.nn.Module, processor: object, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return out_dir


def _qwen(out_dir: Path, config_cls: type, model_cls: type, processor_cls: type, vision: dict[str, object]) -> Path:
    tok = qwen_tokenizer()
    config = config_cls(text_config=_qwen_text(tok), vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    torch.manual_seed(0)
    model = model_cls(config)
    processor = processor_cls(
        image_processor=_qwen_image_processor(), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_TEMPLATE,
    )
    return _save(model, processor, out_dir)


def qwen2_vl(out_dir: Path) -> Path:
    """Qwen2-VL-Instruct: ViT with 2x2 patch merger (``visual.merger``), M-RoPE decoder, ChatML template."""
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return _qwen(out_dir, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision)


def qwen2_5_vl(out_dir: Path) -> Path:
    """Qwen2.5-VL-Instruct: windowed-attention ViT (full attention in ``fullatt_block_indexes``), same template."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1])
    return _qwen(out_dir, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision)


def _llava(out_dir: Path, text: LlamaConfig | MistralConfig, tok: PreTrainedTokenizerFast, template: str) -> Path:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
        patch_size=14, projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    # CLIP's preprocessing: shortest edge resized, centre crop (336 in the real checkpoints, 28 here)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=template,
    )
    return _save(model, processor, out_dir)


def _llama_like_tokenizer() -> PreTrainedTokenizerFast:
    return _bpe(("<s>", "</s>", "<unk>", "<pad>", "<image>"), bos_token="<s>", eos_token="</s>",
                unk_token="<unk>", pad_token="<pad>")


def llava_1_5(out_dir: Path) -> Path:
    """llava-hf/llava-1.5: CLIP ViT (feature layer -2, CLS dropped), 2-layer MLP projector, Llama decoder."""
    tok = _llama_like_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=TEXT_INIT_STD,
    )
    return _llava(out_dir, text, tok, LLAVA_1_5_TEMPLATE)


def llava_med_mistral(out_dir: Path, tok: PreTrainedTokenizerFast | None = None) -> Path:
    """LLaVA-Med v1.5 converted to llava-hf: the same LLaVA around a Mistral decoder (GQA, sliding window), with
    the ``[INST] <image>\n... [/INST]`` template (``tok``: a tokenizer holding ``<image>`` and a pad token)."""
    tok = tok or _llama_like_tokenizer()
    text = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, sliding_window=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=TEXT_INIT_STD,
    )
    return _llava(out_dir, text, tok, LLAVA_MED_CHAT_TEMPLATE)


# ------------------------------------------------------------------------------------ retrievers

TEXTS = ["a chest x-ray with a pleural effusion", "a fundus photograph with drusen", "a histology slide"]


def write_open_clip_hub_layout(directory: Path, clip: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict) -> None:
    """What ``huggingface-cli download`` gives for an open_clip model (e.g. BiomedCLIP)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(clip.state_dict(), directory / "open_clip_pytorch_model.bin")


def biomedclip_like(root: Path) -> tuple[Path, Path, torch.nn.Module]:
    """A BiomedCLIP-shaped checkpoint: ViT image tower + HF BERT text tower, HF tokenizer files beside it."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertTokenizerFast

    bert_dir = root / "bert_config"
    BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ).save_pretrained(bert_dir)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(TEXTS * 3, vocab_size=120)
    ckpt = root / "biomedclip_like"
    BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, model_max_length=64).save_pretrained(ckpt)

    hub_name = "example-org/bert-not-on-this-machine"
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
        "text_cfg": {
            "hf_model_name": hub_name,
            "hf_tokenizer_name": hub_name,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 16,
        },
    }
    build_cfg = json.loads(json.dumps(model_cfg))
    build_cfg["text_cfg"].update(hf_model_name=str(bert_dir), hf_model_pretrained=False)
    torch.manual_seed(2)
    reference = open_clip.CustomTextCLIP(**build_cfg).eval()
    write_open_clip_hub_layout(ckpt, reference, model_cfg, {"mean": [0.5] * 3, "std": [0.5] * 3})
    return ckpt, bert_dir, reference


def open_clip_vit(root: Path) -> Path:
    """An open_clip ViT-B/16-shaped CLIP (open_clip's own text transformer and BPE) in the hf-hub layout."""
    model_cfg = {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(1)
    write_open_clip_hub_layout(root / "vit", open_clip.CLIP(**model_cfg).eval(), model_cfg,
                               {"mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"})
    return root / "vit"


def open_clip_rn50(root: Path) -> Path:
    """MMed-RAG's retriever base: open_clip RN50 (ModifiedResNet image tower, attention pooling), tiny."""
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(3)
    clip_norm = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    write_open_clip_hub_layout(root / "rn50", open_clip.CLIP(**model_cfg).eval(), model_cfg, clip_norm)
    return root / "rn50"


RETRIEVERS: dict[str, Callable[[Path], tuple[Path, Path | None]]] = {
    "open_clip_vit": lambda root: (open_clip_vit(root), None),
    "open_clip_rn50": lambda root: (open_clip_rn50(root), None),
    "biomedclip": lambda root: biomedclip_like(root)[:2],
}
"""Architecture name -> builder of its checkpoint directory (and the HF text config dir BiomedCLIP needs)."""


# ------------------------------------------------------------- LLaVA-Med as released (jobs/convert_llava_med.py)


def original_llava_med_tokenizer() -> PreTrainedTokenizerFast:
    """Like Mistral's: <unk> <s> </s>, no <image>, no pad token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tok_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4 + ["yes no yes no"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_llava_med_original(direct_dir: Path, out: Path, *, with_tower: bool, **config_changes: object) -> None:
    """The LLaVA code base's layout of the llava-hf model in ``direct_dir`` (the rows of the two tokens the
    converter adds dropped, as the original vocabulary lacks them)."""
    model = LlavaForConditionalGeneration.from_pretrained(direct_dir)
    text, vision = model.config.text_config, model.config.vision_config
    n_vocab = text.vocab_size - 2
    inverse = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.multi_modal_projector.linear_1."):
            name = "model.mm_projector.0." + key.rsplit(".", 1)[1]
        elif key.startswith("model.multi_modal_projector.linear_2."):
            name = "model.mm_projector.2." + key.rsplit(".", 1)[1]
        elif key.startswith("model.vision_tower."):
            if not with_tower:
                continue
            name = "model.vision_tower.vision_tower.vision_model." + key.removeprefix("model.vision_tower.")
        elif key.startswith("model.language_model."):
            name = "model." + key.removeprefix("model.language_model.")
        else:
            name = key
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[:n_vocab]
        inverse[name] = tensor.contiguous()
    out.mkdir(parents=True)
    save_file(inverse, str(out / "model-00001-of-00001.safetensors"))
    config = {
        "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "torch_dtype": "float32",
        "vocab_size": n_vocab, "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"], "sliding_window": text.sliding_window,
        "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "tie_word_embeddings": False,
        "mm_hidden_size": vision.hidden_size, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
    }
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    original_llava_med_tokenizer().save_pretrained(str(out))


def llava_med_direct(root: Path) -> tuple[Path, Path]:
    """A llava-hf LLaVA-Med-shaped model (its tokenizer: the original's + ``<image>`` + ``<pad>``, as the
    converter makes it) and the CLIP tower directory a user has beside the original checkpoint (config, image
    processor, weights): ``(direct_dir, tower_dir)``."""
    tok = original_llava_med_tokenizer()
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "left"
    direct_dir = llava_med_mistral(root / "direct", tok)
    model = LlavaForConditionalGeneration.from_pretrained(direct_dir)
    tower_dir = root / "clip-vit-large-patch14-336"
    tower = CLIPVisionModel(model.config.vision_config)
    tower.load_state_dict(model.model.vision_tower.state_dict())
    tower.save_pretrained(str(tower_dir))
    CLIPImageProcessor.from_pretrained(str(direct_dir)).save_pretrained(str(tower_dir))
    return direct_dir, tower_dir


IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""HuggingFaceM4/Idefics3-8B-Llama3's chat template (SmolVLM's is the same turn format)."""


def idefics3(out_dir: Path) -> Path:
    """Idefics3 (SmolVLM's architecture): SigLIP-style tower, pixel-shuffle ``connector``, Llama decoder; the
    processor splits each image into crops (how many depends on its size) plus a global view, each crop's
    ``<image>`` tokens framed by ``<fake_token_around_image>`` and ``<row_i_col_j>`` tokens."""
    rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<fake_token_around_image>",
                "<image>", "<global-img>", "<end_of_utterance>", *rows)
    tok = _bpe(specials, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>",
               pad_token="<|finetune_right_pad_id|>")
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, initializer_range=TEXT_INIT_STD),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    # the real one: longest edge 4*364, crops of 364; here crops of 32 (4 image tokens each after the shuffle)
    image_processor = Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 64},
                                             max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)
    return _save(model, processor, out_dir)


READERS: dict[str, Callable[[Path], Path]] = {
    "idefics3": idefics3,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "llava_1_5": llava_1_5,
    "llava_med_mistral": llava_med_mistral,
}
"""Architecture name -> builder of its tiny random checkpoint directory."""
