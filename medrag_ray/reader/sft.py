"""Retrieval-augmented SFT of the reader with LoRA (JOMED stage 1), as a task of :mod:`medrag_ray.train.loop`.

Data: :func:`build_sft_examples` turns samples and their retrieved context (:mod:`medrag_ray.reader.context`,
computed once by the job driver) into :class:`SFTExample` rows written to Parquet; a seeded share
``rag_fraction`` of them carry the context in the prompt, the rest are asked without it, so the reader learns
both M(x_v, x_t + x_r) and M(x_v, x_t). The loss is the next-token cross-entropy on the answer tokens only.

Model: the reader (tiny or a real local VLM) with peft LoRA on every linear layer of the language model --
not the vision tower, the projector or ``lm_head``, as MMed-RAG's reference code -- and optionally the
projector trained in full; or (``finetune="full"``) every parameter, to pretrain the tiny reader, optionally
with the vision tower frozen (``freeze_vision_tower``: LLaVA's recipe, after ``pretrain_vision``).
Validation: closed-question accuracy with and without retrieval (logit scoring).
Export: the merged reader (``load_reader`` loads it like any other) and ``adapter/`` (the LoRA weights; none
after a full fine-tune).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from torch.utils.data import Dataset

from medrag_ray.config import READER_FINETUNES, LoraSettings
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import Sample
from medrag_ray.mining.noise import sample_seed
from medrag_ray.models.reader import load_reader, save_reader
from medrag_ray.reader.answers import YES_NO
from medrag_ray.reader.context import SampleContext, reader_input
from medrag_ray.reader.engine import ReaderEngine, answer_loss, collate, encode, pad_id, to_model, with_positions
from medrag_ray.reader.prompts import ReaderInput

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
_VISION_TOWER = ("vision_tower", "vision_model", "visual")
"""Module names of a VLM's image encoder (LLaVA, CLIP-style, Qwen2-VL)."""
PROJECTORS = ("multi_modal_projector", "merger", "connector")
"""Module names of a VLM's vision -> language projector: LLaVA / Mistral3 ``multi_modal_projector``, Qwen2-VL
and Qwen2.5-VL ``visual.merger``, Idefics3 / SmolVLM ``connector``. In ``lora.modules_to_save`` any of them
means the model's own projector (:func:`resolve_modules_to_save`), so one config trains every architecture's."""
_NOT_LORA = (*_VISION_TOWER, *PROJECTORS, "lm_head")


@dataclass(frozen=True)
class SFTExample:
    """One training example: the sample, its answer, and the retrieved context when ``use_rag``."""

    id: str
    domain: str
    answer_type: str
    question: str
    answer: str
    image_bytes: bytes
    use_rag: bool
    context_domain: str
    context_texts: tuple[str, ...] = ()
    context_ids: tuple[str, ...] = ()
    context_images: tuple[bytes, ...] = ()
    follow_ups: tuple[tuple[str, str], ...] = ()
    """``(question, answer)`` turns asked after the first answer about the same image and context, each the bare
    question (the tiny reader's pretraining conversations, :mod:`medrag_ray.reader.curriculum`); empty for one
    question."""

    def sample(self) -> Sample:
        return Sample(
            id=self.id,
            domain=self.domain,
            split="train",
            source="sft",
            question=self.question,
            answer=self.answer,
            answer_type=self.answer_type,
            image_bytes=self.image_bytes,
            image_available=True,
        )

    def context(self) -> SampleContext | None:
        if not self.use_rag:
            return None
        return SampleContext(
            self.context_domain, None, self.context_ids, self.context_texts, (), tuple(self.context_images)
        )


SFT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("answer_type", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("image_bytes", pa.binary()),
        ("use_rag", pa.bool_()),
        ("context_domain", pa.string()),
        ("context_texts", pa.list_(pa.string())),
        ("context_ids", pa.list_(pa.string())),
        ("context_images", pa.list_(pa.binary())),
        ("follow_ups", pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string())]))),
    ]
)


def sft_answer(sample: Sample) -> str:
    """The target text: the answer of a question, the report of a report sample."""
    return sample.text if sample.answer_type == "report" else sample.answer


def build_sft_examples(
    samples: Sequence[Sample], contexts: Sequence[SampleContext], rag_fraction: float, seed: int
) -> list[SFTExample]:
    """Pair samples with their contexts; a seeded ``rag_fraction`` share (per sample id) uses the context."""
    if len(samples) != len(contexts):
        raise ValueError(f"{len(samples)} samples but {len(contexts)} contexts; retrieve one context per sample")
    out = []
    for s, c in zip(samples, contexts, strict=True):
        if s.image_bytes is None:
            raise ValueError(f"sample {s.id} has no inline image_bytes; SFT data needs inline images")
        use_rag = bool(c.texts) and np.random.default_rng(sample_seed(seed, s.id)).random() < rag_fraction
        out.append(
            SFTExample(
                id=s.id,
                domain=s.domain,
                answer_type=s.answer_type,
                question=s.question,
                answer=sft_answer(s),
                image_bytes=s.image_bytes,
                use_rag=use_rag,
                context_domain=c.domain,
                context_texts=c.texts,
                context_ids=c.doc_ids,
                context_images=tuple(b for b in c.images if b is not None),
            )
        )
    return out


def write_sft_examples(examples: Sequence[SFTExample], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            **asdict(e),
            "context_texts": list(e.context_texts),
            "context_ids": list(e.context_ids),
            "context_images": list(e.context_images),
            "follow_ups": [{"question": q, "answer": a} for q, a in e.follow_ups],
        }
        for e in examples
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), path)
    return len(rows)


def read_sft_examples(path: str | Path) -> list[SFTExample]:
    rows = pq.read_table(path, schema=SFT_SCHEMA).to_pylist()
    return [
        SFTExample(
            **{
                **r,
                "context_texts": tuple(r["context_texts"]),
                "context_ids": tuple(r["context_ids"]),
                "context_images": tuple(r["context_images"]),
                "follow_ups": tuple((t["question"], t["answer"]) for t in r["follow_ups"] or ()),
            }
        )
        for r in rows
    ]


def example_input(example: SFTExample, style: str) -> ReaderInput:
    image = load_image(example.image_bytes, name=f"sample {example.id}")
    return reader_input(example.sample(), image, example.context(), style)


class SFTDataset(Dataset):
    """Encoded examples (prompt tokens masked out of ``labels``); decoding happens per item, in the worker."""

    def __init__(self, examples: Sequence[SFTExample], processor: Any, style: str) -> None:
        self.examples = list(examples)
        self.processor = processor
        self.style = style

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        e = self.examples[i]
        return encode(self.processor, example_input(e, self.style), e.answer, e.follow_ups)


def lora_targets(model: nn.Module, suffixes: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """Names of the language model's ``nn.Linear`` modules (or those ending with ``suffixes``) to adapt."""
    names = []
    skip = set(_NOT_LORA) | set(exclude)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or skip & set(name.split(".")):
            continue
        if suffixes and not any(name.endswith(s) for s in suffixes):
            continue
        names.append(name)
    if not names:
        raise ValueError(f"no linear layer of the language model matches lora.target_modules={list(suffixes)}")
    return names


def add_lora(model: nn.Module, cfg: LoraSettings) -> PeftModel:
    """Wrap ``model`` with LoRA adapters per ``cfg`` (everything else frozen, except the projector if asked)."""
    save = resolve_modules_to_save(model, cfg.modules_to_save)
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        bias="none",
        target_modules=lora_targets(model, cfg.target_modules, save),
        modules_to_save=save or None,
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(
        "LoRA r=%d on %d modules: %d of %d parameters trainable", cfg.r, len(config.target_modules), trainable, total
    )
    return peft_model


def _has(model: nn.Module, name: str) -> bool:
    return any(n.split(".")[-1] == name for n, _ in model.named_modules())


def resolve_modules_to_save(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``lora.modules_to_save`` for this model: a projector name (:data:`PROJECTORS`) becomes the model's own
    projector (``multi_modal_projector`` -> ``merger`` on Qwen2-VL); any other name must be a module of it."""
    own = [p for p in PROJECTORS if _has(model, p)]
    out, missing = [], []
    for name in names:
        if not _has(model, name) and name in PROJECTORS and own:
            logger.info("lora.modules_to_save: %s is %s's projector %r", name, type(model).__name__, own[0])
            name = own[0]
        (out if _has(model, name) else missing).append(name)
    if missing:
        hint = f" (its projector is {own[0]!r})" if own else ""
        raise ValueError(
            f"lora.modules_to_save names {missing}, which {type(model).__name__} does not have{hint}; name modules "
            "of the model, or [] to train the LoRA adapters only"
        )
    return list(dict.fromkeys(out))


def closed_accuracy(engine: ReaderEngine, examples: Sequence[SFTExample], style: str) -> float:
    """Share of closed examples whose logit-scored answer equals the reference answer."""
    closed = [e for e in examples if e.answer_type == "closed"]
    if not closed:
        return float("nan")
    answers = engine.score_closed([example_input(e, style) for e in closed], YES_NO).answers
    return float(np.mean([a == e.answer.strip().lower() for a, e in zip(answers, closed, strict=True)]))


class ReaderSFTTask:
    """RAG-SFT of a reader directory with LoRA; see the module docstring."""

    def __init__(
        self,
        name: str,
        reader_dir: str | Path,
        train_examples: Sequence[SFTExample],
        val_examples: Sequence[SFTExample],
        lora: LoraSettings,
        style: str = "mmed",
        finetune: str = "lora",
        freeze_vision_tower: bool = False,
    ) -> None:
        if finetune not in READER_FINETUNES:
            raise ValueError(f"{name}: finetune must be 'lora' or 'full', got {finetune!r}")
        if not train_examples:
            raise ValueError(f"{name}: no training examples; check the dataset and tasks=[...]")
        self.name = name
        self.reader_dir = str(reader_dir)
        self.train_examples = list(train_examples)
        self.val_examples = list(val_examples)
        self.lora = lora
        self.style = style
        self.finetune = finetune
        self.freeze_vision_tower = freeze_vision_tower
        self.processor: Any = None
        self.collate = None

    def build_model(self) -> nn.Module:
        model, self.processor = load_reader(self.reader_dir, device="cpu", dtype="float32")
        self.collate = functools.partial(collate, pad=pad_id(self.processor))
        if self.finetune == "full":
            if self.freeze_vision_tower:
                for name, p in model.named_parameters():
                    if set(_VISION_TOWER) & set(name.split(".")):
                        p.requires_grad_(False)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info(
                "full fine-tune%s: %d of %d parameters train",
                " (vision tower frozen)" if self.freeze_vision_tower else "",
                trainable,
                sum(p.numel() for p in model.parameters()),
            )
            return model.train()
        return add_lora(model, self.lora).train()

    def train_dataset(self) -> SFTDataset:
        if self.processor is None:
            raise RuntimeError("call build_model() before train_dataset()")
        return SFTDataset(self.train_examples, self.processor, self.style)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return answer_loss(model, with_positions(model, to_model(model, batch)))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_examples:
            return {}
        engine = ReaderEngine(model, self.processor, batch_size=32)
        with_rag = [e for e in self.val_examples if e.context_texts]
        no_rag = [SFTExample(**{**asdict(e), "use_rag": False}) for e in self.val_examples]
        rag = [SFTExample(**{**asdict(e), "use_rag": True}) for e in with_rag]
        metrics = {"val_accuracy_no_rag": closed_accuracy(engine, no_rag, self.style)}
        if rag:
            metrics["val_accuracy_rag"] = closed_accuracy(engine, rag, self.style)
        return metrics

    def export(self, model: nn.Module, directory: Path) -> None:
        if self.finetune == "full":
            save_reader(model, self.processor, directory)
            return
        info = {"base_reader": self.reader_dir, "style": self.style, "lora": asdict(self.lora)}
        export_lora_reader(model, self.processor, directory, info)


def export_lora_reader(model: nn.Module, processor: Any, directory: Path, info: dict[str, Any]) -> None:
    """Save a LoRA-adapted reader: the merged model (``load_reader`` loads it like any reader, Serve too), the
    adapter in ``adapter/`` and ``adapter/medrag_sft.json`` with ``info`` (base reader, settings)."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"export_lora_reader needs a peft model, got {type(model).__name__}")
    model.save_pretrained(str(directory / ADAPTER_DIR))
    merged = copy.deepcopy(model).merge_and_unload()
    save_reader(merged, processor, directory)
    (directory / ADAPTER_DIR / "medrag_sft.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def make_reader_sft_task(
    name: str,
    reader_dir: str,
    data_dir: str,
    lora: LoraSettings,
    style: str,
    max_val: int,
    finetune: str = "lora",
    freeze_vision_tower: bool = False,
) -> ReaderSFTTask:
    """Read ``train.parquet`` / ``val.parquet`` written by :func:`write_sft_examples` in ``data_dir``."""
    root = Path(data_dir)
    val_path = root / "val.parquet"
    val = read_sft_examples(val_path)[:max_val] if val_path.is_file() and max_val else []
    train = read_sft_examples(root / "train.parquet")
    return ReaderSFTTask(name, reader_dir, train, val, lora, style, finetune, freeze_vision_tower)
