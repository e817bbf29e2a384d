"""Type stub for the compiled module ``sparsembed._kernels._openmp_helpers``."""

def openmp_enabled() -> bool:
    """True when the kernels were compiled with OpenMP."""

def openmp_max_threads() -> int:
    """``omp_get_max_threads()``: respects ``OMP_NUM_THREADS``; 1 without OpenMP."""
