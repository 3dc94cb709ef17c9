"""Streaming readers that validate real source files, unchanged, and turn them into schema records.

One reader per source (see :data:`SOURCES` / :func:`read_source`); every reader takes
``stats: ReadStats``, ``on_error: "raise" | "skip"``, ``rejects: RejectWriter``, ``missing_images:
MissingImageWriter`` and ``limit`` and follows the policy described in :mod:`.common`.
"""

from medrag_ray.data.readers.common import (
    ImageRef,
    MissingImageWriter,
    OnError,
    RawRecord,
    ReadContext,
    RejectWriter,
    load_image,
    normalize_yes_no,
    read_side_file,
    resolve_image_path,
    split_from_name,
    strip_image_tag,
    strip_leading_image_tag,
)
from medrag_ray.data.readers.convert import ConvertResult, convert_source
from medrag_ray.data.readers.medmnist import MEDMNIST_SPECS, MedMNISTSpec, iter_medmnist, label_sentence
from medrag_ray.data.readers.medpix import iter_medpix, iter_medpix_cases, iter_medpix_corpus
from medrag_ray.data.readers.mmed_rag import (
    EMPTY_QUESTIONS,
    MMED_RAG_DATASET_DOMAINS,
    UNPARSEABLE,
    iter_mmed_rag_alignment,
    iter_mmed_rag_report,
    iter_mmed_rag_retriever,
    iter_mmed_rag_vqa,
)
from medrag_ray.data.readers.pathvqa import PATHVQA_SPLIT_FRACTIONS, iter_pathvqa, pathvqa_split
from medrag_ray.data.readers.registry import (
    SOURCE_NAMES,
    SOURCES,
    SourceSpec,
    default_source_path,
    read_source,
    source_spec,
)
from medrag_ray.data.readers.vqa_rad import iter_vqa_rad

__all__ = [
    "EMPTY_QUESTIONS",
    "MEDMNIST_SPECS",
    "MMED_RAG_DATASET_DOMAINS",
    "PATHVQA_SPLIT_FRACTIONS",
    "SOURCES",
    "SOURCE_NAMES",
    "UNPARSEABLE",
    "ConvertResult",
    "ImageRef",
    "MedMNISTSpec",
    "MissingImageWriter",
    "OnError",
    "RawRecord",
    "ReadContext",
    "RejectWriter",
    "SourceSpec",
    "convert_source",
    "default_source_path",
    "iter_medmnist",
    "iter_medpix",
    "iter_medpix_cases",
    "iter_medpix_corpus",
    "iter_mmed_rag_alignment",
    "iter_mmed_rag_report",
    "iter_mmed_rag_retriever",
    "iter_mmed_rag_vqa",
    "iter_pathvqa",
    "iter_vqa_rad",
    "label_sentence",
    "load_image",
    "normalize_yes_no",
    "pathvqa_split",
    "read_side_file",
    "read_source",
    "resolve_image_path",
    "source_spec",
    "split_from_name",
    "strip_image_tag",
    "strip_leading_image_tag",
]
