"""Preference mining (MMed-RAG RAG-PT): the noisy image x_v*, the rules D_cm / D_oa1 / D_oa2, pair records."""
