"""Corpus embedding and the on-disk index store (MMed-RAG step 3: the per-domain indexes R_d).

Two halves, both free of Ray (``jobs/build_index.py`` is the Ray Data shell around them):

**Embedding.** :class:`CorpusEmbedder` is a callable class that turns a batch of
:class:`~medrag_ray.data.schema.CorpusDoc` rows (a ``dict[str, np.ndarray]``, Ray Data's numpy batch format)
into L2-normalized float32 text and image embeddings with one dual encoder (the domain's retriever R_d).
It is what ``Dataset.map_batches(CorpusEmbedder, ...)`` runs in each actor, and what the single-process
:func:`embed_table` loop runs. A row whose image cannot be read does not stop the job: it comes back with
a non-empty ``reject_reason`` (and zero vectors); :func:`split_rejects` / the job route such rows to
``rejects.jsonl``.

**The index store.** One directory (``artifacts/index`` by default) holds everything a retriever needs::

    manifest.json                 {"format": 1, "domains": {d: {"encoder_dir", "model_id", "dim", "n_docs",
                                   "encoder_fingerprint", "index_kind"}}}
    text/<domain>/                DomainIndex over document TEXT embeddings (DomainIndexSet.save layout)
    image/<domain>/               DomainIndex over document IMAGE embeddings
    embeddings/<domain>/part-*.parquet   id, domain, text_emb, image_emb (list<float32>, L2-normalized)
    docs/<domain>/part-*.parquet  the CorpusDoc rows of the indexed documents
    rejects.jsonl                 {"id", "domain", "reason"} per document that could not be embedded

Invariants (checked by :func:`load_index_store`, kept by every writer here):

* Per domain the text and image indexes hold the same ids in the same order, and that order is the
  concatenation of the domain's embedding parts sorted by file name (``part-<generation>-...``: the build
  writes generation 0, each :func:`add_documents` call the next one).
* ``manifest.domains[d].n_docs`` equals the size of both indexes and the rows of the embeddings and docs.
* ``model_id`` is the dual encoder's id (open_clip config name for the tiny models); because that id does
  not change when a model is retrained, ``encoder_fingerprint`` (sha256 of the encoder's config and weight
  files) tells two encoders of one architecture apart. :func:`add_documents` refuses embeddings from
  another model (id, dim or fingerprint).

Writes are atomic: a build goes through :func:`~medrag_ray.utils.atomic_output_dir`, and
:func:`add_documents` assembles the updated store in a temp dir beside the old one (unchanged files are
hard-linked, not copied) and swaps it in, so an error at any point leaves the previous store untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from medrag_ray.config import BuildIndexConfig, ConfigError
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import CORPUS_SCHEMA, DOMAINS, CorpusDoc, RecordError, from_rows, to_table
from medrag_ray.models.common import ModelLoadError, read_card, resolve_device
from medrag_ray.models.dual_encoder import OPEN_CLIP_CONFIG_FILE, load_dual_encoder
from medrag_ray.retrieval.index import (
    NORM_TOLERANCE,
    DomainIndex,
    DomainIndexSet,
    IndexConfig,
    IndexFileError,
    IndexInputError,
    IndexMeta,
    read_json,
)
from medrag_ray.utils import atomic_output_dir, check_writable, update_hash

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
TEXT_DIR = "text"
IMAGE_DIR = "image"
EMBEDDINGS_DIR = "embeddings"
DOCS_DIR = "docs"
REJECTS_FILE = "rejects.jsonl"
PART_GLOB = "part-*.parquet"
PART_RE = re.compile(r"^part-(\d{6})-[0-9A-Za-z_.-]+\.parquet$")
REJECT_COLUMN = "reject_reason"
EMBEDDING_COLUMNS: tuple[str, ...] = ("id", "domain", "text_emb", "image_emb")
EMBEDDINGS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("text_emb", pa.list_(pa.float32()), nullable=False),
        pa.field("image_emb", pa.list_(pa.float32()), nullable=False),
    ]
)
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth")
_TRAIN_RETRIEVER_CMD = "python jobs/train_retriever.py"
_INIT_ENCODER = "artifacts/models/init/encoder"


# =============================================================================== encoder identity


@dataclasses.dataclass(frozen=True)
class EncoderInfo:
    """Which dual encoder embeds a domain: its directory, id, embedding width and weights fingerprint."""

    encoder_dir: str
    """Absolute path of the encoder directory."""
    model_id: str
    dim: int
    fingerprint: str
    """sha256 over the encoder's ``open_clip_config.json`` and weight files (tells retrained weights apart)."""


def _sha256_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        update_hash(h, path)
    return h.hexdigest()


def encoder_info(encoder_dir: str | Path) -> EncoderInfo:
    """Read a dual-encoder directory's identity without loading its weights.

    ``model_id`` follows :func:`~medrag_ray.models.dual_encoder.load_dual_encoder`: the card's model id,
    else ``local-dir:<abs path>`` for a real open_clip checkpoint.
    """
    path = Path(encoder_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"encoder directory {path} does not exist")
    config_path = path / OPEN_CLIP_CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(
            f"{path} is not a dual-encoder directory ({OPEN_CLIP_CONFIG_FILE} is missing); pass a directory "
            "written by save_dual_encoder (jobs/train_retriever.py, jobs/prepare_models.py) or an open_clip "
            "checkpoint"
        )
    try:
        dim = int(json.loads(config_path.read_text(encoding="utf-8"))["model_cfg"]["embed_dim"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: cannot read model_cfg.embed_dim ({exc})") from exc
    weights = sorted(p for g in _WEIGHT_GLOBS for p in path.glob(g))
    if not weights:
        raise ModelLoadError(f"{path} has no weight file ({', '.join(_WEIGHT_GLOBS)}); the save did not finish")
    card = read_card(path)
    model_id = str(card.extra["model_id"]) if card is not None and card.extra.get("model_id") else f"local-dir:{path}"
    return EncoderInfo(
        encoder_dir=str(path), model_id=model_id, dim=dim, fingerprint=_sha256_files([config_path, *weights])
    )


def resolve_encoder_dirs(
    domains: Sequence[str], *, retrievers_dir: str | Path = "", encoder_dir: str | Path = ""
) -> dict[str, Path]:
    """The encoder directory of each domain: ``encoder_dir`` for all when set, else ``retrievers_dir/<domain>``.

    Raises (before any work) naming every missing directory and the command that creates it.
    """
    if str(encoder_dir).strip():
        path = Path(encoder_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"encoder_dir={path} does not exist. Build the untrained tiny encoder with "
                f"`python jobs/prepare_models.py` (writes {_INIT_ENCODER}), train a domain-agnostic one with "
                f"`{_TRAIN_RETRIEVER_CMD}` (artifacts/models/retriever_all), or set encoder_dir='' to use "
                "retrievers_dir/<domain>/"
            )
        return {d: path for d in domains}
    if not str(retrievers_dir).strip():
        raise ConfigError("set retrievers_dir (one <domain>/ encoder per domain) or encoder_dir (one for all)")
    root = Path(retrievers_dir).expanduser()
    dirs = {d: root / d for d in domains}
    missing = [d for d, p in dirs.items() if not p.is_dir()]
    if missing:
        listing = ", ".join(str(dirs[d]) for d in missing)
        raise FileNotFoundError(
            f"no retriever for domain(s) {missing}: {listing} missing (retrievers_dir={root}). Train the "
            f"per-domain retrievers with `{_TRAIN_RETRIEVER_CMD}` (writes <retrievers_dir>/<domain>/), or "
            f"index every domain with one encoder: encoder_dir={_INIT_ENCODER} (untrained baseline, from "
            "`python jobs/prepare_models.py`) or encoder_dir=artifacts/models/retriever_all"
        )
    return dirs


# ====================================================================================== embedding


def _column(batch: Mapping[str, Any], name: str, n: int) -> np.ndarray | None:
    if name not in batch:
        return None
    col = np.asarray(batch[name], dtype=object)
    if col.shape != (n,):
        raise ValueError(f"batch column {name!r} has shape {col.shape}, expected ({n},)")
    return col


def _batch_size(batch: Mapping[str, Any]) -> int:
    missing = [c for c in ("id", "domain", "text") if c not in batch]
    if missing or not ("image_bytes" in batch or "image_path" in batch):
        raise ValueError(
            f"batch lacks columns {missing or ['image_bytes or image_path']} (has {sorted(batch)}); the corpus "
            "must hold CorpusDoc rows (medrag_ray.data.schema.CorpusDoc)"
        )
    return len(batch["id"])


class CorpusEmbedder:
    """Embed CorpusDoc batches with one dual encoder: a Ray Data ``map_batches`` UDF or a plain callable.

    ``__call__(batch)`` takes columns ``id, domain, text`` and ``image_bytes`` and/or ``image_path`` (any
    extra columns are ignored) and returns ``id, domain`` (as given), ``text_emb`` and ``image_emb``
    (float32 ``[n, dim]``, rows of unit L2 norm) and ``reject_reason`` (``""`` when the row is fine).
    A rejected row (no image, undecodable image, empty text, non-finite output) has zero vectors and the
    reason as text; the other rows of its batch are unaffected.

    The image comes from ``image_bytes`` when present, else from ``image_path`` (relative paths are
    resolved against ``image_root`` when given). On CUDA the encoders run under bf16 autocast (weights
    stay float32); embeddings are normalized in float32 either way.
    """

    def __init__(self, encoder_dir: str, device: str = "auto", image_root: str = "") -> None:
        self.encoder_dir = str(encoder_dir)
        self.device = resolve_device(device)
        self.encoder = load_dual_encoder(encoder_dir, device=str(self.device), dtype="float32")
        self.model_id = self.encoder.model_id
        self.dim = self.encoder.embed_dim
        self.image_root = Path(image_root) if image_root else None
        logger.info(
            "CorpusEmbedder: %s (dim %d) on %s, %d torch threads", self.model_id, self.dim, self.device,
            torch.get_num_threads(),
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _pixels(self, image_bytes: Any, image_path: Any) -> torch.Tensor:
        """The preprocessed image of one row; raises ``RecordError``/``ValueError`` with the reason."""
        if image_bytes is not None and len(image_bytes) > 0:
            image = load_image(bytes(image_bytes), name="image_bytes")
        elif isinstance(image_path, str) and image_path.strip():
            path = Path(image_path)
            if not path.is_absolute() and self.image_root is not None:
                path = self.image_root / path
            image = load_image(path)
        else:
            raise ValueError("no image: image_bytes is empty and image_path is empty")
        return self.encoder.transform(image)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        n = _batch_size(batch)
        ids = _column(batch, "id", n)
        domains = _column(batch, "domain", n)
        texts = _column(batch, "text", n)
        image_bytes = _column(batch, "image_bytes", n)
        image_paths = _column(batch, "image_path", n)
        reasons = [""] * n
        pixels: dict[int, torch.Tensor] = {}
        for i in range(n):
            text = texts[i]
            if not isinstance(text, str) or not text.strip():
                reasons[i] = "empty text: the document has no report/caption to index"
                continue
            try:
                pixels[i] = self._pixels(
                    image_bytes[i] if image_bytes is not None else None,
                    image_paths[i] if image_paths is not None else "",
                )
            except (RecordError, ValueError, OSError) as exc:
                reasons[i] = f"image: {exc}"
        text_emb = np.zeros((n, self.dim), dtype=np.float32)
        image_emb = np.zeros((n, self.dim), dtype=np.float32)
        ok = sorted(pixels)
        if ok:
            with torch.inference_mode(), self._autocast():
                img = self.encoder.encode_image(torch.stack([pixels[i] for i in ok]), normalize=False)
                txt = self.encoder.encode_text([texts[i] for i in ok], normalize=False)
            img_np = torch.nn.functional.normalize(img.float(), dim=-1).cpu().numpy()
            txt_np = torch.nn.functional.normalize(txt.float(), dim=-1).cpu().numpy()
            finite = np.isfinite(img_np).all(axis=1) & np.isfinite(txt_np).all(axis=1)
            for row, i in enumerate(ok):
                if finite[row]:
                    image_emb[i], text_emb[i] = img_np[row], txt_np[row]
                else:
                    reasons[i] = "encoder produced a non-finite embedding (NaN/inf); check the model weights"
        n_rejected = sum(1 for r in reasons if r)
        if n_rejected:
            logger.warning("CorpusEmbedder: %d of %d rows rejected in this batch", n_rejected, n)
        return {
            "id": np.asarray([str(x) for x in ids], dtype=object),
            "domain": np.asarray([str(x) for x in domains], dtype=object),
            "text_emb": text_emb,
            "image_emb": image_emb,
            REJECT_COLUMN: np.asarray(reasons, dtype=object),
        }


def table_to_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """An Arrow table as the ``dict[str, np.ndarray]`` batch Ray Data's numpy format gives a UDF."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def docs_to_batch(docs: Sequence[CorpusDoc]) -> dict[str, np.ndarray]:
    """CorpusDoc records as a numpy batch (what :class:`CorpusEmbedder` takes)."""
    return table_to_batch(to_table(docs, CorpusDoc))


def concat_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Row-wise concatenation of numpy batches with the same columns."""
    if not batches:
        raise ValueError("concat_batches got no batches")
    return {name: np.concatenate([np.asarray(b[name]) for b in batches]) for name in batches[0]}


def embed_table(
    embedder: CorpusEmbedder, table: pa.Table, batch_size: int = 64, progress: bool = True
) -> dict[str, np.ndarray]:
    """The single-process loop: embed every row of ``table`` (CorpusDoc columns) ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if table.num_rows == 0:
        raise ValueError("embed_table got an empty table; pass at least one CorpusDoc row")
    starts = range(0, table.num_rows, batch_size)
    out = [
        embedder(table_to_batch(table.slice(s, batch_size)))
        for s in tqdm(starts, desc="embed", unit="batch", disable=not progress)
    ]
    return concat_batches(out)


def reject_records(batch: Mapping[str, np.ndarray]) -> list[dict[str, str]]:
    """``{"id", "domain", "reason"}`` for every row of an embedded batch with a non-empty reject reason."""
    reasons = batch.get(REJECT_COLUMN)
    if reasons is None:
        return []
    return [
        {"id": str(batch["id"][i]), "domain": str(batch["domain"][i]), "reason": str(r)}
        for i, r in enumerate(reasons)
        if r
    ]


def split_rejects(batch: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    """An embedded batch -> (its accepted rows without ``reject_reason``, the reject records)."""
    reasons = np.asarray(batch.get(REJECT_COLUMN, np.full(len(batch["id"]), "", dtype=object)), dtype=object)
    keep = np.array([not r for r in reasons], dtype=bool)
    accepted = {name: np.asarray(col)[keep] for name, col in batch.items() if name != REJECT_COLUMN}
    return accepted, reject_records(batch)


def embeddings_table(batch: Mapping[str, np.ndarray]) -> pa.Table:
    """Accepted embedded rows as an Arrow table with :data:`EMBEDDINGS_SCHEMA` (list<float32> vectors).

    Refuses rows that still carry a reject reason (filter them with :func:`split_rejects` first).
    """
    reasons = batch.get(REJECT_COLUMN)
    if reasons is not None and any(bool(r) for r in reasons):
        raise ValueError("embeddings_table got rejected rows; drop them first (split_rejects)")
    text = np.ascontiguousarray(batch["text_emb"], dtype=np.float32)
    image = np.ascontiguousarray(batch["image_emb"], dtype=np.float32)
    n = len(batch["id"])
    if text.ndim != 2 or image.shape != text.shape or text.shape[0] != n:
        raise ValueError(f"text_emb {text.shape} and image_emb {image.shape} must both be [{n}, dim]")
    dim = text.shape[1]

    def vectors(x: np.ndarray) -> pa.Array:
        offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1), type=pa.float32()))

    return pa.Table.from_arrays(
        [
            pa.array([str(x) for x in batch["id"]], type=pa.string()),
            pa.array([str(x) for x in batch["domain"]], type=pa.string()),
            vectors(text),
            vectors(image),
        ],
        schema=EMBEDDINGS_SCHEMA,
    )


# ============================================================================ embeddings per domain


def _unit_rows(x: np.ndarray, what: str) -> None:
    if x.shape[0] == 0:
        return
    if not np.isfinite(x).all():
        raise IndexInputError(f"{what} holds NaN or inf")
    norms = np.linalg.norm(x, axis=1)
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        row = int(np.argmax(bad))
        raise IndexInputError(f"{what} row {row} has L2 norm {norms[row]:.6f}, not 1; normalize the embeddings")


@dataclasses.dataclass(frozen=True, eq=False)
class DomainEmbeddings:
    """One domain's document embeddings: ids and L2-normalized float32 text and image vectors [n, dim]."""

    domain: str
    ids: tuple[str, ...]
    text: np.ndarray
    image: np.ndarray

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise IndexInputError(f"embeddings domain {self.domain!r} is not one of {list(DOMAINS)}")
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        for name in ("text", "image"):
            arr = np.asarray(getattr(self, name))
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
                raise IndexInputError(f"{self.domain} {name} embeddings must be a 2-D float array, got {arr.shape}")
            object.__setattr__(self, name, np.ascontiguousarray(arr, dtype=np.float32))
        if self.text.shape != self.image.shape or self.text.shape[0] != len(self.ids):
            raise IndexInputError(
                f"{self.domain}: {len(self.ids)} ids, text {self.text.shape}, image {self.image.shape}; "
                "need one text and one image vector of one width per id"
            )
        dups = sorted(i for i, c in Counter(self.ids).items() if c > 1)
        if dups:
            raise IndexInputError(f"{self.domain}: duplicate ids {dups[:10]}; each document must appear once")
        _unit_rows(self.text, f"{self.domain} text embeddings")
        _unit_rows(self.image, f"{self.domain} image embeddings")

    @property
    def dim(self) -> int:
        return int(self.text.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_table(cls, table: pa.Table, domain: str) -> DomainEmbeddings:
        """Rows of an :data:`EMBEDDINGS_SCHEMA` table, all of ``domain``."""
        missing = [c for c in EMBEDDING_COLUMNS if c not in table.column_names]
        if missing:
            raise IndexFileError(f"embeddings table lacks columns {missing}; expected {list(EMBEDDING_COLUMNS)}")
        other = sorted(set(table.column("domain").to_pylist()) - {domain})
        if other:
            raise IndexFileError(f"embeddings of domain {domain!r} hold rows of domain(s) {other}")
        return cls(
            domain=domain,
            ids=tuple(table.column("id").to_pylist()),
            text=_vectors(table.column("text_emb"), "text_emb"),
            image=_vectors(table.column("image_emb"), "image_emb"),
        )

    def to_table(self) -> pa.Table:
        return embeddings_table(
            {"id": np.asarray(self.ids, dtype=object), "domain": np.full(len(self), self.domain, dtype=object),
             "text_emb": self.text, "image_emb": self.image}
        )


def _vectors(column: pa.ChunkedArray, name: str) -> np.ndarray:
    arr = column.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if arr.null_count:
        raise IndexFileError(f"column {name} has {arr.null_count} null vectors")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any():
        raise IndexFileError(f"column {name} has vectors of different lengths {sorted(set(lengths.tolist()))}")
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(arr), int(lengths[0]))


def concat_embeddings(parts: Sequence[DomainEmbeddings]) -> DomainEmbeddings:
    """Row-wise concatenation of one domain's embedding sets (ids must stay unique)."""
    if not parts:
        raise IndexInputError("concat_embeddings got no embedding sets")
    domains = sorted({p.domain for p in parts})
    if len(domains) != 1:
        raise IndexInputError(f"concat_embeddings got several domains {domains}; concatenate per domain")
    return DomainEmbeddings(
        domains[0],
        tuple(i for p in parts for i in p.ids),
        np.concatenate([p.text for p in parts]),
        np.concatenate([p.image for p in parts]),
    )


def group_by_domain(batch: Mapping[str, np.ndarray]) -> dict[str, DomainEmbeddings]:
    """Accepted embedded rows (any domains) -> :class:`DomainEmbeddings` per domain, row order kept."""
    accepted, rejects = split_rejects(batch)
    if rejects:
        raise ValueError(f"group_by_domain got {len(rejects)} rejected rows; drop them first (split_rejects)")
    domains = np.asarray(accepted["domain"], dtype=object)
    out: dict[str, DomainEmbeddings] = {}
    for domain in dict.fromkeys(str(d) for d in domains):
        mask = domains == domain
        out[domain] = DomainEmbeddings(
            domain=domain,
            ids=tuple(str(i) for i in np.asarray(accepted["id"])[mask]),
            text=np.asarray(accepted["text_emb"])[mask],
            image=np.asarray(accepted["image_emb"])[mask],
        )
    return out


# ==================================================================================== parquet parts


def embeddings_dir(store_dir: str | Path, domain: str) -> Path:
    return Path(store_dir) / EMBEDDINGS_DIR / domain


def docs_dir(store_dir: str | Path, domain: str) -> Path:
    return Path(store_dir) / DOCS_DIR / domain


def part_filename(generation: int, tag: str = "", index: int = 0) -> str:
    """``part-<generation:06d>-<tag>-<index:05d>.parquet``; name order = row order within a domain."""
    if not 0 <= generation < 10**6:
        raise ValueError(f"part generation must be in [0, 999999], got {generation}")
    tag = tag or uuid.uuid4().hex[:12]
    if not re.fullmatch(r"[0-9A-Za-z_.-]+", tag):
        raise ValueError(f"part tag {tag!r} may only hold letters, digits, '_', '.', '-'")
    return f"part-{generation:06d}-{tag}-{index:05d}.parquet"


def list_parts(directory: str | Path) -> list[Path]:
    """The ``part-*.parquet`` files of a directory in name (= row) order; other names are an error."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    parts = sorted(directory.glob(PART_GLOB))
    bad = [p.name for p in parts if not PART_RE.match(p.name)]
    if bad:
        raise IndexFileError(
            f"{directory} holds part files not named part-<generation:06d>-<tag>.parquet: {bad[:5]}; "
            "remove them or rebuild the index"
        )
    return parts


def next_generation(store_dir: str | Path, domain: str) -> int:
    """One more than the highest part generation of ``domain``'s embeddings and docs (0 when none)."""
    gens = [
        int(PART_RE.match(p.name).group(1))  # type: ignore[union-attr]
        for d in (embeddings_dir(store_dir, domain), docs_dir(store_dir, domain))
        for p in list_parts(d)
    ]
    return max(gens) + 1 if gens else 0


def _write_table(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path} exists; part files are never overwritten (pick a new part name)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_embeddings_part(store_dir: str | Path, embeddings: DomainEmbeddings, filename: str) -> Path:
    """Write one domain's embeddings as ``embeddings/<domain>/<filename>`` (atomic, never overwrites)."""
    return _write_table(embeddings.to_table(), embeddings_dir(store_dir, embeddings.domain) / filename)


def read_embeddings(store_dir: str | Path, domain: str) -> DomainEmbeddings:
    """All embedding parts of ``domain`` concatenated in part-name order, validated."""
    directory = embeddings_dir(store_dir, domain)
    parts = list_parts(directory)
    if not parts:
        raise FileNotFoundError(f"{directory} holds no {PART_GLOB}; build the index with jobs/build_index.py")
    try:
        table = pa.concat_tables([pq.read_table(p, schema=EMBEDDINGS_SCHEMA) for p in parts])
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexFileError(f"cannot read the embeddings in {directory} ({exc}); rebuild the index") from exc
    try:
        return DomainEmbeddings.from_table(table, domain)
    except IndexInputError as exc:
        raise IndexFileError(f"{directory}: {exc}; rebuild the index") from exc


def stored_domains(store_dir: str | Path, subdir: str = EMBEDDINGS_DIR) -> list[str]:
    """Domains with a folder under ``store_dir/subdir`` (sorted)."""
    root = Path(store_dir) / subdir
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_all_embeddings(store_dir: str | Path, domains: Sequence[str] | None = None) -> dict[str, DomainEmbeddings]:
    """:func:`read_embeddings` for ``domains`` (default: every domain folder under ``embeddings/``)."""
    return {d: read_embeddings(store_dir, d) for d in (domains if domains is not None else stored_domains(store_dir))}


def docs_table(docs: pa.Table | Sequence[CorpusDoc]) -> pa.Table:
    """CorpusDoc records, or a table with (at least) the CorpusDoc columns, as a CORPUS_SCHEMA table."""
    if isinstance(docs, pa.Table):
        missing = [f.name for f in CORPUS_SCHEMA if f.name not in docs.column_names]
        if missing:
            raise IndexInputError(f"docs table lacks CorpusDoc columns {missing}")
        return docs.select(CORPUS_SCHEMA.names).cast(CORPUS_SCHEMA)
    return to_table(docs, CorpusDoc)


def write_docs_part(store_dir: str | Path, domain: str, docs: pa.Table | Sequence[CorpusDoc], filename: str) -> Path:
    """Write one domain's CorpusDoc rows as ``docs/<domain>/<filename>`` (atomic, never overwrites)."""
    table = docs_table(docs)
    other = sorted(set(table.column("domain").to_pylist()) - {domain})
    if other:
        raise IndexInputError(f"docs for domain {domain!r} hold rows of domain(s) {other}")
    return _write_table(table, docs_dir(store_dir, domain) / filename)


def read_docs_table(store_dir: str | Path, domain: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The docs parts of ``domain`` (CORPUS_SCHEMA; ``columns`` selects some) in part-name order."""
    directory = docs_dir(store_dir, domain)
    parts = list_parts(directory)
    if not parts:
        raise FileNotFoundError(f"{directory} holds no {PART_GLOB}; build the index with jobs/build_index.py")
    try:
        tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in parts]
        if columns:
            return pa.concat_tables(tables)
        return pa.concat_tables([docs_table(t) for t in tables])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise IndexFileError(f"cannot read the docs in {directory} ({exc}); rebuild the index") from exc


def read_docs(store_dir: str | Path, domain: str) -> list[CorpusDoc]:
    """The indexed CorpusDoc records of ``domain`` (validated), in index order."""
    return list(from_rows(read_docs_table(store_dir, domain).to_pylist(), CorpusDoc))


def drop_ids(table: pa.Table, ids: Iterable[str]) -> pa.Table:
    """``table`` without the rows whose ``id`` is in ``ids`` (used to keep rejects out of the docs)."""
    value_set = pa.array(sorted(set(ids)), type=pa.string())
    if len(value_set) == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table.column("id"), value_set=value_set)))


# ======================================================================================== rejects


def write_rejects(path: str | Path, records: Iterable[Mapping[str, str]], append: bool = False) -> int:
    """Write ``{"id", "domain", "reason"}`` records as JSONL; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a" if append else "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps({"id": rec["id"], "domain": rec["domain"], "reason": rec["reason"]}) + "\n")
            n += 1
    return n


def read_rejects(store_dir: str | Path) -> list[dict[str, str]]:
    """The records of ``<store_dir>/rejects.jsonl`` (empty when there is no such file)."""
    path = Path(store_dir) / REJECTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ======================================================================================= manifest


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """What one domain's indexes were built from and how many documents they hold."""

    encoder_dir: str
    model_id: str
    dim: int
    n_docs: int
    encoder_fingerprint: str = ""
    index_kind: str = "flat"

    def __post_init__(self) -> None:
        if not self.model_id:
            raise IndexFileError("manifest entry has an empty model_id")
        for name in ("dim", "n_docs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "dim" else 0):
                raise IndexFileError(f"manifest entry {name}={value!r} must be a non-negative integer")

    @classmethod
    def for_encoder(cls, info: EncoderInfo, n_docs: int, index_kind: str) -> ManifestEntry:
        return cls(info.encoder_dir, info.model_id, info.dim, n_docs, info.fingerprint, index_kind)


@dataclasses.dataclass(frozen=True)
class IndexManifest:
    """``manifest.json`` of an index store: one :class:`ManifestEntry` per indexed domain."""

    domains: Mapping[str, ManifestEntry]
    format: int = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        unknown = sorted(set(self.domains) - set(DOMAINS))
        if unknown:
            raise IndexFileError(f"manifest has unknown domains {unknown}; known: {list(DOMAINS)}")
        object.__setattr__(self, "domains", dict(sorted(self.domains.items())))

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "domains": {d: dataclasses.asdict(e) for d, e in self.domains.items()}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = MANIFEST_FILE) -> IndexManifest:
        if raw.get("format") != MANIFEST_FORMAT:
            raise IndexFileError(
                f"{where}: format={raw.get('format')!r}, this code reads format {MANIFEST_FORMAT}; rebuild the index "
                "with jobs/build_index.py"
            )
        domains = raw.get("domains")
        if not isinstance(domains, Mapping) or not domains:
            raise IndexFileError(f"{where}: 'domains' must be a non-empty object; rebuild the index")
        names = {f.name for f in dataclasses.fields(ManifestEntry)}
        required = ("encoder_dir", "model_id", "dim", "n_docs")
        entries = {}
        for domain, entry in domains.items():
            if not isinstance(entry, Mapping) or any(k not in entry for k in required):
                raise IndexFileError(f"{where}: domain {domain!r} needs keys {list(required)}, got {entry!r}")
            try:
                entries[domain] = ManifestEntry(**{k: v for k, v in entry.items() if k in names})
            except (TypeError, IndexFileError) as exc:
                raise IndexFileError(f"{where}: domain {domain!r}: {exc}") from exc
        return cls(domains=entries)


def write_manifest(store_dir: str | Path, manifest: IndexManifest) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename)."""
    path = Path(store_dir) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_manifest(store_dir: str | Path) -> IndexManifest:
    """Read and validate ``<store_dir>/manifest.json``."""
    path = Path(store_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; {store_dir} is not an index store. Build one with "
            f"`python jobs/build_index.py out_dir={store_dir}`"
        )
    return IndexManifest.from_dict(read_json(path, dict), where=str(path))


# ===================================================================================== index build


def _by_domain(embeddings: Mapping[str, DomainEmbeddings] | Sequence[DomainEmbeddings]) -> dict[str, DomainEmbeddings]:
    items = list(embeddings.values()) if isinstance(embeddings, Mapping) else list(embeddings)
    out: dict[str, DomainEmbeddings] = {}
    for emb in items:
        if emb.domain in out:
            raise IndexInputError(f"two embedding sets for domain {emb.domain!r}; concatenate them first")
        out[emb.domain] = emb
    if isinstance(embeddings, Mapping):
        wrong = [k for k, v in embeddings.items() if k != v.domain]
        if wrong:
            raise IndexInputError(f"embeddings mapping keys {wrong} differ from their DomainEmbeddings.domain")
    return out


def _per_domain(value: str | Mapping[str, Any], domains: Iterable[str], what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        missing = [d for d in domains if d not in value]
        if missing:
            raise IndexInputError(f"no {what} given for domain(s) {missing}")
        return {d: value[d] for d in domains}
    return {d: value for d in domains}


def build_domain_indexes(
    embeddings: Mapping[str, DomainEmbeddings] | Sequence[DomainEmbeddings],
    index_cfg: IndexConfig,
    model_id: str | Mapping[str, str],
) -> tuple[DomainIndexSet, DomainIndexSet]:
    """One text and one image :class:`DomainIndex` per domain over the documents' embeddings.

    ``model_id`` is one id for every domain or a ``{domain: id}`` mapping (per-domain retrievers).
    """
    by_domain = _by_domain(embeddings)
    if not by_domain:
        raise IndexInputError("build_domain_indexes got no embeddings; embed at least one domain")
    ids = _per_domain(model_id, by_domain, "model_id")
    text, image = DomainIndexSet(), DomainIndexSet()
    for domain, emb in by_domain.items():
        meta = IndexMeta(domain=domain, model_id=ids[domain])
        text.add_index(DomainIndex.build(emb.text, emb.ids, meta, index_cfg))
        image.add_index(DomainIndex.build(emb.image, emb.ids, meta, index_cfg))
    return text, image


def _check_docs_match(store_dir: Path, domain: str, ids: Sequence[str]) -> None:
    doc_ids = read_docs_table(store_dir, domain, columns=["id"]).column("id").to_pylist()
    if Counter(doc_ids) != Counter(ids):
        missing = sorted(set(ids) - set(doc_ids))[:5]
        extra = sorted(set(doc_ids) - set(ids))[:5]
        raise IndexFileError(
            f"docs/{domain} and embeddings/{domain} disagree in {store_dir} (without docs: {missing}, "
            f"without embeddings: {extra}); rebuild the index"
        )


def finalize_store(
    store_dir: str | Path,
    encoders: Mapping[str, EncoderInfo],
    index_cfg: IndexConfig,
    rejects: Iterable[Mapping[str, str]] = (),
) -> IndexManifest:
    """Complete a store whose ``embeddings/`` and ``docs/`` parts are written: indexes, rejects, manifest.

    The indexes are built from the parquet embeddings as they lie on disk, so the two always agree.
    """
    store = Path(store_dir)
    domains = stored_domains(store)
    if not domains:
        raise IndexInputError(f"{store / EMBEDDINGS_DIR} holds no domain; nothing was embedded")
    unknown = [d for d in domains if d not in encoders]
    if unknown:
        raise IndexInputError(f"no encoder given for embedded domain(s) {unknown}")
    embeddings = read_all_embeddings(store, domains)
    for domain, emb in embeddings.items():
        if emb.dim != encoders[domain].dim:
            raise IndexInputError(
                f"{domain}: embeddings have dim {emb.dim} but encoder {encoders[domain].model_id} has dim "
                f"{encoders[domain].dim}"
            )
        _check_docs_match(store, domain, emb.ids)
    text, image = build_domain_indexes(embeddings, index_cfg, {d: encoders[d].model_id for d in domains})
    text.save(store / TEXT_DIR)
    image.save(store / IMAGE_DIR)
    write_rejects(store / REJECTS_FILE, rejects)
    manifest = IndexManifest(
        {d: ManifestEntry.for_encoder(encoders[d], len(embeddings[d]), index_cfg.kind) for d in domains}
    )
    write_manifest(store, manifest)
    return manifest


def write_store(
    out_dir: str | Path,
    embeddings: Mapping[str, DomainEmbeddings] | Sequence[DomainEmbeddings],
    docs: pa.Table | Sequence[CorpusDoc],
    encoders: EncoderInfo | Mapping[str, EncoderInfo],
    index_cfg: IndexConfig | None = None,
    rejects: Iterable[Mapping[str, str]] = (),
    overwrite: bool = False,
) -> IndexManifest:
    """Write a complete index store from in-memory embeddings and their CorpusDoc rows (single process).

    ``docs`` must hold exactly the embedded documents. Atomic: ``out_dir`` is replaced only when done.
    """
    by_domain = _by_domain(embeddings)
    encs = _per_domain(encoders, by_domain, "encoder")
    table = docs_table(docs)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        for domain, emb in by_domain.items():
            write_embeddings_part(tmp, emb, part_filename(0))
            write_docs_part(tmp, domain, table.filter(pc.equal(table.column("domain"), domain)), part_filename(0))
        manifest = finalize_store(tmp, encs, index_cfg or IndexConfig(), rejects)
    return manifest


def load_index_store(
    store_dir: str | Path, use_gpu: str | None = None
) -> tuple[IndexManifest, DomainIndexSet, DomainIndexSet]:
    """The manifest and the text and image indexes of a store, checked against each other.

    Each domain's indexes must have the manifest's model id, dim and ``n_docs`` and the same ids.
    """
    manifest = read_manifest(store_dir)
    store = Path(store_dir)
    text = DomainIndexSet.load(store / TEXT_DIR, use_gpu=use_gpu)  # type: ignore[arg-type]
    image = DomainIndexSet.load(store / IMAGE_DIR, use_gpu=use_gpu)  # type: ignore[arg-type]
    for name, indexes in ((TEXT_DIR, text), (IMAGE_DIR, image)):
        if set(indexes.domains) != set(manifest.domains):
            raise IndexFileError(
                f"{store / name} holds domains {list(indexes.domains)} but {MANIFEST_FILE} lists "
                f"{list(manifest.domains)}; rebuild the index"
            )
    for domain, entry in manifest.domains.items():
        for name, index in ((TEXT_DIR, text[domain]), (IMAGE_DIR, image[domain])):
            facts = (index.model_id, index.dim, len(index))
            if facts != (entry.model_id, entry.dim, entry.n_docs):
                raise IndexFileError(
                    f"{store / name / domain} has (model_id, dim, n_docs)={facts} but {MANIFEST_FILE} says "
                    f"{(entry.model_id, entry.dim, entry.n_docs)}; rebuild the index"
                )
        if text[domain].ids != image[domain].ids:
            raise IndexFileError(f"text and image indexes of {domain} hold different ids; rebuild the index")
    return manifest, text, image


# ================================================================================== add documents


def _check_encoder(domain: str, entry: ManifestEntry, info: EncoderInfo, dim: int) -> None:
    problems = []
    if info.model_id != entry.model_id:
        problems.append(f"model_id {info.model_id!r} != indexed {entry.model_id!r}")
    if dim != entry.dim or info.dim != entry.dim:
        problems.append(f"dim {dim} != indexed {entry.dim}")
    if info.fingerprint and entry.encoder_fingerprint and info.fingerprint != entry.encoder_fingerprint:
        problems.append(
            f"encoder weights differ (fingerprint {info.fingerprint[:12]} != indexed {entry.encoder_fingerprint[:12]}"
            f", indexed with {entry.encoder_dir})"
        )
    if problems:
        raise IndexInputError(
            f"cannot add to domain {domain!r}: the new embeddings come from another model ({'; '.join(problems)}). "
            f"Embed with the encoder the index was built with ({entry.encoder_dir}) or rebuild the whole index "
            "(jobs/build_index.py mode=build overwrite=true)"
        )


def check_can_add(
    store_dir: str | Path,
    manifest: IndexManifest,
    ids_by_domain: Mapping[str, Sequence[str]],
    encoders: Mapping[str, EncoderInfo],
) -> None:
    """Refuse, before any work, an addition to unknown domains, from another model, or with duplicate ids."""
    unknown = sorted(set(ids_by_domain) - set(manifest.domains))
    if unknown:
        raise IndexInputError(
            f"{store_dir} has no index for domain(s) {unknown} (indexed: {list(manifest.domains)}); adding a "
            "domain needs a rebuild: jobs/build_index.py mode=build overwrite=true"
        )
    for domain, ids in ids_by_domain.items():
        entry = manifest.domains[domain]
        _check_encoder(domain, entry, encoders[domain], encoders[domain].dim)
        repeated = sorted(i for i, c in Counter(ids).items() if c > 1)
        existing = set(indexed_ids(store_dir, domain))
        clash = sorted(set(ids) & existing)
        if repeated or clash:
            raise IndexInputError(
                f"cannot add to domain {domain!r} of {store_dir}: "
                + "; ".join(
                    s
                    for s in (
                        f"{len(clash)} id(s) already indexed {clash[:10]}" if clash else "",
                        f"{len(repeated)} id(s) repeated in the new documents {repeated[:10]}" if repeated else "",
                    )
                    if s
                )
                + ". Give new documents new ids (to replace documents, rebuild with mode=build overwrite=true)"
            )


def indexed_ids(store_dir: str | Path, domain: str) -> list[str]:
    """The ids in ``domain``'s text index (without loading the FAISS file)."""
    path = Path(store_dir) / TEXT_DIR / domain / "ids.json"
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFileError(f"{path} is missing; the store is damaged, rebuild the index") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexFileError(f"{path} is unreadable ({exc}); rebuild the index") from exc
    return [str(i) for i in ids]


def _link_tree(src: Path, dst: Path, skip: set[Path]) -> None:
    """Recreate ``src`` under ``dst`` with hard links (copies where linking fails), except ``skip`` paths."""
    for root, dirs, files in os.walk(src):
        root_path = Path(root)
        dirs[:] = [d for d in dirs if root_path / d not in skip and not d.startswith(".")]
        target = dst / root_path.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if root_path / name in skip or name.startswith("."):
                continue
            try:
                os.link(root_path / name, target / name)
            except OSError:
                shutil.copy2(root_path / name, target / name)


def add_documents(
    store_dir: str | Path,
    embeddings: Mapping[str, DomainEmbeddings] | Sequence[DomainEmbeddings],
    docs: pa.Table | Sequence[CorpusDoc],
    encoders: EncoderInfo | Mapping[str, EncoderInfo],
    rejects: Iterable[Mapping[str, str]] = (),
) -> IndexManifest:
    """Append documents to an existing store without rebuilding its indexes; returns the new manifest.

    ``embeddings`` are the new documents' vectors (by domain) from ``encoders`` (one for all domains or one
    per domain), ``docs`` their CorpusDoc rows (exactly the embedded ids). Each touched domain's text and
    image indexes get :meth:`DomainIndex.add` (IVF/HNSW keep their trained structure), a new embeddings and
    docs part (next generation) is written, ``rejects`` are appended to ``rejects.jsonl`` and the manifest's
    ``n_docs`` updated. Refused with :class:`IndexInputError`, before anything is written: a domain without
    an index, another model (id, dim or weights fingerprint), ids already indexed or repeated, docs that do
    not match the embeddings. The update is atomic (see the module docstring).
    """
    store = Path(store_dir)
    manifest = read_manifest(store)
    by_domain = {d: e for d, e in _by_domain(embeddings).items() if len(e)}
    if not by_domain:
        raise IndexInputError("add_documents got no documents to add")
    encs = _per_domain(encoders, by_domain, "encoder")
    check_can_add(store, manifest, {d: e.ids for d, e in by_domain.items()}, encs)
    for domain, emb in by_domain.items():
        _check_encoder(domain, manifest.domains[domain], encs[domain], emb.dim)
    table = docs_table(docs)
    docs_by_domain = {d: table.filter(pc.equal(table.column("domain"), d)) for d in by_domain}
    for domain, emb in by_domain.items():
        doc_ids = docs_by_domain[domain].column("id").to_pylist()
        if Counter(doc_ids) != Counter(emb.ids):
            raise IndexInputError(
                f"docs for domain {domain!r} do not match its new embeddings (ids without docs: "
                f"{sorted(set(emb.ids) - set(doc_ids))[:5]}, docs without embeddings: "
                f"{sorted(set(doc_ids) - set(emb.ids))[:5]}); pass the CorpusDoc rows of exactly the new documents"
            )
    stray = sorted(set(table.column("domain").to_pylist()) - set(by_domain))
    if stray:
        raise IndexInputError(f"docs hold rows of domain(s) {stray} that have no new embeddings")

    updated: dict[str, tuple[DomainIndex, DomainIndex]] = {}
    for domain, emb in by_domain.items():
        entry = manifest.domains[domain]
        text_index, image_index = (
            DomainIndex.load(store / name / domain, expected_model_id=entry.model_id, expected_dim=entry.dim)
            for name in (TEXT_DIR, IMAGE_DIR)
        )
        if len(text_index) != entry.n_docs or len(image_index) != entry.n_docs:
            raise IndexFileError(
                f"{domain}: indexes hold {len(text_index)}/{len(image_index)} documents but {MANIFEST_FILE} says "
                f"{entry.n_docs}; rebuild the index"
            )
        text_index.add(emb.text, emb.ids)
        image_index.add(emb.image, emb.ids)
        updated[domain] = (text_index, image_index)

    skip = {store / name / d for d in by_domain for name in (TEXT_DIR, IMAGE_DIR)}
    skip |= {store / MANIFEST_FILE, store / REJECTS_FILE}
    new_domains = dict(manifest.domains)
    tag = uuid.uuid4().hex[:12]
    with atomic_output_dir(store, overwrite=True) as tmp:
        _link_tree(store, tmp, skip)
        for domain, (text_index, image_index) in updated.items():
            text_index.save(tmp / TEXT_DIR / domain)
            image_index.save(tmp / IMAGE_DIR / domain)
            generation = next_generation(store, domain)
            write_embeddings_part(tmp, by_domain[domain], part_filename(generation, tag))
            write_docs_part(tmp, domain, docs_by_domain[domain], part_filename(generation, tag))
            new_domains[domain] = dataclasses.replace(new_domains[domain], n_docs=len(text_index))
        old_rejects = store / REJECTS_FILE
        if old_rejects.is_file():
            shutil.copy2(old_rejects, tmp / REJECTS_FILE)
        write_rejects(tmp / REJECTS_FILE, rejects, append=True)
        new_manifest = IndexManifest(new_domains)
        write_manifest(tmp, new_manifest)
    logger.info(
        "added %s documents to %s", {d: len(e) for d, e in by_domain.items()}, store
    )
    return new_manifest


# ===================================================================================== corpus scan


def corpus_ids(corpus_path: str | Path) -> dict[str, list[str]]:
    """The document ids of a CorpusDoc Parquet file or directory, by domain (reads two columns only)."""
    path = Path(corpus_path)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {path} does not exist; generate the synthetic corpus with `python jobs/make_data.py` "
            "(artifacts/data/synthetic/corpus.parquet) or convert real data with `python jobs/convert_data.py`"
        )
    try:
        table = pq.read_table(path, columns=["id", "domain"])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise IndexInputError(
            f"cannot read columns id, domain from corpus {path} ({exc}); pass a Parquet file or folder of CorpusDoc "
            "rows"
        ) from exc
    if table.num_rows == 0:
        raise IndexInputError(f"corpus {path} has no rows")
    for name in ("id", "domain"):
        if table.column(name).null_count:
            raise IndexInputError(f"corpus {path}: column {name} has {table.column(name).null_count} nulls")
    out: dict[str, list[str]] = {}
    for doc_id, domain in zip(table.column("id").to_pylist(), table.column("domain").to_pylist(), strict=True):
        out.setdefault(domain, []).append(doc_id)
    unknown = sorted(set(out) - set(DOMAINS))
    if unknown:
        raise IndexInputError(f"corpus {path} has rows of unknown domain(s) {unknown}; known: {list(DOMAINS)}")
    return dict(sorted(out.items()))


def check_unique_ids(ids_by_domain: Mapping[str, Sequence[str]], where: str) -> None:
    """Raise naming the repeated ids when a domain lists an id twice."""
    for domain, ids in ids_by_domain.items():
        repeated = sorted(i for i, c in Counter(ids).items() if c > 1)
        if repeated:
            raise IndexInputError(
                f"{where}: domain {domain!r} repeats ids {repeated[:10]} ({len(repeated)} in all); each document "
                "must have a unique id"
            )


@dataclasses.dataclass(frozen=True)
class IndexJobPlan:
    """What ``jobs/build_index.py`` will do, resolved and checked before any embedding work."""

    mode: str
    domains: tuple[str, ...]
    encoders: dict[str, EncoderInfo]
    counts: dict[str, int]
    """Corpus rows per domain to embed."""
    manifest: IndexManifest | None
    """The existing store's manifest (``mode=add``)."""


def plan_index_job(cfg: BuildIndexConfig) -> IndexJobPlan:
    """Resolve domains and encoders and refuse, before any work, what would fail later.

    Checks: the corpus exists and its ids are unique per domain; every domain has an encoder directory
    (naming the command that creates a missing one); ``mode=build``: ``out_dir`` is writable (empty, or
    ``overwrite``); ``mode=add``: the store exists, indexes those domains with the same model, and none of
    the new ids is indexed already.
    """
    ids = corpus_ids(cfg.corpus_path)
    domains = tuple(cfg.domains) or tuple(ids)
    absent = [d for d in domains if d not in ids]
    if absent:
        raise IndexInputError(
            f"corpus {cfg.corpus_path} has no rows of domain(s) {absent} (it has {list(ids)}); fix domains="
        )
    selected = {d: ids[d] for d in domains}
    check_unique_ids(selected, f"corpus {cfg.corpus_path}")
    dirs = resolve_encoder_dirs(domains, retrievers_dir=cfg.retrievers_dir, encoder_dir=cfg.encoder_dir)
    infos: dict[Path, EncoderInfo] = {}
    for path in dict.fromkeys(dirs.values()):
        infos[path] = encoder_info(path)
    encoders = {d: infos[dirs[d]] for d in domains}
    manifest = None
    if cfg.mode == "build":
        check_writable(cfg.out_dir, cfg.overwrite)
    else:
        manifest = read_manifest(cfg.out_dir)
        check_can_add(cfg.out_dir, manifest, selected, encoders)
    return IndexJobPlan(cfg.mode, domains, encoders, {d: len(v) for d, v in selected.items()}, manifest)


@dataclasses.dataclass(frozen=True)
class IndexJobResult:
    """What ``jobs/build_index.py`` did: the store, its manifest, documents added and rejected per domain."""

    out_dir: Path
    mode: str
    manifest: IndexManifest
    added: dict[str, int]
    rejected: dict[str, int]
    seconds: float


def iter_reject_summary(rejects: Sequence[Mapping[str, str]], limit: int = 3) -> Iterator[str]:
    """Short ``id: reason`` lines for the first ``limit`` rejects (for error messages and logs)."""
    for rec in rejects[:limit]:
        yield f"{rec['id']}: {rec['reason']}"
