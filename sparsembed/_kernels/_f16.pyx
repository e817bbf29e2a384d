"""float16 <-> float32 row conversions for float16 tables (``sparsembed._half``).

A float16 table reaches these kernels as its ``uint16`` view (``weight.view(np.uint16)``):
Cython has no half type, and the conversions are done on the bits: float16 -> float32
is exact; float32 -> float16 rounds to nearest, ties to even, with overflow to +-inf,
gradual underflow to subnormals and NaN kept NaN, bit for bit what numpy's
``astype(np.float16)`` gives (numpy's ``npy_floatbits_to_halfbits``). The portable C
of ``_half.h`` does it one value at a time; where the CPU has F16C or AVX-512F, the
row conversions of ``_simd_half.h`` do 8 or 16 at once with the same bits (picked at
run time, capped by SPARSEMBED_SIMD like the pooling: see ``simd_level``).

Rows are distinct and each is converted by one thread: race-free, and the result
does not depend on the number of threads.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint16_t

from sparsembed._kernels._memory cimport prefetch_distance, prefetch_row

from sparsembed._kernels._lookup import check_row_ids

cdef extern from "_simd_half.h":
    ctypedef void (*to_float_t)(const uint16_t*, float*, int64_t) noexcept nogil
    ctypedef void (*to_half_t)(const float*, uint16_t*, int64_t) noexcept nogil
    ctypedef struct rows_table "se_half_rows_table":
        to_float_t to_float
        to_half_t to_half
    rows_table rows_table_at "sparsembed_half_rows_table"(int level) noexcept nogil
    int pool_level "sparsembed_pool_level"() noexcept nogil
    int pool_set_level "sparsembed_pool_set_level"(int level) noexcept nogil


def simd_level():
    """The SIMD level of the conversions: 0 portable C, 1 AVX2 + F16C, 2 AVX-512F."""
    return pool_level()


def set_simd_level(int level):
    """Convert at ``level`` (capped at what the CPU supports); returns the level now
    in use. For tests: every level gives the same bits."""
    return pool_set_level(level)


cdef _check_rows(const int64_t[::1] rows, int64_t num_rows, int64_t n_floats,
                 int64_t float_width, int64_t dim):
    """ValueError, before any write, unless the float32 rows are (len(rows), dim) and
    every row id is in [0, num_rows): O(U), next to the O(U x dim) conversion."""
    if n_floats != rows.shape[0] or float_width != dim:
        raise ValueError(f"the float32 rows must be ({rows.shape[0]}, {dim}), got "
                         f"({n_floats}, {float_width})")
    check_row_ids(rows, num_rows)


def rows_to_float(
    const uint16_t[:, ::1] table,   # IN (num_embeddings, dim) float16 bits
    const int64_t[::1] rows,        # IN (U,) row ids, checked here
    float[:, ::1] out,              # OUT (U, dim)
    int n_threads,
):
    """``out[u] = float32(table[rows[u]])`` (exact); the rows, read at random, are
    prefetched a few ahead. ValueError, before any write, for a row outside
    ``table`` or an ``out`` of another shape."""
    cdef int64_t n = rows.shape[0]
    cdef int64_t dim = table.shape[1]
    cdef int64_t u, t, u_lo, u_hi
    cdef int64_t T = max(1, min(n_threads, n))
    cdef size_t row_bytes = dim * sizeof(uint16_t)
    cdef int64_t ahead = prefetch_distance(row_bytes)
    cdef rows_table fns = rows_table_at(pool_level())
    _check_rows(rows, table.shape[0], out.shape[0], out.shape[1], dim)
    if n == 0 or dim == 0:
        return
    with nogil:
        for t in prange(T, schedule="static", num_threads=T):
            u_lo = n * t // T
            u_hi = n * (t + 1) // T
            for u in range(u_lo, u_hi):
                if u + ahead < u_hi:
                    prefetch_row(&table[rows[u + ahead], 0], row_bytes)
                fns.to_float(&table[rows[u], 0], &out[u, 0], dim)


def rows_from_float(
    const float[:, ::1] work,       # IN (U, dim)
    const int64_t[::1] rows,        # IN (U,) distinct row ids, checked here
    uint16_t[:, ::1] table,         # INOUT (num_embeddings, dim) float16 bits
    int n_threads,
):
    """``table[rows[u]] = float16(work[u])``, rounded to nearest even. ValueError,
    before any write, for a row outside ``table`` or ``work`` of another shape."""
    cdef int64_t n = rows.shape[0]
    cdef int64_t dim = table.shape[1]
    cdef int64_t u
    cdef rows_table fns = rows_table_at(pool_level())
    _check_rows(rows, table.shape[0], work.shape[0], work.shape[1], dim)
    if n == 0 or dim == 0:
        return
    with nogil:
        for u in prange(n, schedule="static", num_threads=n_threads):
            fns.to_half(&work[u, 0], &table[rows[u], 0], dim)


def to_half(
    const float[:, ::1] src,        # IN (n, dim)
    uint16_t[:, ::1] out,           # OUT (n, dim) float16 bits
    int n_threads,
):
    """``out = float16(src)``, rounded to nearest even (ValueError for shapes that
    differ)."""
    cdef int64_t n = src.shape[0]
    cdef int64_t dim = src.shape[1]
    cdef int64_t i
    cdef rows_table fns = rows_table_at(pool_level())
    if out.shape[0] != n or out.shape[1] != dim:
        raise ValueError(f"out must be ({n}, {dim}), got ({out.shape[0]}, {out.shape[1]})")
    if n == 0 or dim == 0:
        return
    with nogil:
        for i in prange(n, schedule="static", num_threads=n_threads):
            fns.to_half(&src[i, 0], &out[i, 0], dim)


def to_float(
    const uint16_t[::1] src,        # IN (n,) float16 bits
    float[::1] out,                 # OUT (n,)
    int n_threads,
):
    """``out = float32(src)`` (exact), in blocks of 4,096 values (ValueError for
    lengths that differ). For whole arrays, such as a float16 ``grad_output``."""
    cdef int64_t n = src.shape[0]
    cdef int64_t n_blocks = (n + 4095) // 4096
    cdef int64_t b, lo
    cdef rows_table fns = rows_table_at(pool_level())
    if out.shape[0] != n:
        raise ValueError(f"out must hold {n} values, got {out.shape[0]}")
    if n == 0:
        return
    with nogil:
        for b in prange(n_blocks, schedule="static", num_threads=n_threads):
            lo = b * 4096
            fns.to_float(&src[lo], &out[lo], min(4096, n - lo))
