# The sum pooling kernels at the AVX-512F level (compiled in _sum_pooling_avx512
# only; an empty table without x86 dispatch). Only _sum_pooling.pool_table_at asks.

from sparsembed._kernels._simd cimport pool_table

cdef pool_table avx512_table() noexcept nogil
