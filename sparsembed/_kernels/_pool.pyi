"""Type stub for the compiled module ``sparsembed._kernels._pool``: a small cache of
large output buffers, reused across calls (see the module docstring)."""

from typing import Any

import numpy as np
from numpy.typing import DTypeLike

MIN_BYTES: int

def default_limit(memory_bytes: int | None) -> int:
    """The idle bytes kept by default on a machine (or container) of ``memory_bytes``
    (None: unknown): an eighth of it, from 1 GiB to 4 GiB."""

def empty(shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray[Any, Any]:
    """``numpy.empty(shape, dtype)``, from the cache when it is large."""

def set_limit(limit_bytes: int) -> int:
    """Set the most bytes of idle buffers kept (0: no cache); returns the old limit."""

def clear() -> None:
    """Give every idle buffer back to the OS."""

def stats() -> dict[str, int]:
    """``{'idle_buffers', 'idle_bytes', 'limit'}``."""
