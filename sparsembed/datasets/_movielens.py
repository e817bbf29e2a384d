"""Rating data loaders: the bundled MovieLens-style sample and user-supplied MovieLens.

MovieLens 100K itself may not be redistributed (GroupLens terms), so it is never
shipped: :func:`load_movielens` reads a copy the user has (``u.data``, ``u1.base``
... or RecBole's ``ml-100k.inter``).
"""

import os

import numpy as np

__all__ = ["load_sample_ratings", "load_movielens"]

_HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_RATINGS_FILE = os.path.join(_HERE, "sample_movielens_ratings.txt")


def load_sample_ratings():
    """The bundled MovieLens-style sample: 1,501 ratings, 30 users, 100 items.

    From Apache Spark's ``data/mllib/als/sample_movielens_ratings.txt`` (Apache
    License 2.0, see ``NOTICE_movielens.txt`` next to the data file); lines are
    ``user::item::rating::timestamp``.

    Returns
    -------
    users : ndarray of shape (1501,), int64
        User ids 0..29.
    items : ndarray of shape (1501,), int64
        Item ids 0..99.
    ratings : ndarray of shape (1501,), float64
        Ratings 1..5.
    """
    return _read(SAMPLE_RATINGS_FILE, "::", 0)


def _read(path, delimiter, skip):
    with open(path, encoding="utf-8") as f:
        lines = (line.replace("::", "\t") for line in f) if delimiter == "::" else f
        data = np.loadtxt(lines, delimiter="\t", skiprows=skip, usecols=(0, 1, 2),
                          dtype=np.float64, ndmin=2)
    ids = data[:, :2]
    fractional = np.flatnonzero((ids != np.floor(ids)).any(axis=1))
    if fractional.size:  # (astype would truncate them silently)
        i = int(fractional[0])
        raise ValueError(f"{path}: rating {i + 1}: user and item ids must be integers, got "
                         f"user {float(ids[i, 0])!r}, item {float(ids[i, 1])!r}")
    return ids[:, 0].astype(np.int64), ids[:, 1].astype(np.int64), data[:, 2].copy()


def load_movielens(path):
    """Read MovieLens ratings from ``path``.

    Two layouts are recognised: GroupLens' ``u.data`` (and the ``uN.base`` /
    ``uN.test`` splits), tab-separated ``user item rating timestamp`` without a
    header; and RecBole's atomic ``.inter`` file (tab-separated, one header line such
    as ``user_id:token	item_id:token	rating:float	timestamp:float``). Lines
    separated by ``::`` (MovieLens 1M's ``ratings.dat``, the bundled sample) also work.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    users : ndarray of shape (n_ratings,), int64
    items : ndarray of shape (n_ratings,), int64
    ratings : ndarray of shape (n_ratings,), float64

    Raises
    ------
    ValueError
        When a line does not hold at least user, item and rating, or a user or item
        id is not an integer.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    delimiter = "::" if "::" in first else "\t"
    fields = first.rstrip("\r\n").split(delimiter)
    if len(fields) < 3:
        raise ValueError(
            f"{path}: expected at least 3 {delimiter!r}-separated fields (user, item, "
            f"rating), got {len(fields)} in the first line {first.rstrip()!r}")
    try:
        float(fields[0]), float(fields[1]), float(fields[2])
        skip = 0
    except ValueError:
        skip = 1  # a header line (RecBole's .inter)
    return _read(path, delimiter, skip)
