"""float16 <-> float32 row conversions for float16 tables (``sparsembed._half``).

A float16 table reaches these kernels as its ``uint16`` view (``weight.view(np.uint16)``):
Cython has no half type, and the conversions are done on the bits, in portable C
(``_half.h``; no F16C/-march flags): float16 -> float32 is exact; float32 -> float16
rounds to nearest, ties to even, with overflow to +-inf, gradual underflow to
subnormals and NaN kept NaN, bit for bit what numpy's ``astype(np.float16)`` gives
(numpy's ``npy_floatbits_to_halfbits``).

Rows are distinct and each is converted by one thread: race-free, and the result
does not depend on the number of threads.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint16_t

cdef extern from "_half.h":
    float h2f "sparsembed_h2f"(uint16_t h) noexcept nogil
    uint16_t f2h "sparsembed_f2h"(float f) noexcept nogil


def rows_to_float(
    const uint16_t[:, ::1] table,   # IN (num_embeddings, dim) float16 bits
    const int64_t[::1] rows,        # IN (U,) validated row ids
    float[:, ::1] out,              # OUT (U, dim)
    int n_threads,
):
    """``out[u] = float32(table[rows[u]])`` (exact)."""
    cdef int64_t n = rows.shape[0]
    cdef int64_t dim = table.shape[1]
    cdef int64_t u, j, r
    if n == 0 or dim == 0:
        return
    with nogil:
        for u in prange(n, schedule="static", num_threads=n_threads):
            r = rows[u]
            for j in range(dim):
                out[u, j] = h2f(table[r, j])


def rows_from_float(
    const float[:, ::1] work,       # IN (U, dim)
    const int64_t[::1] rows,        # IN (U,) distinct validated row ids
    uint16_t[:, ::1] table,         # INOUT (num_embeddings, dim) float16 bits
    int n_threads,
):
    """``table[rows[u]] = float16(work[u])``, rounded to nearest even."""
    cdef int64_t n = rows.shape[0]
    cdef int64_t dim = work.shape[1]
    cdef int64_t u, j, r
    if n == 0 or dim == 0:
        return
    with nogil:
        for u in prange(n, schedule="static", num_threads=n_threads):
            r = rows[u]
            for j in range(dim):
                table[r, j] = f2h(work[u, j])


def to_half(
    const float[:, ::1] src,        # IN (n, dim)
    uint16_t[:, ::1] out,           # OUT (n, dim) float16 bits
    int n_threads,
):
    """``out = float16(src)``, rounded to nearest even."""
    cdef int64_t n = src.shape[0]
    cdef int64_t dim = src.shape[1]
    cdef int64_t i, j
    if n == 0 or dim == 0:
        return
    with nogil:
        for i in prange(n, schedule="static", num_threads=n_threads):
            for j in range(dim):
                out[i, j] = f2h(src[i, j])
