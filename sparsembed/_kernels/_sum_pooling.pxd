# The sum pooling kernels at a SIMD level (0 baseline, 1 AVX2, 2 AVX-512F, capped by
# the caller's pool_level()): compiled in _sum_pooling (AVX-512F in
# _sum_pooling_avx512) only, shared with _bag, _backward and _optim.
# ``from sparsembed._kernels._sum_pooling cimport pool_table_at``.

from sparsembed._kernels._simd cimport pool_table

cdef pool_table pool_table_at(int level) noexcept nogil
