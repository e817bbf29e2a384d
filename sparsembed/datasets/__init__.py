"""Small data sets shipped with sparsembed, for examples and tests."""

import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))

__all__ = ["load_sample_ratings"]


def load_sample_ratings():
    """The MovieLens-style sample ratings shipped with the package.

    1,501 ratings of 100 items (ids 0..99) by 30 users (ids 0..29), ratings 1 to 5,
    from Apache Spark's ``data/mllib/als/sample_movielens_ratings.txt`` (Apache License
    2.0, see ``NOTICE_movielens.txt`` beside the file). The file's format is
    ``user::item::rating::timestamp``, one rating a line; the timestamps are dropped.

    Returns
    -------
    users : ndarray of shape (n_ratings,), int64
    items : ndarray of shape (n_ratings,), int64
    ratings : ndarray of shape (n_ratings,), float32
        In file order.
    """
    path = os.path.join(_HERE, "sample_movielens_ratings.txt")
    with open(path, encoding="ascii") as f:
        rows = [line.strip().split("::") for line in f if line.strip()]
    data = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return data[:, 0].astype(np.int64), data[:, 1].astype(np.int64), data[:, 2].astype(np.float32)
