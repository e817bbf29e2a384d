"""Type stub for the compiled module ``sparsembed._kernels._optim``.

``floating`` arrays are float32 or float64 (one dtype per call). Optional arrays
are passed as empty arrays when absent. ``c1, c2, c3`` carry each optimizer's
per-step constants (see ``sparsembed.optim``).
"""

import numpy as np
from numpy.typing import NDArray

_Floating = NDArray[np.float32] | NDArray[np.float64]
_I64 = NDArray[np.int64]

KIND_SGD: int
KIND_ADAGRAD: int
KIND_SPARSE_ADAM: int
KIND_ROWWISE_ADAGRAD: int

def simd_level() -> int:
    """The SIMD level the fused update's row sums run at (0 baseline, 1 AVX2, 2 AVX-512F)."""

def set_simd_level(level: int) -> int:
    """Run the fused update's row sums at ``level`` (capped); returns the level in use."""

def set_last_level_cache_bytes(nbytes: int) -> int:
    """For tests: take the last-level cache to be ``nbytes`` (0: read it again) in
    this module's kernels; returns the size now in use."""

def update_rows(
    kind: int, lr: float, momentum: float, weight_decay: float, eps: float,
    c1: float, c2: float, c3: float, weight: _Floating, rows: _I64, all_rows: bool,
    values: _Floating, s1: _Floating, s2: _Floating, n_threads: int,
) -> None:
    """Apply one optimizer update to the rows of a built gradient."""

def fused_update(
    kind: int, lr: float, momentum: float, weight_decay: float, eps: float,
    c1: float, c2: float, c3: float, weight: _Floating, grad: _Floating, perm: _I64,
    rows: _I64, starts: _I64, src: _I64, scale: _Floating, won: NDArray[np.uint64],
    scale_by_count: bool, s1: _Floating, s2: _Floating, n_threads: int,
    row_cost: int = 4, weights: _Floating | None = None,
) -> None:
    """Sum each planned row's gradient into a thread-local buffer, then update it
    (``weights``: one factor per plan entry, without src and scale)."""
