import numpy as np
import pytest

import sparsembed as se


@pytest.fixture
def threads():
    """Run a body with a given thread count; restores the default afterwards."""
    previous = se._threads._num_threads

    def set_(n):
        se.set_num_threads(n)

    yield set_
    se._threads._num_threads = previous


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
