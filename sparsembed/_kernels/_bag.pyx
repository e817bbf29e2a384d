"""EmbeddingBag kernels: pooled forward (sum, mean, max), per-sample-weight gradient
and the row-partitioned backward.

Bags are given as ``starts`` (n_bags + 1, int64): bag ``b`` holds the entries
``starts[b]:starts[b + 1]``. The forward runs one bag per iteration (prange over
bags). The backward goes through the row plan of the entries (see ``_plan``): each
distinct row is summed by one thread in plan order, with the helper
:func:`bag_row_sum` from ``_bag.pxd``, so results are bitwise identical for every
thread count.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

from sparsembed._kernels._bag cimport bag_row_sum
from sparsembed._kernels._types cimport index_t

cdef enum:
    MODE_SUM = 0
    MODE_MEAN = 1
    MODE_MAX = 2


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
        #define SPARSEMBED_PREFETCH(p) __builtin_prefetch((p), 0, 1)
    #else
        #define SPARSEMBED_PREFETCH(p) ((void) 0)
    #endif
    """
    void SPARSEMBED_PREFETCH(const void* p) noexcept nogil


cdef enum:
    PREFETCH_AHEAD = 4   # entries: the row of entry e + 4 is fetched while e is added


cdef inline void _prefetch_row(
    const floating* weight, int64_t dim, const index_t* idx, int64_t e, int64_t hi,
) noexcept nogil:
    cdef int64_t j
    if e < hi:
        # one hint per 64-byte line of the row
        j = 0
        while j < dim:
            SPARSEMBED_PREFETCH(weight + idx[e] * dim + j)
            j = j + 64 // sizeof(floating)


cdef inline void _pool_bag(
    const floating* weight,     # (num_embeddings, dim)
    int64_t dim,
    const index_t* idx,
    int64_t lo,
    int64_t hi,
    int64_t n,                  # entries in idx (rows past the bag are prefetched too)
    int64_t pad,
    int mode,
    const floating* psw,        # (n,) or NULL
    floating* out,              # (dim,)
    int64_t* argmax,            # (dim,) or NULL
    int64_t* count,
) noexcept nogil:
    cdef int64_t e, j, r, c = 0
    cdef const floating* w
    cdef floating s
    memset(out, 0, dim * sizeof(floating))
    for e in range(lo, min(lo + PREFETCH_AHEAD, hi)):
        _prefetch_row(weight, dim, idx, e, n)
    if mode == MODE_MAX:
        for e in range(lo, hi):
            _prefetch_row(weight, dim, idx, e + PREFETCH_AHEAD, n)
            r = idx[e]
            if r == pad:
                continue
            w = weight + r * dim
            if c == 0:
                memcpy(out, w, dim * sizeof(floating))
                for j in range(dim):
                    argmax[j] = e
            else:
                # strict >: the first occurrence wins ties (torch's rule)
                for j in range(dim):
                    if w[j] > out[j]:
                        out[j] = w[j]
                        argmax[j] = e
            c = c + 1
        if c == 0:
            for j in range(dim):
                argmax[j] = -1
    elif psw != NULL:
        for e in range(lo, hi):
            _prefetch_row(weight, dim, idx, e + PREFETCH_AHEAD, n)
            r = idx[e]
            if r == pad:
                continue
            w = weight + r * dim
            s = psw[e]
            for j in range(dim):
                out[j] += s * w[j]
            c = c + 1
    else:
        for e in range(lo, hi):
            _prefetch_row(weight, dim, idx, e + PREFETCH_AHEAD, n)
            r = idx[e]
            if r == pad:
                continue
            w = weight + r * dim
            for j in range(dim):
                out[j] += w[j]
            c = c + 1
    count[0] = c
    if mode == MODE_MEAN and c > 1:
        s = <floating> c
        for j in range(dim):
            out[j] /= s


def bag_forward(
    const floating[:, ::1] weight,   # IN (num_embeddings, dim)
    const index_t[::1] idx,          # IN (n,) validated ids
    const int64_t[::1] starts,       # IN (n_bags + 1,) bag bounds, starts[-1] <= n
    int64_t pad,                     # IN padding id, or -1
    int mode,                        # IN 0 sum, 1 mean, 2 max
    const floating[::1] psw,         # IN (n,) per-sample weights, or (0,) for none
    floating[:, ::1] out,            # OUT (n_bags, dim)
    int64_t[:, ::1] argmax,          # OUT (n_bags, dim) in max mode, else (0, 0)
    int64_t[::1] counts,             # OUT (n_bags,) non-padding entries per bag
    int n_threads,
):
    """Pool each bag's rows: sum (optionally weighted), mean or element-wise max.

    Padding entries are skipped and not counted; an empty bag (or one of padding
    only) gives zeros, and in max mode an argmax of -1.
    """
    cdef int64_t n_bags = starts.shape[0] - 1
    cdef int64_t dim = weight.shape[1]
    cdef int64_t n_idx = starts[n_bags] if n_bags >= 0 else 0
    cdef int64_t b
    cdef const floating* w = NULL
    cdef const floating* ps = NULL
    cdef const index_t* ix = NULL
    cdef int64_t* am = NULL
    if n_bags <= 0:
        return
    if weight.shape[0] > 0:
        w = &weight[0, 0] if dim > 0 else NULL
    if idx.shape[0] > 0:
        ix = &idx[0]
    if psw.shape[0] > 0:
        ps = &psw[0]
    with nogil:
        for b in prange(n_bags, schedule="static", num_threads=n_threads):
            if dim == 0:
                counts[b] = 0
                continue
            _pool_bag(w, dim, ix, starts[b], starts[b + 1], n_idx, pad, mode, ps,
                      &out[b, 0], &argmax[b, 0] if mode == MODE_MAX else NULL,
                      &counts[b])


def bag_counts(
    const index_t[::1] idx,          # IN (n,)
    const int64_t[::1] starts,       # IN (n_bags + 1,)
    int64_t pad,                     # IN padding id, or -1
    int64_t[::1] counts,             # OUT (n_bags,) non-padding entries per bag
    int n_threads,
):
    """Number of non-padding entries of each bag."""
    cdef int64_t n_bags = starts.shape[0] - 1
    cdef int64_t b, e, c
    if n_bags <= 0:
        return
    with nogil:
        for b in prange(n_bags, schedule="static", num_threads=n_threads):
            c = 0
            for e in range(starts[b], starts[b + 1]):
                if idx[e] != pad:
                    c = c + 1
            counts[b] = c


def fill_entry_bag(
    const int64_t[::1] starts,       # IN (n_bags + 1,)
    int64_t[::1] entry_bag,          # OUT (starts[-1],) bag of each entry
    int n_threads,
):
    """``entry_bag[e] = b`` for every entry ``e`` of bag ``b``."""
    cdef int64_t n_bags = starts.shape[0] - 1
    cdef int64_t b, e
    if n_bags <= 0:
        return
    with nogil:
        for b in prange(n_bags, schedule="static", num_threads=n_threads):
            for e in range(starts[b], starts[b + 1]):
                entry_bag[e] = b


def per_sample_weights_grad(
    const floating[:, ::1] grad,     # IN (n_bags, dim) grad_output
    const floating[:, ::1] weight,   # IN (num_embeddings, dim)
    const index_t[::1] idx,          # IN (n,)
    const int64_t[::1] entry_bag,    # IN (m,) bag of each entry, m <= n
    int64_t pad,                     # IN padding id, or -1
    floating[::1] out,               # OUT (n,) zero-filled by the caller
    int n_threads,
):
    """``out[e] = dot(grad[entry_bag[e]], weight[idx[e]])`` (0 for padding entries
    and for entries past the last bag), accumulated in double."""
    cdef int64_t m = entry_bag.shape[0]
    cdef int64_t dim = weight.shape[1]
    cdef int64_t e, j, r, b
    cdef double acc
    if m == 0 or dim == 0:
        return
    with nogil:
        for e in prange(m, schedule="static", num_threads=n_threads):
            r = idx[e]
            if r == pad:
                out[e] = 0
                continue
            b = entry_bag[e]
            acc = 0.0
            for j in range(dim):
                acc = acc + <double> grad[b, j] * <double> weight[r, j]
            out[e] = <floating> acc


cdef inline void _pointers(
    const floating[::1] scale, const int64_t[:, ::1] argmax,
    const floating** sp, const int64_t** ap,
) noexcept nogil:
    sp[0] = &scale[0] if scale.shape[0] > 0 else NULL
    ap[0] = &argmax[0, 0] if argmax.shape[0] > 0 and argmax.shape[1] > 0 else NULL


def bag_dense_backward(
    const floating[:, ::1] grad,     # IN (n_bags, dim) grad_output
    const int64_t[::1] perm,         # IN (m,) plan permutation over the entries
    const int64_t[::1] rows,         # IN (U,) distinct rows
    const int64_t[::1] starts,       # IN (U + 1,) segment bounds into perm
    const int64_t[::1] entry_bag,    # IN (n,) bag of each entry
    const floating[::1] scale,       # IN (n,) per-entry factor, or (0,) for none
    const int64_t[:, ::1] argmax,    # IN (n_bags, dim) max mode winners, or (0, 0)
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (num_embeddings, dim), zero-filled by caller
    int n_threads,
):
    """``out[rows[u]] = bag_row_sum(segment u)`` for every planned row."""
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef int64_t u
    cdef const floating* sp
    cdef const int64_t* ap
    if n_rows == 0 or dim == 0:
        return
    _pointers(scale, argmax, &sp, &ap)
    with nogil:
        for u in prange(n_rows, schedule="static", num_threads=n_threads):
            bag_row_sum(&grad[0, 0], dim, &perm[0], starts[u], starts[u + 1],
                        &entry_bag[0], sp, ap, scale_by_count, &out[rows[u], 0])


def bag_row_sums(
    const floating[:, ::1] grad,     # IN (n_bags, dim) grad_output
    const int64_t[::1] perm,         # IN (m,)
    const int64_t[::1] starts,       # IN (U + 1,)
    const int64_t[::1] entry_bag,    # IN (n,)
    const floating[::1] scale,       # IN (n,) or (0,)
    const int64_t[:, ::1] argmax,    # IN (n_bags, dim) or (0, 0)
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (U, dim), one row per distinct id
    int n_threads,
):
    """``out[u] = bag_row_sum(segment u)``: the row-sparse gradient's values."""
    cdef int64_t n_rows = out.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef int64_t u
    cdef const floating* sp
    cdef const int64_t* ap
    if n_rows == 0 or dim == 0:
        return
    _pointers(scale, argmax, &sp, &ap)
    with nogil:
        for u in prange(n_rows, schedule="static", num_threads=n_threads):
            bag_row_sum(&grad[0, 0], dim, &perm[0], starts[u], starts[u + 1],
                        &entry_bag[0], sp, ap, scale_by_count, &out[u, 0])
