"""float16 <-> float32 row conversions for float16 tables (``sparsembed._half``).

A float16 table reaches these kernels as its ``uint16`` view (``weight.view(np.uint16)``):
Cython has no half type, and the conversions are done on the bits, in portable C
(no F16C/-march flags): float16 -> float32 is exact; float32 -> float16 rounds to
nearest, ties to even, with overflow to +-inf, gradual underflow to subnormals and
NaN kept NaN, bit for bit what numpy's ``astype(np.float16)`` gives (numpy's
``npy_floatbits_to_halfbits``).

Rows are distinct and each is converted by one thread: race-free, and the result
does not depend on the number of threads.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint16_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    static inline float sparsembed_h2f(uint16_t h) {
        /* exact; branch-light (F. Giesen's half_to_float_fast4) */
        const uint32_t shifted_exp = 0x7c00u << 13;
        const uint32_t magic_bits = 113u << 23;    /* 2**-14 */
        uint32_t o = ((uint32_t)(h & 0x7fffu)) << 13;
        uint32_t exp = shifted_exp & o;
        float f, magic;
        o += (127u - 15u) << 23;
        if (exp == shifted_exp) {                  /* inf, NaN */
            o += (128u - 16u) << 23;
        } else if (exp == 0) {                     /* zero, subnormal: renormalise */
            o += 1u << 23;
            memcpy(&f, &o, 4);
            memcpy(&magic, &magic_bits, 4);
            f -= magic;                            /* exact, no float32 subnormal */
            memcpy(&o, &f, 4);
        }
        o |= ((uint32_t)(h & 0x8000u)) << 16;
        memcpy(&f, &o, 4);
        return f;
    }

    static inline uint16_t sparsembed_f2h(float value) {
        uint32_t f, f_exp, f_sig;
        uint16_t h_sgn, h_exp, h_sig, ret;
        memcpy(&f, &value, 4);
        h_sgn = (uint16_t)((f & 0x80000000u) >> 16);
        f_exp = f & 0x7f800000u;
        if (f_exp >= 0x47800000u) {              /* overflow, inf, NaN */
            if (f_exp == 0x7f800000u) {
                f_sig = f & 0x007fffffu;
                if (f_sig != 0) {
                    ret = (uint16_t)(0x7c00u + (f_sig >> 13));
                    if (ret == 0x7c00u) {
                        ret++;                   /* stays a NaN */
                    }
                    return (uint16_t)(h_sgn + ret);
                }
            }
            return (uint16_t)(h_sgn + 0x7c00u);
        }
        if (f_exp <= 0x38000000u) {              /* subnormal half or signed zero */
            if (f_exp < 0x33000000u) {
                return h_sgn;
            }
            f_exp >>= 23;
            f_sig = 0x00800000u + (f & 0x007fffffu);
            f_sig >>= (113 - f_exp);
            /* round half to even; the shift may have dropped sticky bits */
            if (((f_sig & 0x00003fffu) != 0x00001000u) || (f & 0x000007ffu)) {
                f_sig += 0x00001000u;
            }
            h_sig = (uint16_t)(f_sig >> 13);
            return (uint16_t)(h_sgn + h_sig);
        }
        h_exp = (uint16_t)((f_exp - 0x38000000u) >> 13);
        f_sig = f & 0x007fffffu;
        if ((f_sig & 0x00003fffu) != 0x00001000u) {
            f_sig += 0x00001000u;
        }
        h_sig = (uint16_t)(f_sig >> 13);
        /* a carry out of the significand bumps the exponent (up to inf): correct */
        return (uint16_t)(h_sgn + h_exp + h_sig);
    }
    """
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
