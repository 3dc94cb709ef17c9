"""The registry of sources: name -> reader, record class, default location in the shared data folder."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medrag_ray.data.readers.common import PathLike, Record
from medrag_ray.data.readers.medmnist import iter_medmnist
from medrag_ray.data.readers.medpix import iter_medpix, iter_medpix_cases, iter_medpix_corpus
from medrag_ray.data.readers.mmed_rag import (
    iter_mmed_rag_alignment,
    iter_mmed_rag_report,
    iter_mmed_rag_retriever,
    iter_mmed_rag_vqa,
)
from medrag_ray.data.readers.pathvqa import iter_pathvqa
from medrag_ray.data.readers.vqa_rad import iter_vqa_rad
from medrag_ray.data.schema import CorpusDoc, PreferencePair, Sample


@dataclass(frozen=True)
class SourceSpec:
    """One readable source."""

    name: str
    reader: Callable[..., Iterator[Any]]
    record_cls: type[Sample] | type[CorpusDoc] | type[PreferencePair]
    default_path: str
    """Where the source lies inside the shared data folder (``../shared/data``)."""
    description: str

    def options(self) -> tuple[str, ...]:
        """Keyword options the reader takes (besides ``path``)."""
        return tuple(p for p in inspect.signature(self.reader).parameters if p != "path")


SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        SourceSpec("mmed_rag_retriever", iter_mmed_rag_retriever, CorpusDoc, "mmed_rag/training/retriever",
                   "MMed-RAG retriever corpora (report/caption + image path), domain = folder"),
        SourceSpec("mmed_rag_alignment", iter_mmed_rag_alignment, PreferencePair, "mmed_rag/training/alignment",
                   "MMed-RAG DPO preference pairs (conversations / rejected_conversations)"),
        SourceSpec("mmed_rag_vqa", iter_mmed_rag_vqa, Sample, "mmed_rag/test/vqa",
                   "MMed-RAG closed VQA test sets (yes/no answers normalized)"),
        SourceSpec("mmed_rag_report", iter_mmed_rag_report, Sample, "mmed_rag/test/report",
                   "MMed-RAG report-generation test sets"),
        SourceSpec("vqa_rad", iter_vqa_rad, Sample, "vqa_rad", "VQA-RAD radiology VQA (train/test)"),
        SourceSpec("pathvqa", iter_pathvqa, Sample, "pathvqa/qa.jsonl",
                   "PathVQA pathology VQA, split by image hash 80/10/10"),
        SourceSpec("medpix", iter_medpix, Sample, "medpix2", "MedPix 2.0 images with captions (report samples)"),
        SourceSpec("medpix_corpus", iter_medpix_corpus, CorpusDoc, "medpix2",
                   "MedPix 2.0 image captions as corpus documents"),
        SourceSpec("medpix_cases", iter_medpix_cases, CorpusDoc, "medpix2",
                   "MedPix 2.0 case reports (history/findings/diagnosis/discussion) as corpus documents"),
        SourceSpec("medmnist", iter_medmnist, Sample, "medmnist",
                   "MedMNIST .npz (retina/pneumonia/derma) as label samples with PNG bytes"),
    )
}  # fmt: skip
SOURCE_NAMES: tuple[str, ...] = tuple(SOURCES)


def source_spec(name: str) -> SourceSpec:
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; choose one of {list(SOURCE_NAMES)}")
    return SOURCES[name]


def default_source_path(name: str, shared_dir: PathLike | None) -> Path | None:
    """The source's default input under the shared data folder (None when there is no such folder)."""
    return Path(shared_dir) / source_spec(name).default_path if shared_dir is not None else None


def read_source(name: str, path: PathLike, **options: Any) -> Iterator[Record]:
    """Stream the records of source ``name`` from ``path``; ``options`` are the reader's keyword options.

    An option the source's reader does not take is an error naming the options it does take.
    """
    spec = source_spec(name)
    allowed = spec.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"source {name!r} does not take option(s) {unknown}; its options: {list(allowed)}")
    return spec.reader(path, **options)
