"""Training without Ray: datasets, tasks (router, retriever), a DeepSpeed engine wrapper and one loop.

``jobs/train_*.py`` run :func:`medrag_ray.train.loop.train` inside Ray Train workers through a small
:class:`~medrag_ray.train.loop.Coordinator` adapter; tests run the same loop in one process.
"""
