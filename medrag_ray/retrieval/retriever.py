"""The retrieval API: JOMED's dual-head retriever and the route -> retrieve -> adaptive-k pipeline.

Two layers (DESIGN.md features 3, 4, 10, 13):

* :class:`DualHeadRetriever` -- a domain retriever R_d (a :class:`~medrag_ray.models.dual_encoder.DualEncoder`)
  with JOMED's two retrieval heads on the query image embedding: a **text head** (query image <-> document
  text) and an **image head** (query image <-> document image). Each head is a trainable ``D x D`` linear map
  initialised to the identity followed by L2 normalization, so an untrained head reproduces plain CLIP
  retrieval exactly. The heads act on the QUERY side only: document embeddings stay those of the index, so
  training a head (JOMED's sequential distillation: text head first, then image head, with the reader
  frozen) never requires re-indexing. It also carries MR-RAG's :class:`~medrag_ray.retrieval.fusion.FusedScorer`
  (alpha, beta, gamma), so learned fusion weights are saved with it.
* :class:`MultimodalRetriever` -- images (and optional questions) -> domain router F(x_v) -> that domain's
  query embedding -> FAISS top-k -> optional MCR fused re-score -> adaptive-k truncation
  -> :class:`RetrievalResult`. Queries are grouped by domain: one FAISS search per domain group and one
  encoder forward per ``batch_size`` images of a group.

The index store it reads is the one ``jobs/build_index.py`` writes, read through
:mod:`medrag_ray.retrieval.embed` (``read_manifest``, ``read_embeddings``, ``read_docs_table``)::

    <index>/manifest.json                       {"format": 1, "domains": {d: {"encoder_dir", "model_id", "dim",
                                                 "n_docs", ...}}}
    <index>/text/<domain>/, image/<domain>/     DomainIndex over document TEXT / IMAGE embeddings
    <index>/embeddings/<domain>/part-*.parquet  id, domain, text_emb, image_emb (list<float32>, L2-normalized)
    <index>/docs/<domain>/part-*.parquet        the CorpusDoc rows of the domain

Each domain's retriever is the manifest's ``encoder_dir`` (a dual-encoder directory: identity heads) or,
per domain, a :func:`save_retriever` directory passed as ``retriever_dirs`` (e.g. heads trained by JOMED);
its encoder must be the one that built the index.

Decisions (documented behaviour, tested):

* Fused candidates are the union of the text index's and the image index's top-``candidates`` (text hits
  first, then new image hits), so a beta-heavy weighting can reach documents the text head ranks low.
* A zero image embedding (an in-memory store's document without an image; the index builder rejects
  such documents) has ``sim(q_img, d_img) = 0`` in the fused score; a query without a question (``None``
  or ``""``) has ``sim(q_txt, d_txt) = 0`` -- the same as dropping the gamma term
  (:mod:`medrag_ray.retrieval.fusion`), also inside a batch that mixes both kinds.
* Routing never guesses: the router's calibrated softmax is computed over all its domains; an image whose most
  probable domain has no index, or whose top probability is under the router's ``unknown_threshold``, gets
  the domain ``"unknown"`` (``UNKNOWN_DOMAIN``) and no hits, so the reader answers it without retrieval.
  ``domain_confidence`` is the top probability. Explicit ``domains=`` skip the router (confidence ``None``).
* Every hit of the top-k is returned with ``kept`` flags (the first ``k_kept``), so rules can be compared
  on the same retrieval. Slots an approximate index could not fill are dropped (never padded).
* ``from_artifacts`` checks that each domain's retriever reproduces a few stored text embeddings
  (``verify_docs``), which catches an index built with another retriever before it silently retrieves noise.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from medrag_ray.data.schema import CORPUS_SCHEMA, UNKNOWN_DOMAIN, CorpusDoc, RecordError, from_rows
from medrag_ray.mining.noise import least_similar
from medrag_ray.models.common import (
    ModelCard,
    ModelLoadError,
    load_state_dict,
    read_card,
    require_directory,
    save_state_dict,
    write_card,
)
from medrag_ray.models.dual_encoder import (
    OPEN_CLIP_CONFIG_FILE,
    DualEncoder,
    load_dual_encoder,
    save_dual_encoder,
)
from medrag_ray.models.router import DomainRouter, load_router
from medrag_ray.retrieval.adaptive_k import adaptive_k_gap, adaptive_k_ratio
from medrag_ray.retrieval.embed import (
    DOCS_DIR,
    IMAGE_DIR,
    MANIFEST_FILE,
    TEXT_DIR,
    DomainEmbeddings,
    ManifestEntry,
    embeddings_dir,
    list_parts,
    read_docs_table,
    read_embeddings,
    read_manifest,
)
from medrag_ray.retrieval.fusion import CandidateSims, FusedScorer, candidate_sims, fused_score
from medrag_ray.retrieval.index import DomainIndex, GpuMode, IndexFileError
from medrag_ray.retrieval.retrieval_config import RetrievalConfig, RetrievalMode

logger = logging.getLogger(__name__)

__all__ = [
    "DocEmbeddings",
    "DomainResources",
    "DualHeadRetriever",
    "Hit",
    "MultimodalRetriever",
    "RetrievalConfig",
    "RetrievalResult",
    "head_scores",
    "load_retriever",
    "read_docs",
    "route_images",
    "save_retriever",
]

Head = Literal["text", "image"]
Part = Literal["text", "image", "fusion"]
HEADS: tuple[str, ...] = ("text", "image")
TRAINABLE_PARTS: tuple[str, ...] = ("text", "image", "fusion")

ENCODER_SUBDIR = "encoder"
HEADS_STEM = "retriever_heads"
CARD_KIND = "dual_head_retriever"
DEFAULT_FUSION_TEMPERATURE = 0.1

VERIFY_MIN_COSINE = 0.99
"""``from_artifacts``: a retriever whose text embeddings of stored documents fall below this cosine to the
stored ones did not build the index."""

_REBUILD = "rebuild the index with `python jobs/build_index.py`"


# ================================================================================= dual-head retriever


def _identity_linear(dim: int, device: torch.device) -> nn.Linear:
    head = nn.Linear(dim, dim, bias=False, device=device, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(torch.eye(dim, device=device))
    return head


def _cosines(queries: Tensor, docs: Tensor) -> Tensor:
    """Cosine similarities of ``[B, D]`` queries to docs ``[N, D]`` (shared) -> ``[B, N]``, or to per-query
    candidate lists ``[B, C, D]`` -> ``[B, C]``."""
    q = F.normalize(queries.float(), dim=-1)
    d = F.normalize(docs.to(device=q.device, dtype=q.dtype), dim=-1)
    if d.ndim == 2:
        return q @ d.T
    if d.ndim == 3 and d.shape[0] == q.shape[0]:
        return torch.einsum("bd,bcd->bc", q, d)
    raise ValueError(
        f"document embeddings must be [N, D] (shared by all queries) or [B, C, D] (one list per query, B = "
        f"{q.shape[0]}), got {tuple(docs.shape)}"
    )


def _as_candidates(docs: Tensor, batch: int, what: str) -> Tensor:
    if docs.ndim == 2:
        return docs.unsqueeze(0).expand(batch, *docs.shape)
    if docs.ndim == 3 and docs.shape[0] == batch:
        return docs
    raise ValueError(f"{what} must be [N, D] or [B, C, D] with B = {batch}, got {tuple(docs.shape)}")


def head_scores(
    q_text: Tensor,
    q_image: Tensor,
    *,
    doc_text_emb: Tensor | None = None,
    doc_image_emb: Tensor | None = None,
    mode: RetrievalMode = "text",
    question_emb: Tensor | None = None,
    weights: Tensor | Sequence[float] = (1.0, 0.0, 0.0),
) -> Tensor:
    """Scores of queries (already through their heads) against documents, per mode.

    * ``text``:  ``cos(q_text, d_txt)`` -- JOMED's text head (MMed-RAG's image->report score without the
      logit scale).
    * ``image``: ``cos(q_image, d_img)`` -- JOMED's image head.
    * ``fused``: MR-RAG Eq. 1 with ``sim(q_img, d_txt)`` from the text head, ``sim(q_img, d_img)`` from the
      image head and ``sim(q_txt, d_txt)`` from ``question_emb`` (None: the gamma term drops; zero rows:
      that query's gamma term is 0). ``weights`` is ``(alpha, beta, gamma)`` (a FusedScorer's parameter
      keeps its gradient).

    Documents are ``[N, D]`` (every query against the same documents) or ``[B, C, D]`` (each query's
    candidates); the result is ``[B, N]`` / ``[B, C]``. Gradients flow into the heads (and the weights).
    """
    if mode == "text" or mode == "image":
        docs = doc_text_emb if mode == "text" else doc_image_emb
        if docs is None:
            raise ValueError(f"mode={mode!r} needs doc_{mode}_emb (the index's document {mode} embeddings)")
        return _cosines(q_text if mode == "text" else q_image, docs)
    if mode != "fused":
        raise ValueError(f"mode must be 'text', 'image' or 'fused', got {mode!r}")
    if doc_text_emb is None or doc_image_emb is None:
        raise ValueError("mode='fused' needs both doc_text_emb and doc_image_emb")
    batch = q_text.shape[0]
    d_txt = _as_candidates(doc_text_emb, batch, "doc_text_emb").to(device=q_text.device, dtype=torch.float32)
    d_img = _as_candidates(doc_image_emb, batch, "doc_image_emb").to(device=q_text.device, dtype=torch.float32)
    q_txt = None if question_emb is None else question_emb.to(device=q_text.device, dtype=torch.float32)
    # candidate_sims scores one query image embedding against both document modalities; with two heads
    # the image->text term comes from the text head and the image->image term from the image head.
    by_text_head = candidate_sims(q_text.float(), d_img, d_txt, q_txt)
    by_image_head = candidate_sims(q_image.float(), d_img, d_txt)
    sims = CandidateSims(img_txt=by_text_head.img_txt, img_img=by_image_head.img_img, txt_txt=by_text_head.txt_txt)
    return fused_score(sims, weights)


class DualHeadRetriever(nn.Module):
    """JOMED's dual-head retriever over a domain's dual encoder (plus MR-RAG's fusion weights).

    Args:
        encoder: the domain's retriever R_d (its image tower embeds queries; its text tower questions).
        fusion_init: initial ``(alpha, beta, gamma)`` of the FusedScorer; ``(1, 0, 0)`` is image->text.
        fusion_temperature: tau of MR-RAG's InfoNCE (:meth:`FusedScorer.loss`).
    """

    def __init__(
        self,
        encoder: DualEncoder,
        fusion_init: Sequence[float] = (1.0, 0.0, 0.0),
        fusion_temperature: float = DEFAULT_FUSION_TEMPERATURE,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        device = encoder.device
        self.text_head = _identity_linear(encoder.embed_dim, device)
        self.image_head = _identity_linear(encoder.embed_dim, device)
        self.fusion = FusedScorer(init=fusion_init, temperature=fusion_temperature).to(device)

    # ------------------------------------------------------------------ facts
    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def model_id(self) -> str:
        """The encoder's id: the documents were embedded by it, the heads do not change it."""
        return self.encoder.model_id

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def head(self, name: Head) -> nn.Linear:
        if name == "text":
            return self.text_head
        if name == "image":
            return self.image_head
        raise ValueError(f"head must be 'text' or 'image', got {name!r}")

    def head_parameters(self, name: Part) -> list[nn.Parameter]:
        """Parameters of the ``text`` head, the ``image`` head or the ``fusion`` weights (for an optimizer)."""
        if name == "fusion":
            return list(self.fusion.parameters())
        return list(self.head(name).parameters())  # type: ignore[arg-type]

    def freeze_except(self, name: Part) -> None:
        """Train only ``name`` (JOMED: ``"text"`` first, then ``"image"``; MR-RAG: ``"fusion"``).

        Every other parameter, the encoder's included, gets ``requires_grad=False``.
        """
        if name not in TRAINABLE_PARTS:
            raise ValueError(f"freeze_except: {name!r} is not one of {list(TRAINABLE_PARTS)}")
        for param in self.parameters():
            param.requires_grad_(False)
        for param in self.head_parameters(name):
            param.requires_grad_(True)

    def reset_heads(self) -> None:
        """Both heads back to the identity (plain CLIP retrieval)."""
        with torch.no_grad():
            for head in (self.text_head, self.image_head):
                head.weight.copy_(torch.eye(self.embed_dim, device=head.weight.device))

    # ---------------------------------------------------------------- encoding
    def encode_query_images(self, pixels: Tensor) -> Tensor:
        """The encoder's normalized query image embeddings ``[B, D]`` in float32 (before the heads)."""
        return self.encoder.encode_image(pixels, normalize=True).float()

    def project(self, base: Tensor, head: Head) -> Tensor:
        """``normalize(W_head @ base)``: a head applied to base image embeddings ``[B, D]``."""
        weight = self.head(head).weight
        return F.normalize(F.linear(base.to(device=weight.device, dtype=weight.dtype), weight), dim=-1)

    def query_embeddings(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Preprocessed pixels -> ``(q_text, q_image)``, each ``[B, D]`` float32, L2-normalized."""
        base = self.encode_query_images(pixels)
        return self.project(base, "text"), self.project(base, "image")

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_embeddings(pixels)

    def encode_questions(self, questions: Sequence[str | None]) -> Tensor | None:
        """Question text embeddings ``[B, D]`` (zero rows for ``None``/empty questions); None if none has text."""
        present = [i for i, q in enumerate(questions) if q is not None and str(q).strip()]
        if not present:
            return None
        emb = self.encoder.encode_text([str(questions[i]) for i in present], normalize=True).float()
        out = torch.zeros(len(questions), emb.shape[1], device=emb.device, dtype=emb.dtype)
        out[torch.tensor(present, device=emb.device)] = emb
        return out

    def score(
        self,
        pixels: Tensor,
        *,
        doc_text_emb: Tensor | None = None,
        doc_image_emb: Tensor | None = None,
        mode: RetrievalMode = "text",
        questions: Sequence[str | None] | None = None,
        weights: Tensor | Sequence[float] | None = None,
    ) -> Tensor:
        """Scores of query images against given document embeddings (see :func:`head_scores`).

        ``weights`` defaults to this retriever's FusedScorer weights (with gradient).
        """
        q_text, q_image = self.query_embeddings(pixels)
        question_emb = self.encode_questions(questions) if (mode == "fused" and questions is not None) else None
        return head_scores(
            q_text,
            q_image,
            doc_text_emb=doc_text_emb,
            doc_image_emb=doc_image_emb,
            mode=mode,
            question_emb=question_emb,
            weights=self.fusion.weights if weights is None else weights,
        )

    # ------------------------------------------------------------------ state
    def head_state_dict(self) -> dict[str, Tensor]:
        """The trainable non-encoder state: both head matrices and the fusion weights."""
        return {
            "text_head.weight": self.text_head.weight.detach(),
            "image_head.weight": self.image_head.weight.detach(),
            "fusion.weights": self.fusion.weights.detach(),
        }

    def load_head_state_dict(self, state: Mapping[str, Tensor], source: str = "the given state") -> None:
        """Inverse of :meth:`head_state_dict`; missing/extra keys or wrong shapes fail naming ``source``."""
        expected = self.head_state_dict()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ModelLoadError(
                f"{source}: head state has missing keys {missing} / unexpected keys {extra}; save the retriever "
                "again with save_retriever"
            )
        for key, current in expected.items():
            if tuple(state[key].shape) != tuple(current.shape):
                raise ModelLoadError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, the encoder needs {tuple(current.shape)}; "
                    "the directory mixes two saves, save again"
                )
        with torch.no_grad():
            self.text_head.weight.copy_(state["text_head.weight"])
            self.image_head.weight.copy_(state["image_head.weight"])
            self.fusion.weights.copy_(state["fusion.weights"])


def save_retriever(retriever: DualHeadRetriever, directory: str | Path) -> Path:
    """Write ``encoder/`` (a dual-encoder directory), ``retriever_heads.safetensors`` and the card."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_dual_encoder(retriever.encoder, out / ENCODER_SUBDIR)
    weights = save_state_dict(retriever.head_state_dict(), out, stem=HEADS_STEM)
    encoder_cfg = retriever.encoder.config
    write_card(
        out,
        ModelCard(
            kind=CARD_KIND,
            config={
                "encoder": encoder_cfg.to_dict() if encoder_cfg is not None else None,
                "fusion_temperature": retriever.fusion.temperature,
            },
            extra={
                "encoder_dir": ENCODER_SUBDIR,
                "model_id": retriever.model_id,
                "embed_dim": retriever.embed_dim,
                "heads": weights.name,
            },
        ),
    )
    logger.info("saved dual-head retriever %s to %s", retriever.model_id, out)
    return out


def load_retriever(directory: str | Path, *, device: str = "cpu", dtype: str = "auto") -> DualHeadRetriever:
    """Load a :func:`save_retriever` directory, or a plain dual encoder (identity heads).

    A plain dual encoder is a :func:`~medrag_ray.models.dual_encoder.save_dual_encoder` directory or a real
    open_clip checkpoint directory (e.g. BiomedCLIP). Any other directory fails naming what it holds.
    """
    path = require_directory(directory, "load_retriever").resolve()
    card = read_card(path)
    if card is None:
        if (path / OPEN_CLIP_CONFIG_FILE).is_file():
            return DualHeadRetriever(load_dual_encoder(path, device=device, dtype=dtype)).eval()
        raise ModelLoadError(
            f"directory {path} is not a retriever: it has neither medrag_model.json nor {OPEN_CLIP_CONFIG_FILE}; "
            "pass a directory written by save_retriever (dual-head) or save_dual_encoder (a retriever R_d, e.g. "
            "artifacts/models/retriever/<domain>), or a real open_clip checkpoint directory"
        )
    if card.kind == "dual_encoder":
        return DualHeadRetriever(load_dual_encoder(path, device=device, dtype=dtype)).eval()
    if card.kind != CARD_KIND:
        raise ModelLoadError(
            f"directory {path} holds a medrag-ray '{card.kind}' model, not a retriever; pass a directory written "
            "by save_retriever ('dual_head_retriever') or save_dual_encoder ('dual_encoder')"
        )
    encoder_dir = path / str(card.extra.get("encoder_dir", ENCODER_SUBDIR))
    encoder = load_dual_encoder(encoder_dir, device=device, dtype=dtype)
    temperature = float((card.config or {}).get("fusion_temperature", DEFAULT_FUSION_TEMPERATURE))
    retriever = DualHeadRetriever(encoder, fusion_temperature=temperature)
    retriever.load_head_state_dict(load_state_dict(path, stem=HEADS_STEM), source=str(path))
    logger.info("loaded dual-head retriever %s from %s", retriever.model_id, path)
    return retriever.eval()


# ======================================================================================= index layout


class DocEmbeddings:
    """A domain's stored document embeddings, looked up by doc id (what fused re-scoring gathers).

    ``text`` and ``image`` are ``[N, D]`` float32 rows in the order of ``ids``. A zero image row (a document
    without an image, in an in-memory store) scores ``sim(q_img, d_img) = 0``.
    """

    def __init__(self, ids: Sequence[str], text: np.ndarray, image: np.ndarray) -> None:
        self.ids = [str(i) for i in ids]
        self.text = np.ascontiguousarray(text, dtype=np.float32)
        self.image = np.ascontiguousarray(image, dtype=np.float32)
        n = len(self.ids)
        if self.text.ndim != 2 or self.text.shape[0] != n or self.image.shape != self.text.shape:
            raise ValueError(f"DocEmbeddings: {n} ids but text {self.text.shape} and image {self.image.shape}")
        self._pos = {doc_id: i for i, doc_id in enumerate(self.ids)}
        if len(self._pos) != n:
            raise ValueError("DocEmbeddings: duplicate document ids; each document must be embedded once")

    @classmethod
    def from_domain(cls, emb: DomainEmbeddings) -> DocEmbeddings:
        """From the index store's :class:`~medrag_ray.retrieval.embed.DomainEmbeddings`."""
        return cls(emb.ids, emb.text, emb.image)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.text.shape[1])

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._pos

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids``; an unknown id raises naming it."""
        try:
            return np.fromiter((self._pos[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as err:
            raise IndexFileError(
                f"document {err.args[0]!r} is in the FAISS index but not in the stored embeddings; the index "
                f"directory mixes two builds: {_REBUILD}"
            ) from None

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` ``[B, C]`` (``-1`` = padding) -> text and image embeddings ``[B, C, D]`` (zeros at pads)."""
        safe = np.where(rows >= 0, rows, 0)
        keep = (rows >= 0)[..., None].astype(np.float32)
        return self.text[safe] * keep, self.image[safe] * keep


def read_docs(store_dir: str | Path, domain: str, with_images: bool = True) -> dict[str, CorpusDoc]:
    """``<store>/docs/<domain>/`` -> doc id -> :class:`CorpusDoc` (``image_bytes`` dropped unless ``with_images``)."""
    where = Path(store_dir) / DOCS_DIR / domain
    columns = [f.name for f in CORPUS_SCHEMA if with_images or f.name != "image_bytes"]
    table = read_docs_table(store_dir, domain, columns=columns)
    try:
        docs = list(from_rows(table.to_pylist(), CorpusDoc))
    except (RecordError, TypeError) as err:
        raise IndexFileError(f"{where}: not CorpusDoc rows ({err}); {_REBUILD}") from err
    out: dict[str, CorpusDoc] = {}
    for doc in docs:
        if doc.id in out:
            raise IndexFileError(f"{where}: document {doc.id!r} appears twice; {_REBUILD}")
        out[doc.id] = doc
    return out


def _resolve_encoder_dir(raw: str, index_dir: Path, where: str) -> Path:
    path = Path(raw).expanduser()
    candidates = [path] if path.is_absolute() else [index_dir / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        f"{where}: encoder_dir {raw!r} does not exist (tried {[str(c) for c in candidates]}); train the domain "
        "retriever (jobs/train_retriever.py) or pass retriever_dirs={domain: path} to from_artifacts"
    )


# ============================================================================================ results


@dataclasses.dataclass(frozen=True)
class Hit:
    """One retrieved document, in rank order; ``kept`` marks the adaptive-k selection."""

    doc_id: str
    text: str
    score: float
    kept: bool
    rank: int
    image_path: str = ""
    image_bytes: bytes | None = None


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """One query's retrieval: the routed domain, the top-k hits (with kept flags) and how many are kept."""

    domain: str
    domain_confidence: float | None
    """The router's softmax probability of ``domain``; None when the caller gave the domain."""
    hits: list[Hit]
    k_kept: int
    mode: str = "text"

    @property
    def kept_hits(self) -> list[Hit]:
        return [hit for hit in self.hits if hit.kept]


# ========================================================================================== pipeline


class DomainResources:
    """What one domain's retrieval needs: the retriever, the FAISS indexes, the docs and the stored embeddings.

    ``embeddings`` may be given in memory, or read from the index store ``store_dir`` on the first fused
    query (``embeddings/<domain>/``).
    """

    def __init__(
        self,
        domain: str,
        retriever: DualHeadRetriever,
        text_index: DomainIndex,
        docs: Mapping[str, CorpusDoc],
        *,
        image_index: DomainIndex | None = None,
        embeddings: DocEmbeddings | None = None,
        store_dir: str | Path | None = None,
    ) -> None:
        for what, index in (("text", text_index), ("image", image_index)):
            if index is None:
                continue
            if index.domain != domain:
                raise ValueError(f"the {what} index is for domain {index.domain!r}, not {domain!r}")
            if index.dim != retriever.embed_dim:
                raise ValueError(
                    f"{domain}: the {what} index has dim {index.dim} but the retriever embeds in "
                    f"{retriever.embed_dim}; load the retriever that built the index"
                )
        missing = [doc_id for doc_id in text_index.ids if doc_id not in docs]
        if image_index is not None:
            missing += [doc_id for doc_id in image_index.ids if doc_id not in docs]
        if missing:
            raise IndexFileError(
                f"{domain}: {len(missing)} indexed documents have no CorpusDoc row (e.g. {missing[:3]!r}); the index "
                f"directory mixes two builds: {_REBUILD}"
            )
        self.domain = domain
        self.retriever = retriever
        self.text_index = text_index
        self.image_index = image_index
        self.docs = docs
        self._embeddings = embeddings
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._lock = threading.Lock()

    def with_retriever(self, retriever: DualHeadRetriever) -> DomainResources:
        """The same indexes and documents queried by another retriever of the same encoder (e.g. JOMED's
        distilled heads): nothing is loaded twice."""
        if retriever.model_id != self.retriever.model_id:
            raise IndexFileError(
                f"{self.domain}: the index was built with {self.retriever.model_id!r}, not {retriever.model_id!r}; "
                "heads must sit on the encoder that built the index"
            )
        return DomainResources(self.domain, retriever, self.text_index, self.docs, image_index=self.image_index,
                               embeddings=self._embeddings, store_dir=self._store_dir)

    def doc_embeddings(self) -> DocEmbeddings:
        """The stored document embeddings (read once, on first use)."""
        with self._lock:
            if self._embeddings is None:
                if self._store_dir is None:
                    raise ValueError(
                        f"{self.domain}: fused retrieval needs the stored document embeddings; pass embeddings= or "
                        "store_dir= to DomainResources (from_artifacts does)"
                    )
                emb = DocEmbeddings.from_domain(read_embeddings(self._store_dir, self.domain))
                if emb.dim != self.retriever.embed_dim:
                    raise IndexFileError(
                        f"{embeddings_dir(self._store_dir, self.domain)} holds dim-{emb.dim} embeddings, the "
                        f"retriever embeds in {self.retriever.embed_dim}; {_REBUILD}"
                    )
                self._embeddings = emb
            return self._embeddings

    def require_image_index(self) -> DomainIndex:
        if self.image_index is None:
            raise ValueError(
                f"domain {self.domain!r} has no image index ({IMAGE_DIR}/{self.domain}/ of the store); use "
                "mode='text' or 'fused' for it, or build the store with jobs/build_index.py (it indexes images too)"
            )
        return self.image_index


def _ranked(ids: Sequence[str], scores: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Drop unfilled slots and sort ids and scores together, descending (stable)."""
    scores = np.asarray(scores[: len(ids)], dtype=np.float64)
    finite = np.isfinite(scores)
    ids = [doc_id for doc_id, ok in zip(ids, finite, strict=True) if ok]
    scores = scores[finite]
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order], scores[order]


def _adaptive_k(scores: np.ndarray, cfg: RetrievalConfig, temperature: float) -> int:
    """How many of a query's ranked hits to keep (cfg.adaptive rule, cfg.scale)."""
    if scores.size == 0:
        return 0
    if cfg.adaptive == "none":
        return min(cfg.effective_k_max, scores.size)
    s = scores / temperature if cfg.scale == "softmax" else scores
    if cfg.adaptive == "gap":
        return adaptive_k_gap(s, cfg.gamma, cfg.k_min, cfg.k_max, scale=cfg.scale)
    return adaptive_k_ratio(s, cfg.tau, cfg.effective_k_max, cfg.k_min, scale=cfg.scale)


@torch.inference_mode()
def route_images(
    router: DomainRouter, images: Sequence[Image.Image], allowed: Collection[str], batch_size: int = 64
) -> list[tuple[str, float]]:
    """F(x_v) per image: ``(domain, its calibrated probability)``, or ``(UNKNOWN_DOMAIN, the top probability)``.

    The softmax (at the router's calibrated temperature) is over all the router's domains. An image whose most
    probable domain has no index (``allowed``), or whose top probability is below the router's
    ``unknown_threshold``, is of an unknown domain: it is answered without retrieval rather than sent to the
    index of a domain it does not belong to.
    """
    if not any(d in allowed for d in router.domains):
        raise ValueError(f"the router's domains {list(router.domains)} include none of {sorted(allowed)}")
    out = router.predict(list(images), batch_size, indexed=allowed)
    unknown = sum(d == UNKNOWN_DOMAIN for d, _ in out)
    if unknown:
        logger.info("%d of %d images are of an unknown or unindexed domain (answered without retrieval)", unknown,
                    len(images))
    return out


class MultimodalRetriever:
    """Route -> per-domain retrieval -> adaptive-k, batched by domain (DESIGN.md features 3, 4, 8, 10, 13).

    Args:
        resources: the indexed domains (a mapping domain -> :class:`DomainResources` or a sequence of them).
        router: the domain router F(x_v); None means every call must pass ``domains=``.
        cfg: the default :class:`RetrievalConfig` (each call may override it).
    """

    def __init__(
        self,
        resources: Mapping[str, DomainResources] | Sequence[DomainResources],
        router: DomainRouter | None = None,
        cfg: RetrievalConfig | None = None,
    ) -> None:
        values = list(resources.values()) if isinstance(resources, Mapping) else list(resources)
        if not values:
            raise ValueError("MultimodalRetriever needs at least one indexed domain")
        self._resources: dict[str, DomainResources] = {}
        for res in values:
            if res.domain in self._resources:
                raise ValueError(f"domain {res.domain!r} is given twice; one DomainResources per domain")
            self._resources[res.domain] = res
        self.router = router
        self.cfg = cfg or RetrievalConfig()
        if router is not None:
            indexed = [d for d in router.domains if d in self._resources]
            if not indexed:
                raise ValueError(
                    f"the router's domains {list(router.domains)} include none of the indexed domains "
                    f"{self.domains}; load the router trained on these domains or index its domains"
                )
            unindexed = [d for d in router.domains if d not in self._resources]
            if unindexed:
                logger.warning("router domains %s have no index: images routed there are answered as %r (no "
                               "retrieval); indexed: %s", unindexed, UNKNOWN_DOMAIN, indexed)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(sorted(self._resources))

    def resources(self, domain: str) -> DomainResources:
        try:
            return self._resources[domain]
        except KeyError:
            raise KeyError(f"domain {domain!r} has no index; indexed domains: {list(self.domains)}") from None

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_artifacts(
        cls,
        router_dir: str | Path | None,
        index_dir: str | Path,
        device: str = "cpu",
        *,
        dtype: str = "auto",
        cfg: RetrievalConfig | None = None,
        retriever_dirs: Mapping[str, str | Path] | None = None,
        domains: Sequence[str] | None = None,
        with_images: bool = True,
        index_use_gpu: GpuMode | None = None,
        verify_docs: int = 4,
    ) -> MultimodalRetriever:
        """Load the router, and for each domain of ``<index_dir>/manifest.json`` its retriever, indexes and docs.

        Args:
            router_dir: a :func:`~medrag_ray.models.router.save_router` directory, or None (pass ``domains=``
                to every :meth:`retrieve` call).
            index_dir: the directory ``jobs/build_index.py`` wrote.
            retriever_dirs: per-domain override of the manifest's ``encoder_dir``: e.g. a dual-head directory
                whose heads JOMED trained (its encoder must be the one that built the index).
            domains: load only these domains (default: all of the manifest).
            with_images: keep the documents' inline ``image_bytes`` for hits (JOMED puts retrieved images in
                the prompt); False saves memory, hits still carry ``image_path``.
            index_use_gpu: override of the saved indexes' FAISS GPU mode.
            verify_docs: re-embed this many stored documents' texts with each retriever and require cosine
                >= 0.99 to the stored text embeddings (0 disables the check).
        """
        root = Path(index_dir)
        if not root.is_dir():
            raise FileNotFoundError(
                f"index directory {root} does not exist; build it with `python jobs/build_index.py out_dir={root}` "
                "or pass the out_dir it wrote (artifacts/index by default)"
            )
        manifest = read_manifest(root).domains
        wanted = list(manifest) if domains is None else list(domains)
        unknown = [d for d in wanted if d not in manifest]
        if unknown:
            raise ValueError(f"domains {unknown} are not in {root / MANIFEST_FILE} (it indexes {sorted(manifest)})")
        overrides = dict(retriever_dirs or {})
        stray = sorted(set(overrides) - set(wanted))
        if stray:
            raise ValueError(f"retriever_dirs names domains {stray} that are not loaded ({wanted})")
        loaded: dict[Path, DualHeadRetriever] = {}
        resources = []
        for domain in wanted:
            entry = manifest[domain]
            where = f"{root / MANIFEST_FILE} domains.{domain}"
            if domain in overrides:
                model_dir = require_directory(overrides[domain], f"retriever_dirs[{domain!r}]").resolve()
            else:
                model_dir = _resolve_encoder_dir(entry.encoder_dir, root, where)
            if model_dir not in loaded:
                loaded[model_dir] = load_retriever(model_dir, device=device, dtype=dtype)
            retriever = loaded[model_dir]
            if retriever.model_id != entry.model_id or retriever.embed_dim != entry.dim:
                raise IndexFileError(
                    f"{where}: the index was built with model_id={entry.model_id!r} (dim {entry.dim}) but "
                    f"{model_dir} holds {retriever.model_id!r} (dim {retriever.embed_dim}); load the retriever that "
                    f"built the index or {_REBUILD}"
                )
            res = _load_domain(root, domain, entry, retriever, with_images=with_images, index_use_gpu=index_use_gpu)
            if verify_docs > 0:
                _verify_retriever(res, root, model_dir, verify_docs)
            resources.append(res)
        router = load_router(router_dir, device=device, dtype=dtype) if router_dir is not None else None
        logger.info("multimodal retriever over %s (router: %s)", wanted, router_dir)
        return cls(resources, router=router, cfg=cfg)

    # ------------------------------------------------------------------------------------ routing
    def route(self, images: Sequence[Image.Image], batch_size: int | None = None) -> list[tuple[str, float]]:
        """(domain, confidence) per image: the router's most probable domain among the indexed ones."""
        if self.router is None:
            raise ValueError(
                "no domain router is loaded: pass domains=[...] to retrieve(), or build with "
                "from_artifacts(router_dir=...)"
            )
        return route_images(self.router, images, self.domains, batch_size or self.cfg.batch_size)

    # ---------------------------------------------------------------------------------- retrieval
    @torch.inference_mode()
    def retrieve(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str | None] | None = None,
        domains: Sequence[str] | None = None,
        cfg: RetrievalConfig | None = None,
        exclude_ids: Sequence[Collection[str]] | None = None,
    ) -> list[RetrievalResult]:
        """Retrieve for each image (with its optional question) from its domain's index.

        ``domains`` skips the router (one domain per image). ``questions`` feed the fused score's
        ``sim(q_txt, d_txt)`` term (other modes ignore them). ``exclude_ids`` (one collection per image) drops
        those documents before adaptive-k -- a training sample's own report is in the corpus, and retrieving it
        would teach the reader to copy. Results come back in input order.
        """
        cfg = cfg or self.cfg
        if exclude_ids is not None and len(exclude_ids) != len(images):
            raise ValueError(f"got {len(exclude_ids)} exclude_ids for {len(images)} images; pass one collection each")
        extra = max((len(e) for e in exclude_ids), default=0) if exclude_ids is not None else 0
        search_cfg = dataclasses.replace(cfg, k=cfg.k + extra) if extra else cfg
        images = list(images)
        n = len(images)
        if n == 0:
            return []
        bad = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
        if bad:
            raise TypeError(f"images[{bad[0]}] is a {type(images[bad[0]]).__name__}, not a PIL image; decode it first "
                            "(medrag_ray.data.readers.common.load_image)")
        if questions is not None and len(questions) != n:
            raise ValueError(f"got {len(questions)} questions for {n} images; pass one per image (None for none)")
        if domains is not None:
            if len(domains) != n:
                raise ValueError(f"got {len(domains)} domains for {n} images; pass one per image or None to route")
            unknown = sorted({d for d in domains if d not in self._resources})
            if unknown:
                raise ValueError(f"domains {unknown} have no index; indexed domains: {list(self.domains)}")
            routed: list[tuple[str, float | None]] = [(d, None) for d in domains]
        else:
            routed = list(self.route(images, cfg.batch_size))
        groups: dict[str, list[int]] = {}
        for i, (domain, _) in enumerate(routed):
            groups.setdefault(domain, []).append(i)
        results: list[RetrievalResult | None] = [None] * n
        for i in groups.pop(UNKNOWN_DOMAIN, []):
            results[i] = RetrievalResult(UNKNOWN_DOMAIN, routed[i][1], [], 0, mode=cfg.mode)
        for domain, members in groups.items():
            res = self._resources[domain]
            group_questions = [questions[i] for i in members] if questions is not None else None
            ranked = self._retrieve_group(res, [images[i] for i in members], group_questions, search_cfg)
            temperature = cfg.temperature or 1.0 / float(res.retriever.encoder.logit_scale)
            for i, (ids, scores) in zip(members, ranked, strict=True):
                if extra:
                    keep = [j for j, doc_id in enumerate(ids) if doc_id not in exclude_ids[i]][: cfg.k]
                    ids, scores = [ids[j] for j in keep], scores[keep]
                k_kept = _adaptive_k(scores, cfg, temperature)
                hits = [self._hit(res, doc_id, float(score), rank, rank < k_kept)
                        for rank, (doc_id, score) in enumerate(zip(ids, scores, strict=True))]
                results[i] = RetrievalResult(
                    domain=domain, domain_confidence=routed[i][1], hits=hits, k_kept=k_kept, mode=cfg.mode
                )
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def least_similar_docs(
        self, images: Sequence[Image.Image], domains: Sequence[str], batch_size: int | None = None
    ) -> list[CorpusDoc]:
        """For each image, the document of its domain whose image is the least similar to it (cosine of the
        retriever's image embeddings): MMed-RAG's x'_v, the start of the noisy image x_v* (Eq. 2)."""
        if len(domains) != len(images):
            raise ValueError(f"got {len(domains)} domains for {len(images)} images; pass one per image")
        bs = batch_size or self.cfg.batch_size
        out: list[CorpusDoc | None] = [None] * len(images)
        groups: dict[str, list[int]] = {}
        for i, domain in enumerate(domains):
            groups.setdefault(domain, []).append(i)
        for domain, members in groups.items():
            res = self.resources(domain)
            emb = res.doc_embeddings()
            has_image = np.linalg.norm(emb.image, axis=1) > 0
            if not has_image.any():
                raise ValueError(f"domain {domain!r} has no document images; the noisy image needs an image index")
            candidates = np.flatnonzero(has_image)
            query = torch.cat([
                res.retriever.encode_query_images(res.retriever.encoder.preprocess([images[i] for i in chunk]))
                for chunk in (members[s : s + bs] for s in range(0, len(members), bs))
            ]).cpu().numpy()
            picks = least_similar(query, emb.image[candidates])
            for i, row in zip(members, picks, strict=True):
                out[i] = res.docs[emb.ids[int(candidates[row])]]
        return [doc for doc in out if doc is not None]

    @staticmethod
    def _hit(res: DomainResources, doc_id: str, score: float, rank: int, kept: bool) -> Hit:
        doc = res.docs[doc_id]
        return Hit(
            doc_id=doc_id,
            text=doc.text,
            score=score,
            kept=kept,
            rank=rank,
            image_path=doc.image_path,
            image_bytes=doc.image_bytes,
        )

    def _encode(self, res: DomainResources, images: list[Image.Image], batch_size: int) -> tuple[Tensor, Tensor]:
        q_text, q_image = [], []
        for start in range(0, len(images), batch_size):
            pixels = res.retriever.encoder.preprocess(images[start : start + batch_size])
            t, m = res.retriever.query_embeddings(pixels)
            q_text.append(t)
            q_image.append(m)
        return torch.cat(q_text), torch.cat(q_image)

    def _retrieve_group(
        self,
        res: DomainResources,
        images: list[Image.Image],
        questions: list[str | None] | None,
        cfg: RetrievalConfig,
    ) -> list[tuple[list[str], np.ndarray]]:
        """Ranked (ids, scores) per query of one domain group: at most ``cfg.k`` each."""
        q_text, q_image = self._encode(res, images, cfg.batch_size)
        if cfg.mode == "text":
            scores, ids = res.text_index.search(q_text.cpu().numpy(), cfg.k)
        elif cfg.mode == "image":
            scores, ids = res.require_image_index().search(q_image.cpu().numpy(), cfg.k)
        else:
            return self._fused_group(res, q_text, q_image, questions, cfg)
        return [_ranked(row_ids, row_scores) for row_ids, row_scores in zip(ids, scores, strict=True)]

    def _fused_group(
        self,
        res: DomainResources,
        q_text: Tensor,
        q_image: Tensor,
        questions: list[str | None] | None,
        cfg: RetrievalConfig,
    ) -> list[tuple[list[str], np.ndarray]]:
        """MR-RAG MCR: re-score the union of both heads' FAISS candidates with the fused score, keep the top k."""
        n_cand = cfg.n_candidates
        _, text_ids = res.text_index.search(q_text.cpu().numpy(), n_cand)
        if res.image_index is not None:
            _, image_ids = res.image_index.search(q_image.cpu().numpy(), n_cand)
        else:
            image_ids = [[] for _ in text_ids]
        cands = [list(dict.fromkeys([*a, *b])) for a, b in zip(text_ids, image_ids, strict=True)]
        width = max((len(c) for c in cands), default=0)
        if width == 0:
            return [([], np.zeros(0)) for _ in cands]
        emb = res.doc_embeddings()
        rows = np.full((len(cands), width), -1, dtype=np.int64)
        for r, cand in enumerate(cands):
            rows[r, : len(cand)] = emb.rows(cand)
        d_txt, d_img = emb.gather(rows)
        question_emb = res.retriever.encode_questions(questions) if questions is not None else None
        weights = cfg.fused_weights if cfg.fused_weights is not None else res.retriever.fusion.weights.detach()
        scores = head_scores(
            q_text,
            q_image,
            doc_text_emb=torch.from_numpy(d_txt),
            doc_image_emb=torch.from_numpy(d_img),
            mode="fused",
            question_emb=question_emb,
            weights=weights,
        )
        scores = scores.masked_fill(torch.from_numpy(rows < 0).to(scores.device), float("-inf")).cpu().numpy()
        out = []
        for cand, row_scores in zip(cands, scores, strict=True):
            ids, ranked = _ranked(cand, row_scores)
            out.append((ids[: cfg.k], ranked[: cfg.k]))
        return out


def _load_domain(
    root: Path,
    domain: str,
    entry: ManifestEntry,
    retriever: DualHeadRetriever,
    *,
    with_images: bool,
    index_use_gpu: GpuMode | None,
) -> DomainResources:
    indexes = []
    for name in (TEXT_DIR, IMAGE_DIR):
        path = root / name / domain
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is missing although {root / MANIFEST_FILE} lists {domain!r}; {_REBUILD}")
        index = DomainIndex.load(path, expected_model_id=entry.model_id, expected_dim=entry.dim, use_gpu=index_use_gpu)
        if len(index) != entry.n_docs:
            raise IndexFileError(
                f"{path} holds {len(index)} documents but {root / MANIFEST_FILE} says n_docs={entry.n_docs}; the "
                f"directory mixes two builds: {_REBUILD}"
            )
        indexes.append(index)
    text_index, image_index = indexes
    docs = read_docs(root, domain, with_images=with_images)
    return DomainResources(domain, retriever, text_index, docs, image_index=image_index, store_dir=root)


def _verify_retriever(res: DomainResources, root: Path, model_dir: Path, n: int) -> None:
    """Re-embed the first ``n`` stored documents' texts; the retriever must reproduce the stored embeddings."""
    parts = list_parts(embeddings_dir(root, res.domain))
    if not parts:
        raise FileNotFoundError(f"{embeddings_dir(root, res.domain)} holds no embedding parts; {_REBUILD}")
    try:
        batch = next(pq.ParquetFile(parts[0]).iter_batches(batch_size=n, columns=["id", "text_emb"]), None)
    except (pa.ArrowInvalid, KeyError, OSError) as err:
        raise IndexFileError(f"{parts[0]}: cannot read columns id, text_emb ({err}); {_REBUILD}") from err
    if batch is None or batch.num_rows == 0:
        raise IndexFileError(f"{parts[0]} holds no rows; {_REBUILD}")
    ids = [str(i) for i in batch.column(0).to_pylist()]
    vectors = batch.column(1)
    dim = res.retriever.embed_dim
    if vectors.null_count or pc.list_value_length(vectors).to_numpy(zero_copy_only=False).tolist() != [dim] * len(ids):
        raise IndexFileError(f"{parts[0]}: text_emb must hold one {dim}-value vector per row; {_REBUILD}")
    stored = np.asarray(pc.list_flatten(vectors).to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    missing = [doc_id for doc_id in ids if doc_id not in res.docs]
    if missing:
        raise IndexFileError(f"{parts[0]}: documents {missing[:3]!r} have no CorpusDoc row; {_REBUILD}")
    with torch.inference_mode():
        fresh = res.retriever.encoder.encode_text([res.docs[i].text for i in ids]).float().cpu().numpy()
    stored = stored / np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
    cos = (fresh * stored).sum(axis=1)
    worst = int(np.argmin(cos))
    if cos[worst] < VERIFY_MIN_COSINE:
        raise IndexFileError(
            f"{res.domain}: the retriever in {model_dir} does not reproduce the text embeddings stored in "
            f"{embeddings_dir(root, res.domain)} (cosine {cos[worst]:.4f} < {VERIFY_MIN_COSINE} for document "
            f"{ids[worst]!r}): the index was built with other weights. Point the manifest's encoder_dir (or "
            f"retriever_dirs) at the retriever that built the index, or {_REBUILD}"
        )
