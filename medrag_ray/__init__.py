"""medrag-ray: the pure core (never imports ray)."""

__version__ = "0.1.0"
