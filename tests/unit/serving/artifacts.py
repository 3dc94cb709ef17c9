"""A tiny artifacts directory as ``jobs/pipeline.py`` lays it out, built in-process in seconds (no Ray, no
training): synthetic data, the untrained init models, and a FAISS index store over the corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

from medrag_ray.config import SyntheticDataConfig, TinyModelsConfig
from medrag_ray.data import synthetic as syn
from medrag_ray.data.schema import CorpusDoc, read_parquet
from medrag_ray.models.configs import DualEncoderConfig, ReaderConfig
from medrag_ray.models.prepare import prepare_models
from medrag_ray.retrieval.embed import CorpusEmbedder, docs_to_batch, encoder_info, group_by_domain, write_store
from medrag_ray.retrieval.index import IndexConfig

DOMAINS = ("pathology", "radiology")
TINY_MODELS = TinyModelsConfig(
    tokenizer_vocab_size=400,
    encoder=DualEncoderConfig(image_size=32),
    reader=ReaderConfig(image_size=32, patch_size=8, max_length=768),
)


def build_tiny_artifacts(root: Path, n_per_domain: int = 12) -> Path:
    """``root`` with ``data/synthetic``, ``models/{init,router,reader}`` and ``index/``; returns ``root``."""
    data = root / "data" / "synthetic"
    ds = syn.generate(SyntheticDataConfig(domains=DOMAINS, n_per_domain=n_per_domain, n_phenotypes=2, image_size=32))
    syn.write_dataset(ds, data)
    init = prepare_models(data, root / "models" / "init", TINY_MODELS)
    shutil.copytree(init / "router", root / "models" / "router")
    shutil.copytree(init / "reader", root / "models" / "reader")
    docs = read_parquet(data / syn.CORPUS_NAME, CorpusDoc)
    batch = CorpusEmbedder(str(init / "encoder"), device="cpu")(docs_to_batch(docs))
    write_store(root / "index", group_by_domain(batch), docs, encoder_info(init / "encoder"),
                IndexConfig(kind="flat", use_gpu="never"))
    return root
