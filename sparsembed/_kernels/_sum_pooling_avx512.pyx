"""The AVX-512F bodies of the sum pooling (``_simd_pool.h``), for ``_sum_pooling``.

A module of their own so that the build compiles them while another compiler
builds the baseline and AVX2 ones in ``_sum_pooling`` (``_simd_pool_bodies.h``:
the compile times). Nothing calls this table but ``_sum_pooling.pool_table_at``,
which hands it out for level 2.
"""

from sparsembed._kernels._simd cimport pool_table

cdef extern from "_simd_pool_bodies_avx512.h":
    pool_table compiled_table "sparsembed_pool_table_avx512"() noexcept nogil
    int SE_X86_DISPATCH


cdef pool_table avx512_table() noexcept nogil:
    return compiled_table()


def compiled_levels():
    """The SIMD levels whose sum pooling this module holds: ``(2,)`` (AVX-512F) where
    x86 dispatch is compiled in, else ``()``."""
    if SE_X86_DISPATCH:
        return (2,)
    return ()
