"""The sum pooling of ``_simd_pool.h``, compiled once for every module that uses it.

The pooling's C body is built for three SIMD levels, four (dtype, index dtype)
pairs and the common row widths as constants: about 3.5 MB of code and most of the
package's build time. ``_bag`` (bag sums), ``_backward`` (row sums) and ``_optim``
(the fused updates' row sums) each compiled their own copy; they now take the
function pointers from here (``pool_table_at``, a cimport: Cython passes it between
the modules at import), so the body is compiled once: the baseline and AVX2 levels
in this module, AVX-512F in ``_sum_pooling_avx512``, so that two compilers build
them side by side. The SIMD level in use stays each module's own (``simd_level`` /
``set_simd_level`` there), passed as ``level``.
"""

from sparsembed._kernels._simd cimport pool_table
from sparsembed._kernels._sum_pooling_avx512 cimport avx512_table

from sparsembed._kernels import _sum_pooling_avx512

cdef extern from "_simd_pool_bodies.h":
    pool_table below_avx512_table "sparsembed_pool_table_below_avx512"(int level) noexcept nogil
    int SE_X86_DISPATCH
    int SE_LEVEL_AVX512


cdef pool_table pool_table_at(int level) noexcept nogil:
    if SE_X86_DISPATCH and level >= SE_LEVEL_AVX512:
        return avx512_table()
    return below_avx512_table(level)


def compiled_levels():
    """The SIMD levels this build holds a sum pooling for: ``(0, 1, 2)`` (baseline,
    AVX2, AVX-512F) where x86 dispatch is compiled in, else ``(0,)``."""
    if SE_X86_DISPATCH:
        return (0, 1) + _sum_pooling_avx512.compiled_levels()
    return (0,)
