"""Small datasets shipped with sparsembed, and loaders for data the user supplies."""

from sparsembed.datasets._movielens import load_movielens, load_sample_ratings

__all__ = ["load_sample_ratings", "load_movielens"]
