"""Type stub for the compiled module ``sparsembed._kernels._sum_pooling``."""

def compiled_levels() -> tuple[int, ...]:
    """The SIMD levels this build holds a sum pooling for: (0, 1, 2) with x86
    dispatch, else (0,)."""
