"""The real-data domain-routing dataset: one labelled Sample per distinct image of the real sources.

MMed-RAG's domain identification F(x_v) is a classifier over image domains. The synthetic data is easy to
route (each domain is drawn differently); this dataset measures and trains routing on real images from
the shared data folder (``../shared/data``, see its README):

=================  ===============  ==========================================================
source             domain           official split used
=================  ===============  ==========================================================
``vqa_rad``        radiology        ``trainset.json`` / ``testset.json`` (val carved from train)
``medpix2``        radiology        test only (the MedPix 2.0 test split is all there is here)
``pathvqa``        pathology        the reader's split by hash of the image (80 / 10 / 10)
``retinamnist``    ophthalmology    MedMNIST train / val / test
``pneumoniamnist`` radiology        MedMNIST train / val / test
``dermamnist``     dermatology      MedMNIST train / val / test
=================  ===============  ==========================================================

Rules, in the order they are applied:

1. **One entry per distinct image.** VQA-RAD and PathVQA have many questions per image: their records are
   grouped by image file. Identity is the SHA-256 of the *decoded pixels* (size + RGB bytes,
   :func:`pixel_hash`), so re-encoded copies are caught too; identical images are merged (within a
   source and across sources, sources taken in config order, keys in sorted order; the first is kept).
2. **Held-out precedence.** An image is in the most held-out split any of its copies or records has
   officially: test > val > train. VQA-RAD's official split is by *question*, and every image a test
   question uses also has train questions, so those images are test images here (the rest of VQA-RAD
   is train); PneumoniaMNIST has a few images in both train and val, which go to val. No image is in
   two splits.
3. **Val carving.** A source without a val split (VQA-RAD) moves the train images whose hash fraction
   (``hash_fraction("val:" + pixel_hash)``) is below ``val_fraction`` to val: deterministic, and
   independent of the other images and of the seed.
4. **Cap.** At most ``max_per_source_split`` images per (source, split), the ones with the smallest
   ``sha256(f"{seed}:{pixel_hash}")``: a deterministic uniform sample, so MedMNIST does not drown the
   other sources.

Each Sample: ``domain`` = the source's domain, ``answer_type="label"``, ``answer`` = the domain,
``question`` empty, ``text`` = the source's own text for the image (MedPix caption, MedMNIST label
sentence; empty for the VQA sources), the original ``source``, ``image_bytes`` = the original file's bytes
(MedMNIST: the reader's PNG of the 28x28 pixels, kept at that size; the encoder's transform resizes), or
a PNG downscaled to ``max_image_side`` when that is set, and ``meta`` with ``pixel_sha256``, the
``official_splits``, the ``split_rule`` that decided the split and source facts (question count, organ,
modality, class). Written like the synthetic dataset: ``samples_{train,val,test}.parquet`` plus
``summary.json`` (config, per-source/split counts before and after the cap, what was dropped and why,
file hashes), atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from medrag_ray.config import ROUTING_SOURCE_NAMES, RoutingDataConfig, to_dict
from medrag_ray.data.readers.common import hash_fraction, load_image
from medrag_ray.data.readers.medmnist import MEDMNIST_SPECS, iter_medmnist
from medrag_ray.data.readers.medpix import iter_medpix
from medrag_ray.data.readers.pathvqa import iter_pathvqa
from medrag_ray.data.readers.vqa_rad import iter_vqa_rad
from medrag_ray.data.schema import SPLITS, ReadStats, RecordError, Sample, dumps_meta
from medrag_ray.data.synthetic import write_split_samples
from medrag_ray.utils import atomic_output_dir

logger = logging.getLogger(__name__)

FORMAT = "medrag-ray routing dataset"
SUMMARY_NAME = "summary.json"
SPLIT_PRECEDENCE: tuple[str, ...] = ("test", "val", "train")
"""Most held-out first: an image with copies or records in several splits goes to the first of these."""


@dataclass(frozen=True)
class RoutingSource:
    """One source of the routing dataset: its domain, where it lies in the shared folder, its splits."""

    name: str
    domain: str
    relpath: str
    """File or folder inside the shared data folder."""
    official_splits: tuple[str, ...]
    """Splits the source has; a source without ``val`` gets one carved from its train images."""


ROUTING_SOURCES: dict[str, RoutingSource] = {
    s.name: s
    for s in (
        RoutingSource("vqa_rad", "radiology", "vqa_rad", ("train", "test")),
        RoutingSource("medpix2", "radiology", "medpix2", ("test",)),
        RoutingSource("pathvqa", "pathology", "pathvqa/qa.jsonl", SPLITS),
        *(
            RoutingSource(name, spec.domain, f"medmnist/{name}.npz", SPLITS)
            for name, spec in MEDMNIST_SPECS.items()
        ),
    )
}
if tuple(ROUTING_SOURCES) != ROUTING_SOURCE_NAMES:  # pragma: no cover - a developer error, caught by any test
    raise RuntimeError(
        f"medrag_ray.config.ROUTING_SOURCE_NAMES {ROUTING_SOURCE_NAMES} and ROUTING_SOURCES {tuple(ROUTING_SOURCES)} "
        "disagree; keep them in sync"
    )


# ----------------------------------------------------------------------------------- image entries


@dataclass
class ImageEntry:
    """One distinct image of a source before the split rules: where it came from and what it shows."""

    source: str
    domain: str
    key: str
    """Unique within the source: the image file name, or ``<split>/<index>`` for MedMNIST."""
    official_splits: set[str]
    image_path: str = ""
    image_bytes: bytes | None = None
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    pixel_sha256: str = ""
    width: int = 0
    height: int = 0


@dataclass
class SourceCounts:
    """What happened to one source's records and images (``summary.json``'s ``sources`` entries)."""

    records: ReadStats = field(default_factory=ReadStats)
    distinct_images: int = 0
    bad_images: int = 0
    duplicates_dropped: int = 0
    moved_to_held_out: int = 0
    carved_val: int = 0
    available: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        r = self.records
        return {
            "records": {"read": r.read, "kept": r.kept, "rejected": r.rejected, "missing_images": r.missing_images},
            "distinct_images": self.distinct_images,
            "bad_images": self.bad_images,
            "duplicates_dropped": self.duplicates_dropped,
            "moved_to_held_out": self.moved_to_held_out,
            "carved_val": self.carved_val,
            "available": {sp: self.available[sp] for sp in SPLITS},
            "kept": {sp: self.kept[sp] for sp in SPLITS},
        }


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of an image's size and RGB pixels: equal for the same picture however it was encoded."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def source_path(source: str, shared_dir: Path) -> Path:
    """Where ``source`` lies in the shared folder; a missing one is an error naming the remedy."""
    path = shared_dir / ROUTING_SOURCES[source].relpath
    if not path.exists():
        raise FileNotFoundError(
            f"routing source {source!r}: {path} does not exist; put the shared data there (see "
            f"{shared_dir / 'README.md'}) or drop {source} from data.sources"
        )
    return path


def _group_by_image(records: Iterable[Sample], source: str, meta_keys: tuple[str, ...] = ()) -> list[ImageEntry]:
    """Questions grouped by their image file: one entry per file, with the splits and count of its records."""
    by_path: dict[str, ImageEntry] = {}
    n_questions: Counter[str] = Counter()
    for s in records:
        if not s.image_available:
            continue  # counted by the reader as a missing image
        entry = by_path.get(s.image_path)
        if entry is None:
            meta = json.loads(s.meta)
            entry = by_path[s.image_path] = ImageEntry(
                source=source,
                domain=ROUTING_SOURCES[source].domain,
                key=Path(s.image_path).name,
                official_splits=set(),
                image_path=s.image_path,
                meta={k: meta[k] for k in meta_keys if meta.get(k)},
            )
        entry.official_splits.add(s.split)
        n_questions[s.image_path] += 1
    for path, entry in by_path.items():
        entry.meta["n_questions"] = n_questions[path]
    return [by_path[p] for p in sorted(by_path)]


def _read_entries(source: str, path: Path, counts: SourceCounts, on_error: str) -> list[ImageEntry]:
    """The distinct images of one source (bytes not yet read for file sources)."""
    opts: dict[str, Any] = {"stats": counts.records, "on_error": on_error}
    domain = ROUTING_SOURCES[source].domain
    if source == "vqa_rad":
        return _group_by_image(iter_vqa_rad(path, check_images=False, **opts), source, ("organ",))
    if source == "pathvqa":
        return _group_by_image(iter_pathvqa(path, check_images=False, **opts), source)
    if source == "medpix2":
        out = []
        for s in iter_medpix(path, check_images=False, **opts):
            if not s.image_available:
                continue
            meta = json.loads(s.meta)
            keep = ("case_id", "type", "modality", "plane", "location_category")
            out.append(
                ImageEntry(
                    source, domain, Path(s.image_path).name, {s.split}, image_path=s.image_path, text=s.text,
                    meta={k: meta[k] for k in keep if meta.get(k)},
                )  # fmt: skip
            )
        return out
    out = []
    for s in iter_medmnist(path, dataset=source, **opts):
        meta = json.loads(s.meta)
        out.append(
            ImageEntry(
                source, domain, f"{s.split}/{meta['index']}", {s.split}, image_bytes=s.image_bytes, text=s.text,
                meta={"label": meta["label"], "class": s.answer},
            )  # fmt: skip
        )
    return out


def _downscaled_png(data: bytes, max_side: int) -> bytes:
    """``data`` unchanged when it fits in ``max_side``, else a PNG of the image shrunk to fit (aspect kept)."""
    with Image.open(io.BytesIO(data)) as im:
        if max(im.size) <= max_side:
            return data
        im = im.convert("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


def _load_pixels(entries: list[ImageEntry], counts: SourceCounts, cfg: RoutingDataConfig) -> list[ImageEntry]:
    """Read and decode every entry's image once: bytes, pixel hash, size; bad images raise or are skipped."""
    good = []
    source = entries[0].source if entries else ""
    for entry in tqdm(entries, desc=f"decode {source}", unit="img", leave=False, disable=len(entries) < 500):
        try:
            data = entry.image_bytes if entry.image_bytes is not None else Path(entry.image_path).read_bytes()
            image = load_image(data, name=entry.image_path or f"{entry.source}/{entry.key}")
        except (OSError, RecordError) as exc:
            if not cfg.skip_bad:
                raise RecordError(
                    "image",
                    f"{exc}; pass data.skip_bad=true to skip undecodable images",
                    source=entry.source,
                    location=entry.key,
                ) from None
            counts.bad_images += 1
            logger.warning("%s: skipping undecodable image %s (%s)", entry.source, entry.key, exc)
            continue
        entry.pixel_sha256 = pixel_hash(image)
        entry.width, entry.height = image.size
        entry.image_bytes = _downscaled_png(data, cfg.max_image_side) if cfg.max_image_side else data
        good.append(entry)
    return good


# ------------------------------------------------------------------------------------------ rules


def held_out_split(splits: Iterable[str]) -> str:
    """The most held-out of ``splits`` (test > val > train)."""
    present = set(splits)
    for split in SPLIT_PRECEDENCE:
        if split in present:
            return split
    raise ValueError(f"no split among {sorted(present)}; expected some of {list(SPLITS)}")


def dedupe_images(entries: list[ImageEntry], counts: Mapping[str, SourceCounts]) -> list[ImageEntry]:
    """One entry per pixel hash: the first (input order) is kept and gets the union of the group's splits.

    A copy found in another source is dropped too (logged: two sources sharing a picture is a data issue,
    and a warning when their domains differ).
    """
    first: dict[str, ImageEntry] = {}
    for entry in entries:
        kept = first.get(entry.pixel_sha256)
        if kept is None:
            first[entry.pixel_sha256] = entry
            continue
        kept.official_splits |= entry.official_splits
        counts[entry.source].duplicates_dropped += 1
        if kept.source != entry.source:
            log = logger.warning if kept.domain != entry.domain else logger.info
            log(
                "image %s/%s (%s) is identical to %s/%s (%s); keeping the first",
                entry.source, entry.key, entry.domain, kept.source, kept.key, kept.domain,
            )  # fmt: skip
    return list(first.values())


def assign_split(entry: ImageEntry, val_fraction: float) -> tuple[str, str]:
    """``(split, rule)`` of an entry: held-out precedence, then val carving where the source has no val."""
    split = held_out_split(entry.official_splits)
    rule = "official" if len(entry.official_splits) == 1 else "held_out_precedence"
    has_val = "val" in ROUTING_SOURCES[entry.source].official_splits
    if split == "train" and not has_val and hash_fraction(f"val:{entry.pixel_sha256}") < val_fraction:
        return "val", "carved_val"
    return split, rule


def sample_order_key(pixel_sha256: str, seed: int) -> str:
    """The capped sample keeps the entries with the smallest keys (a seeded, deterministic uniform sample)."""
    return hashlib.sha256(f"{seed}:{pixel_sha256}".encode()).hexdigest()


def to_sample(entry: ImageEntry, split: str, rule: str) -> Sample:
    meta = {
        **entry.meta,
        "pixel_sha256": entry.pixel_sha256,
        "official_splits": sorted(entry.official_splits, key=SPLITS.index),
        "split_rule": rule,
        "width": entry.width,
        "height": entry.height,
        "key": entry.key,
    }
    return Sample(
        id=f"routing/{entry.source}/{entry.key}",
        domain=entry.domain,
        split=split,
        source=entry.source,
        text=entry.text,
        answer=entry.domain,
        answer_type="label",
        image_path=entry.image_path,
        image_bytes=entry.image_bytes,
        image_available=True,
        meta=dumps_meta(meta),
    )


# ------------------------------------------------------------------------------------------ dataset


@dataclass(frozen=True)
class RoutingDataset:
    """The built dataset in memory: samples per split and the summary (counts per source and split)."""

    samples: dict[str, list[Sample]]
    summary: dict[str, Any]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{source: {split: n}}`` of the kept samples."""
        out: dict[str, dict[str, int]] = {}
        for split, rows in self.samples.items():
            for s in rows:
                by_split = out.setdefault(s.source, dict.fromkeys(SPLITS, 0))
                by_split[split] += 1
        return out


def build_routing_dataset(cfg: RoutingDataConfig, shared_dir: str | Path) -> RoutingDataset:
    """Read the sources of ``cfg`` from ``shared_dir`` and apply the rules of this module (deterministic)."""
    shared = Path(shared_dir)
    if not shared.is_dir():
        raise FileNotFoundError(
            f"shared data folder {shared} does not exist; set MEDRAG_SHARED_DATA=<folder> (or put it at "
            "../shared/data beside the checkout, or pass shared_dir=...)"
        )
    paths = {name: source_path(name, shared) for name in cfg.sources}  # every input checked before work
    on_error = "skip" if cfg.skip_bad else "raise"
    counts = {name: SourceCounts() for name in cfg.sources}
    entries: list[ImageEntry] = []
    for name in cfg.sources:
        found = sorted(_read_entries(name, paths[name], counts[name], on_error), key=lambda e: e.key)
        counts[name].distinct_images = len(found)
        entries.extend(_load_pixels(found, counts[name], cfg))
        logger.info("%s: %d distinct images from %d records", name, len(found), counts[name].records.kept)
    entries = dedupe_images(entries, counts)

    candidates: dict[tuple[str, str], list[tuple[ImageEntry, str]]] = defaultdict(list)
    for entry in entries:
        split, rule = assign_split(entry, cfg.val_fraction)
        c = counts[entry.source]
        c.moved_to_held_out += rule == "held_out_precedence"
        c.carved_val += rule == "carved_val"
        c.available[split] += 1
        candidates[(entry.source, split)].append((entry, rule))

    samples: dict[str, list[Sample]] = {sp: [] for sp in SPLITS}
    for name in cfg.sources:
        for split in SPLITS:
            group = sorted(candidates[(name, split)], key=lambda er: sample_order_key(er[0].pixel_sha256, cfg.seed))
            if cfg.max_per_source_split:
                group = group[: cfg.max_per_source_split]
            group.sort(key=lambda er: er[0].key)
            samples[split].extend(to_sample(e, split, rule) for e, rule in group)
            counts[name].kept[split] = len(group)
    _check_disjoint(samples)
    summary = _summary(cfg, shared, counts, samples)
    return RoutingDataset(samples, summary)


def _check_disjoint(samples: Mapping[str, list[Sample]]) -> None:
    """Invariant: no pixel hash twice in the dataset (a bug in the rules above, never a data problem)."""
    seen: Counter[str] = Counter(json.loads(s.meta)["pixel_sha256"] for rows in samples.values() for s in rows)
    dup = [h for h, n in seen.items() if n > 1]
    if dup:
        raise AssertionError(f"routing dataset holds {len(dup)} images more than once (e.g. {dup[0]})")


def _summary(
    cfg: RoutingDataConfig, shared: Path, counts: Mapping[str, SourceCounts], samples: Mapping[str, list[Sample]]
) -> dict[str, Any]:
    per_domain: dict[str, dict[str, int]] = {}
    for split, rows in samples.items():
        for domain, n in sorted(Counter(s.domain for s in rows).items()):
            per_domain.setdefault(domain, dict.fromkeys(SPLITS, 0))[split] = n
    return {
        "format": FORMAT,
        "config": to_dict(cfg),
        "shared_dir": str(shared.resolve()),
        "domains": {name: ROUTING_SOURCES[name].domain for name in cfg.sources},
        "counts": {name: {sp: counts[name].kept[sp] for sp in SPLITS} for name in cfg.sources},
        "per_domain": dict(sorted(per_domain.items())),
        "per_split": {sp: len(samples[sp]) for sp in SPLITS},
        "sources": {name: counts[name].as_dict() for name in cfg.sources},
        "rules": {
            "identity": "sha256 of decoded pixels (size + RGB bytes); identical images merged, first kept",
            "split": "most held-out official split of any copy/record (test > val > train)",
            "val": f"carved from train by hash_fraction('val:'+pixel_sha256) < {cfg.val_fraction} "
            "where the source has no val split",
            "cap": f"{cfg.max_per_source_split or 'no'} images per source and split, smallest "
            f"sha256('{cfg.seed}:'+pixel_sha256)",
        },
    }



def write_routing_dataset(ds: RoutingDataset, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``samples_{train,val,test}.parquet`` and ``summary.json`` (with file rows and hashes) atomically."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        files = write_split_samples(ds.samples, tmp)
        summary = {**ds.summary, "files": files}
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out_dir)


def load_summary(out_dir: str | Path) -> dict[str, Any]:
    """A written dataset's summary (raises naming the job that builds it when absent)."""
    path = Path(out_dir) / SUMMARY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build it with `python jobs/make_routing_data.py out_dir={out_dir}`")
    return json.loads(path.read_text(encoding="utf-8"))


def format_counts(summary: Mapping[str, Any]) -> Iterator[str]:
    """Log lines: one per source (domain, kept per split, available per split, dropped) and the totals."""
    for name, by_split in summary["counts"].items():
        src = summary["sources"][name]
        kept = " ".join(f"{sp}={by_split[sp]}" for sp in SPLITS)
        avail = " ".join(f"{sp}={src['available'][sp]}" for sp in SPLITS)
        yield (
            f"{name} ({summary['domains'][name]}): kept {kept} | available {avail} | distinct images "
            f"{src['distinct_images']}, duplicates dropped {src['duplicates_dropped']}, moved to held-out "
            f"{src['moved_to_held_out']}, carved val {src['carved_val']}, bad {src['bad_images']}, "
            f"missing {src['records']['missing_images']}"
        )
    for domain, by_split in summary["per_domain"].items():
        yield f"domain {domain}: " + " ".join(f"{sp}={by_split[sp]}" for sp in SPLITS)
    yield "total: " + " ".join(f"{sp}={n}" for sp, n in summary["per_split"].items())
