"""Training losses, one function each, with the paper equation they implement.

* :mod:`.info_nce` -- symmetric CLIP InfoNCE (MMed-RAG Eq. 1) and the candidate-list InfoNCE used to train
  MR-RAG's fused retrieval score (MR-RAG Eq. 2).

Submodules are imported explicitly (``from medrag_ray.losses.info_nce import clip_info_nce``).
"""
