"""examples/train_mf.py at a tiny size, and the bundled sample it trains on."""

import os

import numpy as np
import pytest
from numpy.testing import assert_allclose

from sparsembed.datasets import load_sample_ratings

def test_load_sample_ratings():
    users, items, ratings = load_sample_ratings()
    assert users.dtype == np.int64 and items.dtype == np.int64 and ratings.dtype == np.float64
    assert users.shape == items.shape == ratings.shape == (1501,)
    assert (users.min(), users.max(), items.min(), items.max()) == (0, 29, 0, 99)
    assert set(np.unique(ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert (users[0], items[0], ratings[0]) == (0, 2, 3.0)  # the file's first line
    import sparsembed.datasets

    here = os.path.dirname(sparsembed.datasets.__file__)
    assert os.path.exists(os.path.join(here, "NOTICE_movielens.txt"))


@pytest.mark.parametrize("optimizer, lr", [("sparse_adam", 0.05), ("adagrad", 0.1)])
def test_train_mf_learns(optimizer, lr, load_example):
    train_mf = load_example("train_mf")
    hist = train_mf.main(epochs=8, optimizer=optimizer, lr=lr, verbose=False)
    base = hist["baseline_rmse"]
    # predicting the training mean gives ~1.06 here; a trainer that does not learn
    # (no update, wrong sign, wrong rows) stays at or above it
    assert hist["test_rmse"][-1] < 0.9 * base
    assert hist["train_rmse"][-1] < 0.8 * hist["train_rmse"][0]
    fused = train_mf.main(epochs=8, optimizer=optimizer, lr=lr, fused=True, verbose=False)
    assert_allclose(fused["test_rmse"], hist["test_rmse"], rtol=1e-4)
