"""Per-domain FAISS indexes (MMed-RAG step 3: top-k reports from the domain's index R_d).

One :class:`DomainIndex` holds one domain's document embeddings (the ids are ``CorpusDoc.id`` strings)
and answers top-k inner-product queries. Embeddings are L2-normalized, so inner product is cosine
similarity, which is what the contrastive retriever was trained on (Eq. 1).

Decisions (documented behaviour, tested):

- **Normalization.** With ``IndexConfig.normalize=True`` (default) every input (documents and queries) is
  L2-normalized here, so callers can pass raw encoder outputs. With ``normalize=False`` inputs must already
  be unit-norm (|‖x‖ − 1| ≤ 1e-3) or an :class:`IndexInputError` names the first bad row. Zero or
  non-finite rows are always an error (their direction is undefined).
- **dtype.** Any floating array is accepted and converted to C-contiguous float32 (FAISS's only type);
  integer/bool/object arrays are refused.
- **k larger than the index.** ``search`` returns ``min(k, len(index))`` columns.
- **Approximate indexes may find fewer than k.** IVF/HNSW can return fewer hits than asked for a query
  (e.g. the probed lists hold fewer vectors); those slots get score ``-inf`` and the row's id list is
  shorter (ids never contain placeholders).
- **GPU.** ``use_gpu="auto"`` moves flat/IVF indexes to GPU when faiss was built with GPU support and a
  GPU is visible; HNSW has no FAISS GPU implementation and stays on CPU. ``"always"`` fails early when
  no GPU can be used. Saved files always hold the CPU index, so they load on any machine.
- **Files.** ``save(dir)`` writes ``index.faiss`` (``faiss.write_index``), ``ids.json`` and ``meta.json``
  atomically (a failure leaves the previous directory untouched).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from medrag_ray.config import ConfigError
from medrag_ray.data.schema import DOMAINS
from medrag_ray.utils import atomic_output_dir

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw"]
GpuMode = Literal["auto", "never", "always"]

INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")
GPU_MODES: tuple[str, ...] = ("auto", "never", "always")
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
META_FILE = "meta.json"
FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-3


class IndexInputError(ValueError):
    """Embeddings, ids or queries that an index cannot take; the message says what to change."""


class IndexFileError(ValueError):
    """A saved index directory whose files are unreadable or disagree; the message names the file."""


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How a domain index is built and searched.

    kind: ``flat`` (exact inner product, default), ``ivf`` (IndexIVFFlat, ``nlist`` cells, ``nprobe``
    probed per query; trained on the first build) or ``hnsw`` (IndexHNSWFlat, ``hnsw_m`` links per node,
    ``ef_construction`` at build, ``ef_search`` at query time).
    """

    kind: IndexKind = "flat"
    nlist: int = 256
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 200
    use_gpu: GpuMode = "auto"
    gpu_device: int = 0
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"index.kind={self.kind!r} is not one of {INDEX_KINDS}; pick one of them")
        if self.use_gpu not in GPU_MODES:
            raise ConfigError(f"index.use_gpu={self.use_gpu!r} is not one of {GPU_MODES}; pick one of them")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"index.{name}={value!r} must be a positive integer")
        if self.nprobe > self.nlist:
            raise ConfigError(
                f"index.nprobe={self.nprobe} exceeds index.nlist={self.nlist}; set nprobe <= nlist"
            )
        if not isinstance(self.gpu_device, int) or self.gpu_device < 0:
            raise ConfigError(f"index.gpu_device={self.gpu_device!r} must be a GPU ordinal >= 0")
        if self.kind == "hnsw" and self.use_gpu == "always":
            raise ConfigError(
                "index.use_gpu='always' with index.kind='hnsw': FAISS has no GPU HNSW; "
                "use kind='flat' or 'ivf' on GPU, or use_gpu='auto'/'never'"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class IndexMeta:
    """What an index was built from: its domain and the embedding model (retriever) id."""

    domain: str
    model_id: str

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ConfigError(f"index domain={self.domain!r} is not one of {DOMAINS}")
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ConfigError("index model_id must be a non-empty string naming the embedding model")


# ------------------------------------------------------------------------------------------- GPU


def faiss_gpu_available() -> bool:
    """True when this faiss build has GPU support and at least one GPU is visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_use_gpu(cfg: IndexConfig) -> bool:
    """Whether an index with ``cfg`` should live on GPU; ``use_gpu='always'`` without a GPU raises."""
    if cfg.use_gpu == "never" or cfg.kind == "hnsw":
        return False
    available = faiss_gpu_available()
    if cfg.use_gpu == "always":
        if not available:
            reason = (
                "this faiss build has no GPU support (install faiss-gpu, extra '[gpu]')"
                if not hasattr(faiss, "StandardGpuResources")
                else "no GPU is visible to faiss"
            )
            raise ConfigError(f"index.use_gpu='always' but {reason}; set use_gpu='auto' or 'never'")
        if cfg.gpu_device >= faiss.get_num_gpus():
            raise ConfigError(
                f"index.gpu_device={cfg.gpu_device} but faiss sees {faiss.get_num_gpus()} GPU(s)"
            )
        return True
    return available and cfg.gpu_device < faiss.get_num_gpus()


_GPU_RESOURCES: Any = None


def _to_gpu(index: faiss.Index, device: int) -> faiss.Index:
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, device, index)


# ------------------------------------------------------------------------------------ validation


def prepare_vectors(x: Any, dim: int | None, normalize: bool, what: str = "embeddings") -> np.ndarray:
    """Check ``x`` is a finite 2-D float array of width ``dim``; return it as C-contiguous float32 rows.

    With ``normalize`` the rows are L2-normalized (a copy); otherwise they must already have unit norm.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise IndexInputError(
            f"{what} must be a 2-D array [n, dim], got shape {arr.shape}; reshape a single vector with "
            "x.reshape(1, -1)"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise IndexInputError(f"{what} must be a floating-point array (float32), got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise IndexInputError(
            f"{what} dimension mismatch: expected dim={dim}, got {arr.shape[1]}; "
            "embed with the same model the index was built with"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.shape[0] == 0:
        return arr
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise IndexInputError(f"{what} row {int(np.argmin(finite))} holds NaN or inf; fix the encoder output")
    norms = np.linalg.norm(arr, axis=1)
    if (norms == 0).any():
        raise IndexInputError(f"{what} row {int(np.argmax(norms == 0))} is all zeros and cannot be normalized")
    if normalize:
        return np.ascontiguousarray(arr / norms[:, None], dtype=np.float32)
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        row = int(np.argmax(bad))
        raise IndexInputError(
            f"{what} row {row} has L2 norm {norms[row]:.6f}, not 1; normalize it or set index.normalize=true"
        )
    return arr


def _check_ids(ids: Sequence[str], n_rows: int, existing: Mapping[str, int]) -> list[str]:
    ids = list(ids)
    if len(ids) != n_rows:
        raise IndexInputError(f"got {len(ids)} ids for {n_rows} embedding rows; pass one id per row")
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise IndexInputError(f"ids must be non-empty strings (CorpusDoc.id); bad values: {bad[:5]!r}")
    dup_in_batch = {doc_id for doc_id, count in Counter(ids).items() if count > 1}
    dup_existing = {doc_id for doc_id in ids if doc_id in existing}
    dups = sorted(dup_in_batch | dup_existing)
    if dups:
        where = " and ".join(
            label for label, hit in (("already in the index", dup_existing), ("repeated in this batch", dup_in_batch))
            if hit
        )
        raise IndexInputError(
            f"duplicate ids ({where}): {dups[:10]!r}{' ...' if len(dups) > 10 else ''} ({len(dups)} in all); "
            "each document must be indexed once"
        )
    return ids


# ----------------------------------------------------------------------------------- DomainIndex


def _new_faiss_index(dim: int, cfg: IndexConfig) -> faiss.Index:
    if cfg.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if cfg.kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        # faiss's Python wrapper keeps a reference to the quantizer for the index's lifetime
        return faiss.IndexIVFFlat(quantizer, dim, cfg.nlist, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = cfg.ef_construction
    return index


def _apply_search_params(index: faiss.Index, cfg: IndexConfig) -> None:
    if cfg.kind == "ivf":
        index.nprobe = cfg.nprobe  # IndexIVF and GpuIndexIVF both expose nprobe
    elif cfg.kind == "hnsw":
        index.hnsw.efSearch = cfg.ef_search


class DomainIndex:
    """One domain's FAISS index plus the document ids of its rows and what it was built from."""

    def __init__(self, index: faiss.Index, ids: list[str], meta: IndexMeta, cfg: IndexConfig) -> None:
        if index.ntotal != len(ids):
            raise IndexInputError(f"index holds {index.ntotal} vectors but {len(ids)} ids were given")
        self._cpu_index = index
        self._ids = ids
        self._pos = {doc_id: i for i, doc_id in enumerate(ids)}
        self.meta = meta
        self.cfg = cfg
        self.dim = int(index.d)
        _apply_search_params(index, cfg)
        self.on_gpu = resolve_use_gpu(cfg)
        self._index = _to_gpu(index, cfg.gpu_device) if self.on_gpu else index
        if self.on_gpu:
            _apply_search_params(self._index, cfg)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def build(
        cls, embeddings: Any, ids: Sequence[str], meta: IndexMeta, cfg: IndexConfig | None = None
    ) -> DomainIndex:
        """Build an index over ``embeddings`` [n, dim] whose rows are the documents ``ids``.

        IVF is trained on these embeddings, so they must number at least ``nlist`` (FAISS advises ~39×).
        """
        cfg = cfg or IndexConfig()
        resolve_use_gpu(cfg)  # fail on use_gpu='always' before any work
        x = prepare_vectors(embeddings, None, cfg.normalize)
        if x.shape[0] == 0:
            raise IndexInputError("cannot build an index from 0 embeddings; pass at least one row")
        ids_list = _check_ids(ids, x.shape[0], {})
        index = _new_faiss_index(x.shape[1], cfg)
        if cfg.kind == "ivf":
            if x.shape[0] < cfg.nlist:
                raise IndexInputError(
                    f"IVF needs at least nlist={cfg.nlist} training vectors, got {x.shape[0]}; "
                    "lower index.nlist (about sqrt(n)) or use kind='flat'"
                )
            if x.shape[0] < 39 * cfg.nlist:
                logger.warning("IVF: %d training vectors for nlist=%d (FAISS advises >= 39 per cell)",
                               x.shape[0], cfg.nlist)
            index.train(x)
        index.add(x)
        logger.info("built %s index for %s: %d x %d (model %s)", cfg.kind, meta.domain, *x.shape, meta.model_id)
        return cls(index, ids_list, meta, cfg)

    def add(self, embeddings: Any, ids: Sequence[str]) -> None:
        """Append documents without rebuilding (IVF assigns them to its already-trained cells)."""
        x = prepare_vectors(embeddings, self.dim, self.cfg.normalize)
        new_ids = _check_ids(ids, x.shape[0], self._pos)
        if x.shape[0] == 0:
            return
        self._index.add(x)
        if self.on_gpu:  # keep the CPU copy (what save() writes) in step
            self._cpu_index.add(x)
        for doc_id in new_ids:
            self._pos[doc_id] = len(self._ids)
            self._ids.append(doc_id)

    # -- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._ids)

    @property
    def domain(self) -> str:
        return self.meta.domain

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    @property
    def kind(self) -> str:
        return self.cfg.kind

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-``k`` documents per query: scores [B, min(k, len)] (descending) and their ids per row.

        Slots an approximate index could not fill have score ``-inf`` and no id (the id row is shorter).
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise IndexInputError(f"k={k!r} must be a positive integer")
        q = prepare_vectors(queries, self.dim, self.cfg.normalize, what="queries")
        k_eff = min(k, len(self._ids))
        if q.shape[0] == 0:
            return np.zeros((0, k_eff), dtype=np.float32), []
        scores, rows = self._index.search(q, k_eff)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        ids = [[self._ids[r] for r in row if r >= 0] for row in rows]
        return scores, ids

    # -- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``index.faiss``, ``ids.json`` and ``meta.json`` into ``directory`` atomically."""
        with atomic_output_dir(directory, overwrite=overwrite) as tmp:
            self._write(tmp)
        return Path(directory)

    def _write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._cpu_index, str(directory / INDEX_FILE))
        (directory / IDS_FILE).write_text(json.dumps(self._ids), encoding="utf-8")
        meta = {
            "format_version": FORMAT_VERSION,
            "domain": self.meta.domain,
            "model_id": self.meta.model_id,
            "dim": self.dim,
            "kind": self.cfg.kind,
            "count": len(self._ids),
            "metric": "inner_product",
            "faiss_version": faiss.__version__,
            "config": self.cfg.to_dict(),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expected_model_id: str | None = None,
        expected_dim: int | None = None,
        use_gpu: GpuMode | None = None,
    ) -> DomainIndex:
        """Load a saved index, checking its files agree and (if given) its model id and dim.

        ``use_gpu`` overrides the saved config's GPU mode (a saved index may move between machines).
        """
        directory = Path(directory)
        paths = {name: directory / name for name in (META_FILE, IDS_FILE, INDEX_FILE)}
        for path in paths.values():
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing; {directory} is not a saved DomainIndex (expected "
                    f"{META_FILE}, {IDS_FILE}, {INDEX_FILE}); rebuild it with jobs/build_index.py"
                )
        meta_path, ids_path, index_path = paths[META_FILE], paths[IDS_FILE], paths[INDEX_FILE]
        meta = read_json(meta_path, dict)
        missing = [key for key in ("domain", "model_id", "dim", "kind", "count", "config") if key not in meta]
        if missing:
            raise IndexFileError(f"{meta_path} lacks keys {missing}; the file is damaged, rebuild the index")
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexFileError(
                f"{meta_path} has format_version={meta.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; rebuild the index"
            )
        try:
            cfg_dict = dict(meta["config"])
            if use_gpu is not None:
                cfg_dict["use_gpu"] = use_gpu
            cfg = IndexConfig(**cfg_dict)
            index_meta = IndexMeta(domain=meta["domain"], model_id=meta["model_id"])
        except (TypeError, ConfigError) as err:
            raise IndexFileError(f"{meta_path}: invalid config or metadata ({err}); rebuild the index") from err
        if expected_model_id is not None and index_meta.model_id != expected_model_id:
            raise IndexFileError(
                f"{meta_path}: index was built with model_id={index_meta.model_id!r}, expected "
                f"{expected_model_id!r}; rebuild the index with the current retriever"
            )
        if expected_dim is not None and meta["dim"] != expected_dim:
            raise IndexFileError(f"{meta_path}: index dim={meta['dim']}, expected {expected_dim}")
        if cfg.kind != meta["kind"]:
            raise IndexFileError(f"{meta_path}: kind={meta['kind']!r} disagrees with config kind={cfg.kind!r}")
        ids = read_json(ids_path, list)
        if len(ids) != meta["count"]:
            raise IndexFileError(f"{ids_path} holds {len(ids)} ids but {meta_path} says count={meta['count']}")
        try:
            _check_ids(ids, len(ids), {})
        except IndexInputError as err:
            raise IndexFileError(f"{ids_path}: {err}") from err
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as err:
            raise IndexFileError(f"{index_path} cannot be read by faiss ({err}); rebuild the index") from err
        if index.d != meta["dim"]:
            raise IndexFileError(f"{index_path} has dim {index.d} but {meta_path} says dim={meta['dim']}")
        if index.ntotal != len(ids):
            raise IndexFileError(f"{index_path} holds {index.ntotal} vectors but {ids_path} holds {len(ids)} ids")
        return cls(index, ids, index_meta, cfg)

    def __repr__(self) -> str:
        return (
            f"DomainIndex(domain={self.domain!r}, model_id={self.model_id!r}, kind={self.kind!r}, "
            f"dim={self.dim}, size={len(self)}, on_gpu={self.on_gpu})"
        )


def read_json(path: Path, expected: type) -> Any:
    """A JSON file of the ``expected`` top-level type, or an :class:`IndexFileError` saying to rebuild."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFileError(f"{path} is not valid JSON ({err}); rebuild the index") from err
    if not isinstance(value, expected):
        raise IndexFileError(f"{path} should hold a JSON {expected.__name__}, got {type(value).__name__}")
    return value


# -------------------------------------------------------------------------------- DomainIndexSet


class DomainIndexSet(Mapping[str, DomainIndex]):
    """The per-domain indexes R_d: domain -> :class:`DomainIndex`, saved as ``<root>/<domain>/``."""

    def __init__(self, indexes: Sequence[DomainIndex] | Mapping[str, DomainIndex] = ()) -> None:
        self._by_domain: dict[str, DomainIndex] = {}
        values = indexes.values() if isinstance(indexes, Mapping) else indexes
        for index in values:
            self.add_index(index)

    def add_index(self, index: DomainIndex) -> None:
        if index.domain in self._by_domain:
            raise IndexInputError(f"domain {index.domain!r} already has an index; one index per domain")
        self._by_domain[index.domain] = index

    def __getitem__(self, domain: str) -> DomainIndex:
        try:
            return self._by_domain[domain]
        except KeyError:
            raise KeyError(
                f"no index for domain {domain!r}; known domains: {sorted(self._by_domain)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_domain)

    def __len__(self) -> int:
        return len(self._by_domain)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_domain))

    def search(self, domain: str, queries: Any, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-``k`` search in ``domain``'s index (see :meth:`DomainIndex.search`)."""
        return self[domain].search(queries, k)

    def save(self, root: str | Path, overwrite: bool = False) -> Path:
        """Write every index to ``<root>/<domain>/`` in one atomic step."""
        if not self._by_domain:
            raise IndexInputError("cannot save an empty DomainIndexSet; add at least one index")
        with atomic_output_dir(root, overwrite=overwrite) as tmp:
            for domain, index in self._by_domain.items():
                index._write(tmp / domain)
        return Path(root)

    @classmethod
    def load(
        cls,
        root: str | Path,
        expected_model_id: str | None = None,
        use_gpu: GpuMode | None = None,
    ) -> DomainIndexSet:
        """Load every ``<root>/<domain>/`` that holds a ``meta.json``; the folder name must match its domain."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"index root {root} does not exist; build the indexes first")
        out = cls()
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (sub / META_FILE).exists():
                continue
            index = DomainIndex.load(sub, expected_model_id=expected_model_id, use_gpu=use_gpu)
            if index.domain != sub.name:
                raise IndexFileError(
                    f"{sub / META_FILE} says domain={index.domain!r} but lives in folder {sub.name!r}; "
                    "move it to the folder named after its domain"
                )
            out.add_index(index)
        if not out:
            raise FileNotFoundError(
                f"{root} holds no <domain>/{META_FILE}; expected sub-folders named after domains {DOMAINS}"
            )
        return out
