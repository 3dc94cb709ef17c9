"""Retrieval: per-domain FAISS indexes, adaptive-k selection, fused scoring and logit fusion."""
