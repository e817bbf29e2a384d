"""Python view of the OpenMP runtime the kernels were compiled with."""


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(SPARSEMBED_OPENMP_ENABLED)


def openmp_max_threads():
    """``omp_get_max_threads()``: respects ``OMP_NUM_THREADS``; 1 without OpenMP."""
    return int(omp_get_max_threads())
