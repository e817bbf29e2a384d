"""Type stub for the compiled module ``sparsembed._kernels._backward``.

Fused types: ``floating`` arrays are float32 or float64 (one dtype per call),
``index_t`` arrays int32 or int64. Every array is C-contiguous; outputs are
allocated by the caller.
"""

import numpy as np
from numpy.typing import NDArray

_Floating = NDArray[np.float32] | NDArray[np.float64]
_Index = NDArray[np.int32] | NDArray[np.int64]

def simd_level() -> int:
    """The SIMD level the row sums run at (0 baseline, 1 AVX2, 2 AVX-512F)."""

def set_simd_level(level: int) -> int:
    """Run the row sums at ``level`` (capped); returns the level in use."""

def set_last_level_cache_bytes(nbytes: int) -> int:
    """For tests: take the last-level cache to be ``nbytes`` (0: read it again) in
    this module's kernels; returns the size now in use."""

def dense_backward(
    grad: _Floating,
    perm: NDArray[np.int64],
    rows: NDArray[np.int64],
    starts: NDArray[np.int64],
    scale_by_count: bool,
    out: _Floating,
    n_threads: int,
) -> None:
    """``out[rows[u]] = sum(grad[perm[starts[u]:starts[u+1]]])`` (/ count)."""

def dense_backward_fill(
    grad: _Floating,
    perm: NDArray[np.int64],
    rows: NDArray[np.int64],
    starts: NDArray[np.int64],
    scale_by_count: bool,
    out: _Floating,
    n_threads: int,
    stream: bool = False,
    weights: _Floating | None = None,
) -> None:
    """:func:`dense_backward` into an uninitialised ``out``: the rows no id touches
    are zeroed in the same pass (``stream``: non-temporal stores; ``weights``: one
    factor per plan entry, its grad row multiplied by it)."""

def dense_backward_scatter(
    grad: _Floating,
    idx: _Index,
    skip_row: int,
    out: _Floating,
    n_threads: int,
) -> int:
    """The dense gradient of the ids ``idx`` (``skip_row``'s row left at zero) without a
    row plan, into an uninitialised, line-aligned ``out`` of whole-line rows: the
    planned kernels' bits. -1, or the first position whose id is out of range."""

def add_dense(
    a: _Floating,
    b: _Floating,
    out: _Floating,
    n_threads: int,
    stream: bool = False,
) -> None:
    """``out = a + b`` (flat arrays), one addition per element, on ``n_threads``
    threads; ``stream``: non-temporal stores."""

def zero_fill(out: _Floating, n_threads: int, stream: bool = False) -> None:
    """``out[:] = 0`` (a flat array) on ``n_threads`` threads; ``stream``:
    non-temporal stores."""

def row_sums(
    grad: _Floating,
    perm: NDArray[np.int64],
    starts: NDArray[np.int64],
    scale_by_count: bool,
    out: _Floating,
    n_threads: int,
    stream: bool = False,
    weights: _Floating | None = None,
) -> None:
    """``out[u] = sum(grad[perm[starts[u]:starts[u+1]]])`` (/ count); ``stream``:
    non-temporal stores; ``weights``: as for :func:`dense_backward_fill`."""

def fill_row_csr(
    rows: NDArray[np.int64],
    num_rows: int,
    indptr: _Index,
    indices: _Index,
    dim: int,
    n_threads: int,
    stream: bool = False,
) -> None:
    """CSR structure of a matrix whose non-empty rows are ``rows``, each full
    (``stream``: the indices with non-temporal stores; an empty ``indices``: the row
    pointer only)."""

def sparse_row_grad(
    grad: _Floating,
    perm: NDArray[np.int64],
    starts: NDArray[np.int64],
    rows: NDArray[np.int64],
    scale_by_count: bool,
    out: _Floating,
    num_rows: int,
    indptr: _Index,
    indices: _Index,
    n_threads: int,
    stream_sums: bool = False,
    stream_indices: bool = False,
    weights: _Floating | None = None,
) -> None:
    """:func:`row_sums` into ``out`` and :func:`fill_row_csr` into ``indptr`` /
    ``indices`` (unless empty) in one parallel region."""

def rows_hold_all(indptr: _Index, rows: NDArray[np.int64]) -> bool:
    """Whether ``indptr`` starts at 0 and gives each of ``rows`` at least one entry,
    their lengths adding up to ``indptr[-1]``; False for a row outside it."""

def merge_rows(
    rows_a: NDArray[np.int64],
    rows_b: NDArray[np.int64],
    rows: NDArray[np.int64],
    from_a: NDArray[np.int64],
    from_b: NDArray[np.int64],
) -> int:
    """Union of two sorted distinct row lists into ``rows[:n]`` with each row's
    position in ``rows_a`` / ``rows_b`` (or -1); returns n. Outputs hold at least
    ``len(rows_a) + len(rows_b)`` entries (ValueError otherwise, nothing written)."""

def add_merged_rows(
    values_a: _Floating,
    values_b: _Floating,
    from_a: NDArray[np.int64],
    from_b: NDArray[np.int64],
    out: _Floating,
    n_threads: int,
    stream: bool = False,
) -> None:
    """``out[i] = values_a[from_a[i]] + values_b[from_b[i]]``, a missing (-1) term
    left out (``stream``: written with non-temporal stores)."""
