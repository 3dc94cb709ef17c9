"""Training losses, one function each, with the paper equation they implement.

* :mod:`.info_nce` -- symmetric CLIP InfoNCE (MMed-RAG Eq. 1) and the candidate-list InfoNCE used to train
  MR-RAG's fused retrieval score (MR-RAG Eq. 2).
* :mod:`.dpo` -- the sigmoid DPO loss of RAG-PT (MMed-RAG Eq. 3/4) and the summed response log-probabilities
  it is computed from.

Submodules are imported explicitly (``from medrag_ray.losses.info_nce import clip_info_nce``).
"""
