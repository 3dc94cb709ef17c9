"""MedMNIST reader: ``<dataset>.npz`` -> one :class:`Sample` per image (``answer_type="label"``).

Keys ``{train,val,test}_images`` (uint8, ``(N, H, W)`` or ``(N, H, W, 3)``) and ``*_labels``
(``(N, 1)``); the split is the key's. Each sample carries the pixels PNG-encoded in ``image_bytes``
(``image_available=True``), ``answer`` = the official class name, ``text`` = a short label sentence,
and ``meta`` = dataset, label index, split index, image size.

Datasets and official classes (MedMNIST v2, ``medmnist.INFO``):

* ``retinamnist`` (ophthalmology): DR severity grade 0-4 (ICDR scale, DeepDRiD images);
* ``pneumoniamnist`` (radiology): normal / pneumonia (pediatric chest X-ray);
* ``dermamnist`` (dermatology): the 7 HAM10000 diagnoses.

File names may carry a MedMNIST+ size suffix (``dermamnist_224.npz``); ``dataset=`` overrides the name.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from medrag_ray.data.readers.common import (
    MissingImageWriter,
    OnError,
    PathLike,
    RawRecord,
    ReadContext,
    RejectWriter,
    collect_files,
    encode_png,
    file_error_record,
)
from medrag_ray.data.schema import SPLITS, ReadStats, RecordError, Sample, dumps_meta


@dataclass(frozen=True)
class MedMNISTSpec:
    """A MedMNIST dataset: its domain, what its images are, and its classes by label index."""

    domain: str
    subject: str
    """Start of the label sentence: ``"<subject> showing <description>."``."""
    classes: tuple[str, ...]
    """Class names (the ``answer``), indexed by label."""
    descriptions: tuple[str, ...]
    """What the label sentence says for each class."""


_DERMA_DIAGNOSES = (
    "actinic keratoses and intraepithelial carcinoma",
    "basal cell carcinoma",
    "benign keratosis-like lesions",
    "dermatofibroma",
    "melanoma",
    "melanocytic nevi",
    "vascular lesions",
)
"""The 7 HAM10000 diagnoses: DermaMNIST's class names, which its label sentences also use."""

MEDMNIST_SPECS: dict[str, MedMNISTSpec] = {
    "retinamnist": MedMNISTSpec(
        domain="ophthalmology",
        subject="A retinal fundus image",
        classes=("DR grade 0", "DR grade 1", "DR grade 2", "DR grade 3", "DR grade 4"),
        descriptions=(
            "no diabetic retinopathy (grade 0)",
            "mild non-proliferative diabetic retinopathy (grade 1)",
            "moderate non-proliferative diabetic retinopathy (grade 2)",
            "severe non-proliferative diabetic retinopathy (grade 3)",
            "proliferative diabetic retinopathy (grade 4)",
        ),
    ),
    "pneumoniamnist": MedMNISTSpec(
        domain="radiology",
        subject="A pediatric chest X-ray",
        classes=("normal", "pneumonia"),
        descriptions=("normal lungs without pneumonia", "pneumonia"),
    ),
    "dermamnist": MedMNISTSpec(
        domain="dermatology",
        subject="A dermatoscopic image",
        classes=_DERMA_DIAGNOSES,
        descriptions=_DERMA_DIAGNOSES,
    ),
}


_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def medmnist_dataset_name(file: Path) -> str:
    """``dermamnist.npz`` / ``dermamnist_224.npz`` -> ``dermamnist``."""
    return re.sub(r"_\d+$", "", file.stem.lower())


def label_sentence(dataset: str, label: int) -> str:
    spec = MEDMNIST_SPECS[dataset]
    return f"{spec.subject} showing {spec.descriptions[label]}."


def _raw_records(file: Path, splits: Sequence[str]) -> Iterator[RawRecord]:
    """Rows of one npz as raw records ``(split, index, pixels, label)``; file-level problems as errors."""
    try:
        npz = np.load(file, allow_pickle=False)
    except _NPZ_ERRORS as exc:
        yield file_error_record(file, "file", "<npz>", f"cannot read the npz archive ({exc}); re-download the file")
        return
    with npz:
        present = [s for s in splits if f"{s}_images" in npz.files]
        if not present:
            yield file_error_record(
                file, "keys", "<npz>", f"has none of {[f'{s}_images' for s in splits]} (keys: {npz.files})"
            )
            return
        for split in present:
            if f"{split}_labels" not in npz.files:
                yield file_error_record(file, f"{split}_labels", f"{split}_labels", "is missing next to the images")
                continue
            try:
                images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            except _NPZ_ERRORS as exc:
                yield file_error_record(file, f"{split}_images", "<npz>", f"cannot read the arrays ({exc})")
                continue
            labels = labels.reshape(len(labels), -1) if labels.ndim > 0 else labels
            if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
                yield file_error_record(
                    file,
                    f"{split}_images",
                    f"{split}_images",
                    f"expected uint8 (N, H, W[, C]) images with one label row each, got {images.dtype} "
                    f"{images.shape} and labels {labels.shape}",
                )
                continue
            for i in range(len(images)):
                row = labels[i]
                yield RawRecord(
                    file,
                    f"{split}_images[{i}]",
                    i,
                    data=(split, i, images[i], row),
                    raw_text=f'{{"split": "{split}", "index": {i}, "label": {row.tolist()}}}',
                )


def _convert(raw: RawRecord, *, dataset: str | None) -> Sample:
    name = dataset or medmnist_dataset_name(raw.file)
    spec = MEDMNIST_SPECS.get(name)
    if spec is None:
        raise RecordError(
            "domain",
            f"unknown MedMNIST dataset {name!r} (from {raw.file.name}); known: {sorted(MEDMNIST_SPECS)}; "
            "rename the file or pass dataset=...",
        )
    split, index, pixels, label_row = raw.data
    if label_row.size != 1:
        raise RecordError(f"{split}_labels", f"expected one class label, got {label_row.tolist()} (multi-label?)")
    label = int(label_row.reshape(-1)[0])
    if not 0 <= label < len(spec.classes):
        raise RecordError(f"{split}_labels", f"label {label} is outside 0..{len(spec.classes) - 1} for {name}")
    if pixels.ndim == 3 and pixels.shape[2] not in (1, 3):
        raise RecordError(f"{split}_images", f"expected 1 or 3 channels, got shape {pixels.shape}")
    meta = {
        "dataset": name,
        "label": label,
        "index": index,
        "height": int(pixels.shape[0]),
        "width": int(pixels.shape[1]),
    }
    return Sample(
        id=f"medmnist/{name}/{split}/{index}",
        domain=spec.domain,
        split=split,
        source=name,
        text=label_sentence(name, label),
        answer=spec.classes[label],
        answer_type="label",
        image_bytes=encode_png(pixels),
        image_available=True,
        meta=dumps_meta(meta),
    )


def iter_medmnist(
    path: PathLike,
    *,
    dataset: str | None = None,
    splits: Sequence[str] = SPLITS,
    stats: ReadStats | None = None,
    on_error: OnError = "raise",
    rejects: RejectWriter | None = None,
    missing_images: MissingImageWriter | None = None,
    limit: int = 0,
) -> Iterator[Sample]:
    """MedMNIST images from one ``.npz`` or every ``*.npz`` in a folder (train, val, test in that order)."""
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"medmnist: splits must be a non-empty subset of {list(SPLITS)}, got {list(splits)}")
    if dataset is not None and dataset not in MEDMNIST_SPECS:
        raise ValueError(f"medmnist: dataset={dataset!r} is not one of {sorted(MEDMNIST_SPECS)}")
    files = collect_files(path, ["*.npz"], "medmnist")
    ctx = ReadContext(
        "medmnist", stats=stats, on_error=on_error, rejects=rejects, missing_images=missing_images,
        check_images=False, limit=limit,
    )  # fmt: skip
    return ctx.read_files(files, partial(_raw_records, splits=splits), partial(_convert, dataset=dataset))
