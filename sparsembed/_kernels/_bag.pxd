# The per-row gradient sum of EmbeddingBag, shared with other kernels (the fused
# optimizer path cimports it): ``from sparsembed._kernels._bag cimport bag_row_sum``.

from cython cimport floating
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

cdef extern from *:
    """
    #include <stdint.h>
    #if defined(_MSC_VER) && !defined(__clang__)
        #include <intrin.h>
        static inline int sparsembed_ctz64(uint64_t x) {
            unsigned long i;
            _BitScanForward64(&i, x);
            return (int)i;
        }
    #else
        static inline int sparsembed_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    #endif
    """
    # index of the lowest set bit of x != 0
    int ctz64 "sparsembed_ctz64"(uint64_t x) noexcept nogil


cdef inline void bag_row_sum(
    const floating* grad,      # IN (n_bags, dim) grad_output, row-major
    int64_t dim,
    const int64_t* perm,       # IN plan permutation: entry positions grouped by row
    int64_t lo,                # IN this row's segment is perm[lo:hi]
    int64_t hi,
    const int64_t* entry_bag,  # IN (n_entries,) bag of each entry, or NULL: entry e reads row e
    const floating* scale,     # IN (n_entries,) per-entry factor, or NULL for 1
    const uint64_t* won,       # IN (n_entries, words) columns each entry won (max mode:
                               #    _bag.won_masks), or NULL
    int64_t words,             # IN (dim + 63) // 64 with won
    bint scale_by_count,       # IN divide the sum by hi - lo
    floating* out,             # OUT (dim,) the row's gradient
) noexcept nogil:
    """``out = sum_e grad[entry_bag[e]] * scale[e]`` over the row's entries, in plan
    order; in max mode an entry only adds the columns it won (the set bits of its
    mask: about dim / bag length of them, where comparing the bag's argmax row with
    the entry cost dim int64 reads per entry)."""
    cdef int64_t k, j, e, b, w
    cdef const floating* src
    cdef uint64_t bits
    cdef floating s, inv
    memset(out, 0, dim * sizeof(floating))
    for k in range(lo, hi):
        e = perm[k]
        b = entry_bag[e] if entry_bag != NULL else e
        src = grad + b * dim
        if won != NULL:
            for w in range(words):
                bits = won[e * words + w]
                while bits != 0:
                    j = (w << 6) + ctz64(bits)
                    out[j] += src[j]
                    bits = bits & (bits - 1)
        elif scale != NULL:
            s = scale[e]
            for j in range(dim):
                out[j] += s * src[j]
        else:
            for j in range(dim):
                out[j] += src[j]
    if scale_by_count and hi - lo > 1:
        inv = <floating> (hi - lo)
        for j in range(dim):
            out[j] /= inv
