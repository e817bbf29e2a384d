"""Type stub for the compiled module ``sparsembed._kernels._mf``.

``floating`` arrays are float32 or float64 (one dtype per call), ``index_t``
arrays int32 or int64.
"""

import numpy as np
from numpy.typing import NDArray

_Floating = NDArray[np.float32] | NDArray[np.float64]
_Index = NDArray[np.int32] | NDArray[np.int64]

def sgd_epoch(
    users: _Index, items: _Index, ratings: _Floating, starts: NDArray[np.int64],
    P: _Floating, Q: _Floating, bu: _Floating, bi: _Floating, mu: float, lr: float,
    reg: float, biased: bool, sse: NDArray[np.float64], n_threads: int,
) -> None:
    """One epoch of SGD; block ``s * B + t`` holds stratum ``s``, user block ``t``."""
