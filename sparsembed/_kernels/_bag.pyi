"""Type stub for the compiled module ``sparsembed._kernels._bag``.

``floating`` arrays are float32 or float64 (one dtype per call), ``index_t`` arrays
int32 or int64. Every array is C-contiguous; outputs are allocated by the caller.
Optional arrays are passed as empty arrays ((0,) or (0, 0)) when absent.
"""

import numpy as np
from numpy.typing import NDArray

_Floating = NDArray[np.float32] | NDArray[np.float64]
_Index = NDArray[np.int32] | NDArray[np.int64]
_I64 = NDArray[np.int64]
_U64 = NDArray[np.uint64]

def far_line_prefetch(idx: _Index, table_bytes: int, row_bytes: int) -> bool:
    """Whether the sum pooling of the ids ``idx`` from a table of ``table_bytes`` in
    rows of ``row_bytes`` prefetches each row's first line far ahead too (for tests)."""

def bag_forward(
    weight: _Floating, idx: _Index, starts: _I64, pad: int, mode: int, psw: _Floating,
    out: _Floating, argmax: _I64, counts: _I64, n_threads: int, stream: bool = False,
) -> int:
    """Pool each bag's rows: sum (optionally weighted), mean or element-wise max
    (``stream``: sum/mean written with non-temporal stores).

    Returns the number of bags holding an out-of-range id (``counts[b] = -(e + 1)``
    for such a bag, ``e`` its first bad entry)."""

def last_level_cache_bytes() -> int:
    """The last-level cache size the pooling's prefetch distance is chosen by (sysfs's
    largest cache of cpu0 on Linux, else 32 MiB)."""

def pool_rows_ahead(row_bytes: int, table_bytes: int) -> int:
    """Entries ahead the pooling prefetches: 8 KiB of rows (8 to 32) for a table that
    fits in half the last-level cache, or any table on an Intel CPU, else 32 KiB (8 to
    64)."""

def set_last_level_cache_bytes(nbytes: int) -> int:
    """For tests: take the last-level cache to be ``nbytes`` (0: read it again) in
    this module's kernels; returns the size now in use."""

def simd_level() -> int:
    """The highest SIMD level the pooling runs at: 0 baseline, 1 AVX2, 2 AVX-512F (rows
    narrower than its vectors pool at a lower one)."""

def set_simd_level(level: int) -> int:
    """Run the sum/mean pooling at ``level`` (capped at what the CPU supports)."""

def half_bag_forward(
    weight: NDArray[np.uint16], idx: _Index, starts: _I64, pad: int, mean: bool,
    psw: NDArray[np.float32], out: NDArray[np.uint16], counts: _I64, n_threads: int,
) -> int:
    """Sum or mean pooling of a float16 table (its bits) in float32, rounded once to
    float16 into ``out`` (bits); returns the number of bags holding an out-of-range
    id (``counts[b] = -(e + 1)``)."""

def offsets_to_starts(offsets: _Index, starts: _I64) -> int:
    """``starts[:len(offsets)] = offsets``; returns the first position where offsets
    decrease, or -1."""

def bag_counts(idx: _Index, starts: _I64, pad: int, counts: _I64, n_threads: int) -> None:
    """Number of non-padding entries of each bag."""

def fill_entry_bag(starts: _I64, entry_bag: _I64, n_threads: int) -> None:
    """``entry_bag[e] = b`` for every entry ``e`` of bag ``b``."""

def per_sample_weights_grad(
    grad: _Floating, weight: _Floating, idx: _Index, entry_bag: _I64, pad: int,
    out: _Floating, n_threads: int,
) -> None:
    """``out[e] = dot(grad[entry_bag[e]], weight[idx[e]])`` (0 for padding entries)."""

def entry_grad_rows(
    perm: _I64, entry_bag: _I64, scale: _Floating, bag_of: _I64, scale_of: _Floating,
    n_threads: int,
) -> None:
    """``bag_of[k] = entry_bag[perm[k]]`` and ``scale_of[k] = scale[perm[k]]`` (scale
    and scale_of (0,) without scale): the plan in grad_output's rows."""

def won_masks(argmax: _I64, entry_bag: _I64, won: _U64, n_threads: int) -> None:
    """Max mode's winners by entry: bit ``j % 64`` of ``won[e, j // 64]`` is set when
    ``argmax[entry_bag[e], j] == e``; ``won`` has shape (n, (dim + 63) // 64)."""

def bag_dense_backward(
    grad: _Floating, perm: _I64, rows: _I64, starts: _I64, entry_bag: _I64,
    scale: _Floating, won: _U64, scale_by_count: bool, out: _Floating, n_threads: int,
    stream: bool = False,
) -> None:
    """``out[rows[u]] = bag_row_sum(segment u)`` for every planned row, zeros in every
    other row (``out`` need not be zeroed; ``stream``: non-temporal stores)."""

def bag_max_dense_backward(
    grad: _Floating, argmax: _I64, flat: _Index, out: _Floating, n_threads: int,
    stream: bool = False,
) -> int:
    """Max mode's dense gradient from the winners: ``out[flat[argmax[b, c]], c] +=
    grad[b, c]`` in bag order, zeros elsewhere (no plan; same bits as
    :func:`bag_dense_backward`); returns the number of winners outside ``flat`` or
    ``out`` (skipped)."""

def bag_row_sums(
    grad: _Floating, perm: _I64, starts: _I64, entry_bag: _I64, scale: _Floating,
    won: _U64, scale_by_count: bool, out: _Floating, n_threads: int,
) -> None:
    """``out[u] = bag_row_sum(segment u)``: the row-sparse gradient's values."""
