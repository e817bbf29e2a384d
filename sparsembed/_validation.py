"""Checks at the Python boundary, with messages that name the bad value.

Everything here runs before any kernel writes, so a failed call leaves every
array as it was.
"""

import math
import numbers
import operator

import numpy as np

from sparsembed import _half
from sparsembed._kernels import _lookup
from sparsembed._threads import threads_for


# the index dtypes the kernels take as they are; a set of dtypes, not of scalar
# types: a lookup of a tiny batch spent ~0.2 us comparing against (np.int32, np.int64)
_INDEX_DTYPES = frozenset((np.dtype(np.int32), np.dtype(np.int64)))


def as_index_array(input, name="input", num_rows=None):
    """Return ``input`` as a C-contiguous int32 or int64 ndarray (same shape).

    int32 and int64 pass through (copied only when not C-contiguous); other integer
    dtypes are converted once. An empty Python list or tuple counts as int64.
    bool, floating, complex and object arrays raise TypeError; an id past int64
    raises IndexError (naming the valid range when ``num_rows``, the table's rows,
    is given).
    """
    if isinstance(input, (list, tuple)) and len(input) == 0:
        return np.zeros(0, dtype=np.int64)
    arr = np.asarray(input)
    # np.asarray(order="C"), not np.ascontiguousarray: 0-d input stays 0-d
    if arr.dtype in _INDEX_DTYPES:
        return np.asarray(arr, order="C")
    if arr.dtype.kind == "f" and isinstance(input, (list, tuple)):
        arr = ints_past_float(input, arr)
    found = past_int64(arr)
    if found is not None:
        raise past_int64_error(name, found[1], found[0], num_rows)
    kind = arr.dtype.kind
    if kind not in "iu":
        raise TypeError(
            f"{name} must be an array of integers, got dtype {arr.dtype}"
            + (" (bool is not an index type)" if kind == "b" else "")
        )
    return np.asarray(arr, dtype=np.int64, order="C")


def ints_past_float(seq, converted):
    """The list or tuple ``seq`` as an object array where it holds Python ints only,
    which numpy made float64 (``converted``: it does so where ints below and at or
    above 2**63 mix); else ``converted``."""
    objects = np.asarray(seq, dtype=object)
    if all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
           for v in objects.reshape(-1)):
        return objects
    return converted


def past_int64_error(name, value, pos, num_rows=None):
    """The IndexError for an id outside int64 (out of range for any table)."""
    if num_rows is not None:
        return IndexError(_out_of_range(name, value, pos, num_rows))
    return IndexError(f"{name}: index {value} at position {pos} is out of range (ids are "
                      f"int64: no table has a row {value})")


def past_int64(arr):
    """``(flat position, value)`` of the first entry of the ndarray ``arr`` outside
    int64, or None: a uint64 above it (in any byte order: a big-endian uint64 is not
    equal to np.uint64's dtype), or a Python int of an object array (numpy's array
    of ints past int64) beyond either end."""
    kind = arr.dtype.kind
    if kind == "O":
        lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
        for pos, value in enumerate(arr.reshape(-1)):
            if isinstance(value, numbers.Integral) and not isinstance(value, bool) \
                    and not lo <= value <= hi:
                return pos, int(value)
        return None
    if (kind != "u" or arr.dtype.itemsize < 8 or arr.size == 0
            or arr.max() <= np.iinfo(np.int64).max):
        return None
    flat = arr.reshape(-1)
    pos = int(np.argmax(flat > np.iinfo(np.int64).max))
    return pos, int(flat[pos])


def check_index_range(flat, num_embeddings, name="input"):
    """Raise IndexError naming the first id of ``flat`` outside ``[0, num_embeddings)``."""
    # the kernel scans fewer than 2**19 ids on one thread anyway
    pos = _lookup.first_out_of_range(flat, num_embeddings, threads_for(flat.shape[0], 1 << 18))
    if pos >= 0:
        raise index_error(flat, pos, num_embeddings, name)


def index_error(flat, pos, num_embeddings, name="input"):
    """The IndexError for the out-of-range id ``flat[pos]``."""
    return IndexError(_out_of_range(name, int(flat[pos]), pos, num_embeddings))


def _out_of_range(name, value, pos, num_embeddings):
    return (f"{name}: index {value} at position {pos} is out of range for "
            f"{num_embeddings} embeddings (valid: 0..{num_embeddings - 1})")


def check_size(value, name):
    """A non-negative int (numpy ints accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")
    return value


def check_positive_size(value, name):
    """An int >= 1 (numpy ints accepted)."""
    value = check_size(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def normalize_padding_idx(padding_idx, num_embeddings):
    """torch's rule: ``padding_idx`` in ``[-n, n)``; negative values count from the end."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral):
        raise ValueError(f"padding_idx must be an int or None, got {padding_idx!r}")
    padding_idx = int(padding_idx)
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"padding_idx {padding_idx} must be within [-{num_embeddings}, {num_embeddings})"
        )
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def check_max_norm(max_norm, norm_type):
    """``max_norm`` None or > 0 (torch silently zeroes or flips rows otherwise)."""
    # every lookup asks: the usual (None, a float) answered without the numbers ABC
    # and np.isnan (0.8 of a 5 us lookup of a few ids)
    if max_norm is None and type(norm_type) is float and not math.isnan(norm_type):
        return None, norm_type
    if not isinstance(norm_type, numbers.Real) or isinstance(norm_type, bool) or np.isnan(norm_type):
        raise ValueError(f"norm_type must be a real number, got {norm_type!r}")
    if max_norm is not None:
        if not isinstance(max_norm, numbers.Real) or isinstance(max_norm, bool):
            raise ValueError(f"max_norm must be a positive number or None, got {max_norm!r}")
        if not max_norm > 0 or np.isnan(max_norm):
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
    return _as_given(max_norm), _as_given(norm_type)


def _as_given(number):
    """A checked option as the user gave it when it is a Python int or float (as torch
    keeps it: ``max_norm=1`` reads back and prints as 1), else as a float (a numpy
    scalar would not go into a checkpoint's JSON)."""
    return number if number is None or type(number) in (int, float) else float(number)


def check_weight(weight, name="weight"):
    """A 2-D float32/float64 (or float16 storage) ndarray (C-contiguity is the caller's
    business)."""
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_embeddings, embedding_dim), got shape {weight.shape}")
    if weight.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {weight.dtype}")
    return weight


def check_writable(weight, name="weight"):
    if not weight.flags.writeable:
        raise ValueError(f"{name} is read-only, but max_norm renormalises it in place")


def as_grad_output(grad_output, expected_shape, dtype):
    """``grad_output`` as a C-contiguous array of ``dtype`` with the expected shape."""
    g = np.asarray(grad_output)
    if g.dtype.kind not in "fiu":
        raise TypeError(f"grad_output must be a real array, got dtype {g.dtype}")
    if g.shape != tuple(expected_shape):
        raise ValueError(
            f"grad_output has shape {g.shape}, expected {tuple(expected_shape)} "
            "(the shape of the forward's output)"
        )
    if g.dtype == np.float16 and np.dtype(dtype) == np.float32:
        return _half.to_float(g)  # a float16 forward's gradient, converted on every thread
    return np.asarray(g, dtype=dtype, order="C")
