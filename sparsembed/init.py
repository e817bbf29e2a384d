"""Initializers (torch.nn.init's names), filling an array in place and returning it.

Every function takes ``random_state``: None, an int seed, a
``numpy.random.Generator`` or a ``numpy.random.RandomState``. Values are drawn in
float64 and cast to the array's dtype, a block of rows at a time: filling a table
takes about its own memory, not the float64 draws of all of it at once (4 x a
float32 table with the cast), with the same values as one draw of the whole.
"""

import math

import numpy as np
from scipy import special

__all__ = ["normal_", "uniform_", "zeros_", "xavier_uniform_", "xavier_normal_",
           "trunc_normal_"]


def _rng(random_state):
    if isinstance(random_state, (np.random.Generator, np.random.RandomState)):
        return random_state
    return np.random.default_rng(random_state)


# float64 draws per block (8 MiB): the generators draw element after element, so
# blocks of rows give the same values as one draw of the whole array
BLOCK_DRAWS = 1 << 20


def _uniform(rng, low, high):
    return lambda shape: rng.uniform(low, high, size=shape)


def _normal(rng, mean, std):
    return lambda shape: rng.normal(mean, std, size=shape)


def fill_drawn(array, draw):
    """Fill ``array`` (numpy or CuPy) in place with ``draw(shape)`` (float64 values of
    ``shape``), drawn and cast a block of rows at a time; returns ``array``."""
    shape = array.shape
    if array.ndim == 0 or array.size <= BLOCK_DRAWS:
        return _fill(array, draw(shape))
    step = max(BLOCK_DRAWS // (array.size // shape[0]), 1)
    for lo in range(0, shape[0], step):
        hi = min(lo + step, shape[0])
        _fill(array[lo:hi], draw((hi - lo,) + shape[1:]))
    return array


def _check_float(array, name):
    """TypeError for an array that cannot hold the draws (torch: not implemented for
    integer tensors); numpy would truncate them silently."""
    dtype = getattr(array, "dtype", None)
    if dtype is None or np.dtype(dtype).kind != "f":
        raise TypeError(f"{name} fills floating-point arrays, got "
                        f"{'dtype ' + str(dtype) if dtype is not None else type(array).__name__}")


def _fill(array, values):
    if hasattr(array, "__cuda_array_interface__"):
        import cupy

        array[...] = cupy.asarray(values, dtype=array.dtype)
    else:
        array[...] = values
    return array


def _fans(array):
    if array.ndim < 2:
        raise ValueError(
            f"fan in and fan out need an array with at least 2 dimensions, got shape {array.shape}"
        )
    receptive = int(np.prod(array.shape[2:])) if array.ndim > 2 else 1
    return array.shape[1] * receptive, array.shape[0] * receptive


def normal_(array, mean=0.0, std=1.0, random_state=None):
    """Fill ``array`` with N(mean, std**2) draws.

    Parameters
    ----------
    array : ndarray (numpy or CuPy) of float dtype
        Filled in place.
    mean : float, default 0.0
    std : float, default 1.0
        >= 0.
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState

    Returns
    -------
    ``array``
    """
    _check_float(array, "normal_")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    return fill_drawn(array, _normal(_rng(random_state), mean, std))


def uniform_(array, a=0.0, b=1.0, random_state=None):
    """Fill ``array`` with U(a, b) draws.

    Parameters
    ----------
    array : ndarray (numpy or CuPy) of float dtype
        Filled in place.
    a, b : float, default 0.0 and 1.0
        a <= b.
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState

    Returns
    -------
    ``array``
    """
    _check_float(array, "uniform_")
    if b < a:
        raise ValueError(f"uniform_ needs a <= b, got a={a}, b={b}")
    return fill_drawn(array, _uniform(_rng(random_state), a, b))


def zeros_(array):
    """Fill ``array`` (numpy or CuPy) with zeros in place; returns it."""
    array[...] = 0
    return array


def xavier_uniform_(array, gain=1.0, random_state=None):
    """Glorot uniform: U(-a, a) with ``a = gain * sqrt(6 / (fan_in + fan_out))``.

    For a (num_embeddings, dim) table fan_in = dim and fan_out = num_embeddings
    (torch's convention for 2-D tensors).

    Parameters
    ----------
    array : ndarray (numpy or CuPy) of float dtype
        Filled in place.
    gain : float, default 1.0
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState

    Returns
    -------
    ``array``
    """
    _check_float(array, "xavier_uniform_")
    fan_in, fan_out = _fans(array)
    bound = gain * math.sqrt(6.0 / max(fan_in + fan_out, 1))
    return fill_drawn(array, _uniform(_rng(random_state), -bound, bound))


def xavier_normal_(array, gain=1.0, random_state=None):
    """Glorot normal: N(0, std**2) with ``std = gain * sqrt(2 / (fan_in + fan_out))``
    (fans as in :func:`xavier_uniform_`).

    Parameters
    ----------
    array : ndarray (numpy or CuPy) of float dtype
        Filled in place.
    gain : float, default 1.0
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState

    Returns
    -------
    ``array``
    """
    _check_float(array, "xavier_normal_")
    fan_in, fan_out = _fans(array)
    std = gain * math.sqrt(2.0 / max(fan_in + fan_out, 1))
    return fill_drawn(array, _normal(_rng(random_state), 0.0, std))


def trunc_normal_(array, mean=0.0, std=1.0, a=-2.0, b=2.0, random_state=None):
    """N(mean, std**2) truncated to ``[a, b]`` (absolute bounds, as torch's).

    Drawn by inverting the normal CDF on a uniform sample of ``[cdf(a), cdf(b)]``,
    the method torch uses.

    Parameters
    ----------
    array : ndarray (numpy or CuPy) of float dtype
        Filled in place.
    mean : float, default 0.0
    std : float, default 1.0
        > 0.
    a, b : float, default -2.0 and 2.0
        a < b.
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState

    Returns
    -------
    ``array``
    """
    _check_float(array, "trunc_normal_")
    if not a < b:
        raise ValueError(f"trunc_normal_ needs a < b, got a={a}, b={b}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    lo = special.ndtr((a - mean) / std)
    hi = special.ndtr((b - mean) / std)
    draw = _uniform(_rng(random_state), lo, hi)
    return fill_drawn(array, lambda shape: np.clip(mean + std * special.ndtri(draw(shape)), a, b))
