"""Type stub for the compiled module ``sparsembed._kernels._sum_pooling_avx512``."""

def compiled_levels() -> tuple[int, ...]:
    """The SIMD levels whose sum pooling this module holds: (2,) with x86 dispatch,
    else ()."""
