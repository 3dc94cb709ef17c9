"""The training tasks of issue 3: the domain router F(x_v) and the per-domain retrievers R_d.

Each task builds its model from a dual-encoder directory (the tiny init encoder, or a real open_clip /
BiomedCLIP checkpoint via :func:`~medrag_ray.models.dual_encoder.load_dual_encoder`), so the same job
fine-tunes either. Models are built in float32 on CPU; the DeepSpeed engine moves them to the worker's
device and casts to bf16 when the run's precision says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import UNKNOWN_DOMAIN
from medrag_ray.eval.calibration import calibration_summary
from medrag_ray.eval.classification import ClassificationReport, classification_report
from medrag_ray.eval.retrieval import dedupe_texts, embed_images, embed_texts, retrieval_metrics
from medrag_ray.losses.info_nce import clip_info_nce
from medrag_ray.models.dual_encoder import DualEncoder, load_dual_encoder, save_dual_encoder
from medrag_ray.models.router import DomainRouter, router_from_encoder, save_router
from medrag_ray.train.data import (
    ImageTextDataset,
    ImageTextPair,
    LabeledImage,
    LabeledImageDataset,
    corpus_pairs,
    domain_examples,
    report_pairs,
)

MAX_LOGIT_SCALE = math.log(100.0)
"""CLIP clamps its learned log inverse temperature at log(100)."""


class RetrieverTask:
    """Contrastive fine-tuning of a dual encoder with the symmetric InfoNCE of MMed-RAG Eq. 1.

    Negatives are the other pairs of the worker's micro batch. Validation: loss and in-gallery image->text
    recall@1/5/10 over the validation pairs (:mod:`medrag_ray.eval.retrieval` rules: identical texts count
    once, ties rank the positive last).
    """

    def __init__(
        self,
        name: str,
        init_encoder_dir: str | Path,
        train_pairs: Sequence[ImageTextPair],
        val_pairs: Sequence[ImageTextPair],
    ) -> None:
        if not train_pairs:
            raise ValueError(f"{name}: no training pairs; check the corpus path and the domain")
        self.name = name
        self.init_encoder_dir = str(init_encoder_dir)
        self.train_pairs = list(train_pairs)
        self.val_pairs = list(val_pairs)
        self._encoder: DualEncoder | None = None

    def build_model(self) -> nn.Module:
        self._encoder = load_dual_encoder(self.init_encoder_dir, device="cpu", dtype="float32").train()
        return self._encoder

    def _built(self) -> DualEncoder:
        if self._encoder is None:
            raise RuntimeError("call build_model() before train_dataset()")
        return self._encoder

    def train_dataset(self) -> ImageTextDataset:
        encoder = self._built()
        return ImageTextDataset(self.train_pairs, encoder.transform, encoder.tokenize)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        assert isinstance(model, DualEncoder)
        pixels, tokens = batch
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        image_emb, text_emb, scale = model(pixels, tokens)
        return clip_info_nce(image_emb.float(), text_emb.float(), logit_scale=scale.float())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        assert isinstance(model, DualEncoder)
        if len(self.val_pairs) < 2:
            return {}
        texts = [p.text for p in self.val_pairs]
        image_emb = embed_images(model, [p.image_bytes for p in self.val_pairs])
        text_emb = embed_texts(model, texts)
        scale = float(model.logit_scale)
        loss = clip_info_nce(torch.from_numpy(image_emb), torch.from_numpy(text_emb), logit_scale=scale)
        gallery, positive = dedupe_texts(texts)
        first = [positive.index(g) for g in range(len(gallery))]
        result = retrieval_metrics(image_emb @ text_emb[first].T, positive, [p.id for p in self.val_pairs])
        metrics = {"val_loss": float(loss), "logit_scale": scale}
        metrics.update({f"val_recall@{k}": v for k, v in result["recall"].items()})
        return metrics

    def export(self, model: nn.Module, directory: Path) -> None:
        assert isinstance(model, DualEncoder)
        save_dual_encoder(model, directory)


def predict_domains(router: DomainRouter, examples: Sequence[LabeledImage], batch_size: int = 64) -> list[str]:
    """The router's domain for each example's image."""
    logits = torch.from_numpy(router_logits(router, examples, batch_size))
    return [d for d, _ in router.predictions_from_logits(logits)]


@torch.no_grad()
def router_logits(router: DomainRouter, examples: Sequence[LabeledImage], batch_size: int = 64) -> np.ndarray:
    """The router's raw logits ``[n, domains]`` for the examples' images."""
    rows = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pixels = router.preprocess([load_image(e.image_bytes, name=f"example {e.id}") for e in chunk])
        rows.append(router(pixels).float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, len(router.domains)), dtype=np.float32)


def calibrate_router(router: DomainRouter, examples: Sequence[LabeledImage], keep: float) -> dict[str, float]:
    """Fit the router's temperature and unknown-domain threshold on labelled (validation) examples of its domains
    (:func:`medrag_ray.eval.calibration.calibration_summary`), set them on ``router`` and return the summary."""
    known = [e for e in examples if e.label in router.domains]
    if not known:
        raise ValueError(f"no calibration example is of the router's domains {list(router.domains)}")
    labels = np.asarray([router.domains.index(e.label) for e in known])
    summary = calibration_summary(router_logits(router, known), labels, keep)
    router.set_calibration(summary["temperature"], summary["unknown_threshold"])
    return summary


def evaluate_router(router: DomainRouter, examples: Sequence[LabeledImage]) -> ClassificationReport:
    """Per-domain precision/recall and confusion of ``router`` on labelled examples of its domains."""
    predicted = predict_domains(router, examples)
    labels = (*router.domains, UNKNOWN_DOMAIN) if UNKNOWN_DOMAIN in predicted else router.domains
    return classification_report([e.label for e in examples], predicted, labels)


class RouterTask:
    """Domain identification F(x_v) (MMed-RAG §3.1): image tower + linear head, cross-entropy on domains."""

    def __init__(
        self,
        init_encoder_dir: str | Path,
        domains: Sequence[str],
        train_examples: Sequence[LabeledImage],
        val_examples: Sequence[LabeledImage],
        name: str = "router",
    ) -> None:
        self.name = name
        self.init_encoder_dir = str(init_encoder_dir)
        self.domains = tuple(domains)
        self.train_examples = list(train_examples)
        self.val_examples = [e for e in val_examples if e.label in self.domains]
        self._router: DomainRouter | None = None

    def build_model(self) -> nn.Module:
        encoder = load_dual_encoder(self.init_encoder_dir, device="cpu", dtype="float32")
        self._router = router_from_encoder(encoder, self.domains).train()
        return self._router

    def train_dataset(self) -> LabeledImageDataset:
        if self._router is None:
            raise RuntimeError("call build_model() before train_dataset()")
        return LabeledImageDataset(self.train_examples, self.domains, self._router.encoder.transform)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        pixels, labels = batch
        logits = model(pixels)
        return F.cross_entropy(logits.float(), labels.to(logits.device))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        assert isinstance(model, DomainRouter)
        if not self.val_examples:
            return {}
        report = evaluate_router(model, self.val_examples)
        metrics = {"val_accuracy": report.accuracy, "val_macro_f1": report.macro_f1}
        for d in self.domains:
            metrics[f"val_recall_{d}"] = report.recall(d)
            metrics[f"val_precision_{d}"] = report.precision(d)
        return metrics

    def export(self, model: nn.Module, directory: Path) -> None:
        assert isinstance(model, DomainRouter)
        save_router(model, directory)


# ----------------------------------------------------------------------------- task factories
# Module-level builders, so a ``functools.partial`` of them pickles as paths (cheap) and every Ray Train
# worker reads its own data.


def dataset_file(dataset_dir: str | Path, name: str) -> Path:
    """``dataset_dir/name``, or a FileNotFoundError with the commands that build such a dataset."""
    path = Path(dataset_dir) / name
    if not path.is_file():
        routing = f" (real images for the router: `python jobs/make_routing_data.py out_dir={dataset_dir}`)"
        raise FileNotFoundError(
            f"dataset_dir: {path} is missing; build the synthetic dataset with `python jobs/make_data.py "
            f"out_dir={dataset_dir}`{routing if name.startswith('samples_') else ''} or point dataset_dir at a "
            "dataset in that layout"
        )
    return path


def make_retriever_task(
    name: str, init_encoder_dir: str, dataset_dir: str, domains: Sequence[str] | None
) -> RetrieverTask:
    """Train on the corpus pairs of ``domains`` (None = all), validate on ``samples_val.parquet`` reports."""
    train_pairs = corpus_pairs(dataset_file(dataset_dir, "corpus.parquet"), domains)
    val_path = Path(dataset_dir) / "samples_val.parquet"
    val_pairs = report_pairs(val_path, domains) if val_path.is_file() else []
    return RetrieverTask(name, init_encoder_dir, train_pairs, val_pairs)


def make_router_task(name: str, init_encoder_dir: str, dataset_dir: str, domains: Sequence[str]) -> RouterTask:
    train_examples = domain_examples(dataset_file(dataset_dir, "samples_train.parquet"), domains)
    val_path = Path(dataset_dir) / "samples_val.parquet"
    val_examples = domain_examples(val_path, domains) if val_path.is_file() else []
    return RouterTask(init_encoder_dir, domains, train_examples, val_examples, name=name)


def resolve_domains(path: Path, requested: Sequence[str], min_domains: int = 1) -> list[str]:
    """``requested`` (or, when empty, every domain in the Parquet file ``path``), checked against the file."""
    import pyarrow.parquet as pq

    available = sorted(set(pq.read_table(path, columns=["domain"]).column("domain").to_pylist()))
    domains = list(requested) or available
    missing = [d for d in domains if d not in available]
    if missing:
        raise ValueError(f"domains {missing} have no rows in {path} (it has {available}); fix domains=[...]")
    if len(domains) < min_domains:
        raise ValueError(f"{path} gives domains {domains}; this job needs at least {min_domains} (set domains=[...])")
    return domains


def check_init_encoder(directory: str) -> str:
    """The absolute path of an existing start-from encoder directory (or an error saying how to get one)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(
            f"init_encoder_dir {directory} does not exist; run `python jobs/prepare_models.py` or point it at a "
            "dual-encoder / open_clip checkpoint directory"
        )
    return str(path.resolve())
