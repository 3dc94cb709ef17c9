"""Training datasets decoded lazily from Parquet rows: (image, text) pairs and (image, label) examples."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import CorpusDoc, Sample, read_parquet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageTextPair:
    """One (image, text) training pair of a domain; ``id`` names the document or sample."""

    id: str
    domain: str
    image_bytes: bytes
    text: str


@dataclass(frozen=True)
class LabeledImage:
    id: str
    image_bytes: bytes
    label: str
    source: str = ""


def _inline(record: Sample | CorpusDoc, path: Path) -> bytes:
    if record.image_bytes is None:
        raise ValueError(
            f"{path}: row {record.id} has no inline image_bytes; training reads inline images only "
            "(convert the source with jobs/convert_data.py embed_images=true)"
        )
    return record.image_bytes


def corpus_pairs(path: str | Path, domains: Sequence[str] | None = None) -> list[ImageTextPair]:
    """The (image, report/caption) pairs of a corpus Parquet file, optionally restricted to ``domains``."""
    path = Path(path)
    docs = read_parquet(path, CorpusDoc)
    return [
        ImageTextPair(d.id, d.domain, _inline(d, path), d.text)
        for d in docs
        if domains is None or d.domain in domains
    ]


def distinct_images(
    path: Path, domains: Sequence[str] | None, require_text: bool = False
) -> Iterator[tuple[Sample, bytes]]:
    """The first row of each distinct image (by content hash) of a samples Parquet file, with its bytes,
    among the rows of ``domains`` (None = all) that have a non-empty ``text`` when ``require_text``."""
    seen: set[str] = set()
    for s in read_parquet(path, Sample):
        if (domains is not None and s.domain not in domains) or (require_text and not s.text.strip()):
            continue
        data = _inline(s, path)
        key = hashlib.sha1(data).hexdigest()
        if key not in seen:
            seen.add(key)
            yield s, data


def report_pairs(path: str | Path, domains: Sequence[str] | None = None) -> list[ImageTextPair]:
    """(image, report) pairs from a samples Parquet file: one per distinct image with a non-empty text."""
    rows = distinct_images(Path(path), domains, require_text=True)
    return [ImageTextPair(s.id, s.domain, data, s.text) for s, data in rows]


def domain_examples(path: str | Path, domains: Sequence[str] | None = None) -> list[LabeledImage]:
    """One (image, domain) example per distinct image of a samples Parquet file (rows sharing an image
    -- several questions about one case -- would otherwise weight that image several times)."""
    rows = distinct_images(Path(path), domains)
    return [LabeledImage(s.id, data, s.domain, s.source) for s, data in rows]


class ImageTextDataset(Dataset):
    """Yields ``(pixels [3, S, S], token ids [L])`` for the dual encoder's contrastive loss (Eq. 1)."""

    def __init__(
        self,
        pairs: Sequence[ImageTextPair],
        transform: Callable[[Image.Image], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor],
    ) -> None:
        if not pairs:
            raise ValueError("ImageTextDataset got no pairs; check the dataset path and the domain filter")
        self.pairs = list(pairs)
        self.transform = transform
        self.tokens = tokenize([p.text for p in self.pairs])  # tokenise once, not per epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[i]
        return self.transform(load_image(pair.image_bytes, name=f"pair {pair.id}")), self.tokens[i]


class LabeledImageDataset(Dataset):
    """Yields ``(pixels [3, S, S], label index)`` with labels indexed in the order of ``labels``."""

    def __init__(
        self,
        examples: Sequence[LabeledImage],
        labels: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        if not examples:
            raise ValueError("LabeledImageDataset got no examples; check the dataset path and the domain filter")
        unknown = sorted({e.label for e in examples} - set(labels))
        if unknown:
            raise ValueError(f"examples have labels {unknown} outside {list(labels)}; add them or filter them out")
        self.examples = list(examples)
        self.index = {label: i for i, label in enumerate(labels)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        ex = self.examples[i]
        return self.transform(load_image(ex.image_bytes, name=f"example {ex.id}")), self.index[ex.label]
