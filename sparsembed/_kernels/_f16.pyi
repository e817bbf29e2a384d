"""Type stub for the compiled module ``sparsembed._kernels._f16``.

float16 tables are passed as their ``uint16`` bit patterns (``table.view(np.uint16)``);
conversions are exact to float32 and round to nearest even back to float16.
"""

import numpy as np
from numpy.typing import NDArray

def simd_level() -> int:
    """The SIMD level of the conversions: 0 portable C, 1 AVX2 + F16C, 2 AVX-512F."""

def set_simd_level(level: int) -> int:
    """Convert at ``level`` (capped at what the CPU supports); returns the level in use."""

def rows_to_float(table: NDArray[np.uint16], rows: NDArray[np.int64], out: NDArray[np.float32],
                  n_threads: int) -> None:
    """``out[u] = float32(table[rows[u]])`` (exact); ValueError for a row outside
    ``table`` or an ``out`` of another shape."""

def rows_from_float(work: NDArray[np.float32], rows: NDArray[np.int64], table: NDArray[np.uint16],
                    n_threads: int) -> None:
    """``table[rows[u]] = float16(work[u])``, rounded to nearest even; ValueError for
    a row outside ``table`` or ``work`` of another shape."""

def to_half(src: NDArray[np.float32], out: NDArray[np.uint16], n_threads: int) -> None:
    """``out = float16(src)``, rounded to nearest even; ValueError for shapes that
    differ."""

def to_float(src: NDArray[np.uint16], out: NDArray[np.float32], n_threads: int) -> None:
    """``out = float32(src)`` (exact), 1-D; ValueError for lengths that differ."""
