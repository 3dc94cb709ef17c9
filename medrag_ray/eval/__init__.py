"""Evaluation metrics (pure functions over predictions; no models, no Ray)."""
