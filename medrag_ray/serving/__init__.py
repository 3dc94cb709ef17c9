"""The serving core (no Ray): request validation, safe image decoding and the route -> retrieve -> read steps
that ``serve/`` deploys as separate Ray Serve deployments and :class:`~medrag_ray.serving.answer.LocalAnswerer`
runs in one process."""
