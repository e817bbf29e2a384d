"""Type stub for the compiled module ``sparsembed._kernels._plan``.

``index_t`` arrays are int32 or int64; every array is C-contiguous; outputs are
allocated by the caller.
"""

import numpy as np
from numpy.typing import NDArray

_Index = NDArray[np.int32] | NDArray[np.int64]
_Floating = NDArray[np.float32] | NDArray[np.float64]

def set_last_level_cache_bytes(nbytes: int) -> int:
    """For tests: take the last-level cache to be ``nbytes`` (0: read it again) in
    this module's kernels; returns the size now in use."""

def argsort_rows(
    idx: _Index,
    skip_row: int,
    num_rows: int,
    keys_out: NDArray[np.int64],
    perm_out: NDArray[np.int64],
    n_threads: int,
) -> int:
    """Stable sort of the ids other than ``skip_row``; returns their number m."""

def segment_of_entries(
    perm: NDArray[np.int64], starts: NDArray[np.int64], out: NDArray[np.int64], n_threads: int,
) -> None:
    """``out[perm[k]] = u`` for every k of segment u (ValueError, before any write, for
    an entry outside ``out``)."""

def segments(
    sorted_keys: NDArray[np.int64],
    rows_out: NDArray[np.int64],
    starts_out: NDArray[np.int64],
) -> int:
    """Distinct ids of a sorted array and where each one's run starts; returns their number."""

def plan_scratch_size(n: int, num_rows: int, n_threads: int) -> int:
    """Entries of :func:`build_plan`'s ``scratch`` for ``n`` ids below ``num_rows``."""

def build_plan(
    idx: _Index,
    skip_row: int,
    num_rows: int,
    perm_out: NDArray[np.int64],
    rows_out: NDArray[np.int64],
    starts_out: NDArray[np.int64],
    n_threads: int,
    scratch: NDArray[np.uint64] | None = None,
) -> tuple[int, int]:
    """Stable sort of the ids other than ``skip_row`` (32-bit ids and positions) and
    its segments; returns ``(m, n_rows)``."""

def gather_and_plan(
    weight: _Floating,
    idx: _Index,
    out: _Floating,
    stream: bool,
    ids_out: _Index | None,
    skip_row: int,
    perm_out: NDArray[np.int64],
    rows_out: NDArray[np.int64],
    starts_out: NDArray[np.int64],
    scratch: NDArray[np.uint64],
    n_threads: int,
) -> tuple[int, int, int]:
    """The lookup ``out[i] = weight[idx[i]]`` with the plan of ``idx`` (as
    :func:`build_plan`'s) made by one thread of its team; returns ``(bad, m, n_rows)``,
    ``bad`` -1 or the position of the first id out of range."""
