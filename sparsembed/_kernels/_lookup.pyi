"""Type stub for the compiled module ``sparsembed._kernels._lookup``.

Fused types: ``floating`` arrays are float32 or float64 (one dtype per call),
``index_t`` arrays int32 or int64. Every array is C-contiguous; outputs are
allocated by the caller.
"""

import numpy as np
from numpy.typing import NDArray

_Floating = NDArray[np.float32] | NDArray[np.float64]
_Index = NDArray[np.int32] | NDArray[np.int64]

def set_last_level_cache_bytes(nbytes: int) -> int:
    """For tests: take the last-level cache to be ``nbytes`` (0: read it again) in
    this module's kernels; returns the size now in use."""

def first_out_of_range(idx: _Index, upper: int, n_threads: int) -> int:
    """Position of the first entry outside ``[0, upper)``, or -1 when all are valid."""

def check_row_ids(rows: NDArray[np.int64], num_rows: int) -> None:
    """ValueError naming the first row id outside ``[0, num_rows)``."""

def scatter_rows(src: _Floating, rows: NDArray[np.int64], out: _Floating,
                 n_threads: int) -> None:
    """``out[rows[u]] = src[u]`` for distinct rows (ValueError, before any write, for a
    row outside ``out``)."""

def rows_apart(weight: NDArray[np.generic]) -> bool:
    """Whether a 2-D array's rows are each contiguous and do not overlap (what
    :func:`gather` reads)."""

def gather(
    weight: _Floating, idx: _Index, out: _Floating, n_threads: int, stream: bool = False,
    ids_out: _Index | None = None,
) -> int:
    """``out[i, :] = weight[idx[i], :]`` (``stream``: non-temporal stores; ``ids_out``:
    also a copy of ``idx``); returns -1 or the position of the first id out of range.
    ``weight``'s rows must be contiguous and not overlap (a column slice will do);
    ValueError otherwise."""

def renorm_rows(
    weight: _Floating,
    rows: NDArray[np.int64],
    max_norm: float,
    norm_type: float,
    n_threads: int,
) -> None:
    """torch's ``embedding_renorm_`` on distinct rows, in place."""
