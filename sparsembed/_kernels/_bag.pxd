# The per-row gradient sum of EmbeddingBag, shared with other kernels (the fused
# optimizer path cimports it): ``from sparsembed._kernels._bag cimport bag_row_sum``.

from cython cimport floating
from libc.stdint cimport int64_t
from libc.string cimport memset


cdef inline void bag_row_sum(
    const floating* grad,      # IN (n_bags, dim) grad_output, row-major
    int64_t dim,
    const int64_t* perm,       # IN plan permutation: entry positions grouped by row
    int64_t lo,                # IN this row's segment is perm[lo:hi]
    int64_t hi,
    const int64_t* entry_bag,  # IN (n_entries,) bag of each entry, or NULL: entry e reads row e
    const floating* scale,     # IN (n_entries,) per-entry factor, or NULL for 1
    const int64_t* argmax,     # IN (n_bags, dim) winning entry per column (max mode), or NULL
    bint scale_by_count,       # IN divide the sum by hi - lo
    floating* out,             # OUT (dim,) the row's gradient
) noexcept nogil:
    """``out = sum_e grad[entry_bag[e]] * scale[e]`` over the row's entries, in plan
    order; in max mode an entry only receives the columns it won."""
    cdef int64_t k, j, e, b
    cdef const floating* src
    cdef const int64_t* won
    cdef floating s, inv
    memset(out, 0, dim * sizeof(floating))
    for k in range(lo, hi):
        e = perm[k]
        b = entry_bag[e] if entry_bag != NULL else e
        src = grad + b * dim
        if argmax != NULL:
            won = argmax + b * dim
            for j in range(dim):
                if won[j] == e:
                    out[j] += src[j]
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
