"""Backward kernels: per-row sums of ``grad_output`` rows, dense or row-sparse.

Work is partitioned by row through the batch's row plan (see ``_plan``): each row is
summed by one thread, in input order, so results are bitwise identical for every
thread count and no atomics are needed.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from sparsembed._kernels._memory cimport (
    prefetch_distance,
    prefetch_row,
    stream_fence,
    stream_row,
    stream_zero,
)
from sparsembed._kernels._split cimport block_start
from sparsembed._kernels._types cimport index_t


cdef void _sum_segments(
    const floating* grad,      # (n, dim) row-major
    int64_t dim,
    const int64_t* perm,
    const int64_t* starts,     # (n_rows + 1,)
    const int64_t* rows,       # (n_rows,) destination rows, or NULL: row u -> out[u]
    int64_t u_lo,
    int64_t u_hi,
    bint scale_by_count,
    floating* out,
    int64_t zero_upto,         # >= 0: also zero the rows no segment writes (see below)
    floating* scratch,         # (dim,) or NULL: stream the output (see below)
) noexcept nogil:
    """Sum segments ``u_lo..u_hi - 1``, each in input order, into their output rows.

    With ``zero_upto >= 0`` (dense output in reused, unzeroed memory) the rows between
    ``rows[u - 1]`` and ``rows[u]`` are zeroed before row ``rows[u]`` is written, and
    the last block also zeroes ``rows[-1] + 1 .. zero_upto - 1``: one pass writes
    every row of the table once.

    With ``scratch`` (a large dense output) each row is summed in ``scratch`` (in
    L1) and written once with non-temporal stores, zero rows too: no line of the
    output is read before it is written. The sums are the same either way.

    The grad rows are read in plan order, i.e. at random: the row ``ahead`` plan
    positions further on is prefetched while the current one is added.
    """
    cdef size_t row_bytes = dim * sizeof(floating)
    cdef int64_t ahead = prefetch_distance(row_bytes)
    cdef int64_t k_end = starts[u_hi]
    cdef int64_t u, k, j, lo, hi
    cdef const floating* src
    cdef floating* dst
    cdef floating* acc
    cdef floating inv
    cdef int64_t prev
    for u in range(u_lo, u_hi):
        lo = starts[u]
        hi = starts[u + 1]
        dst = out + (rows[u] if rows != NULL else u) * dim
        if zero_upto >= 0:
            prev = rows[u - 1] + 1 if u > 0 else 0
            if rows[u] > prev:
                if scratch != NULL:
                    stream_zero(out + prev * dim, (rows[u] - prev) * row_bytes)
                else:
                    memset(out + prev * dim, 0, (rows[u] - prev) * row_bytes)
        if lo + ahead < k_end:
            prefetch_row(grad + perm[lo + ahead] * dim, row_bytes)
        if scratch != NULL and hi - lo == 1:
            stream_row(dst, grad + perm[lo] * dim, row_bytes)
            continue
        acc = scratch if scratch != NULL else dst
        # the first occurrence is copied, not added to zeros: no zero-fill needed
        memcpy(acc, grad + perm[lo] * dim, row_bytes)
        for k in range(lo + 1, hi):
            if k + ahead < k_end:
                prefetch_row(grad + perm[k + ahead] * dim, row_bytes)
            src = grad + perm[k] * dim
            for j in range(dim):
                acc[j] += src[j]
        if scale_by_count and hi - lo > 1:
            inv = <floating> (hi - lo)
            for j in range(dim):
                acc[j] /= inv
        if scratch != NULL:
            stream_row(dst, acc, row_bytes)
    if scratch != NULL:
        stream_fence()


cdef void _zero_tail(floating* out, int64_t dim, const int64_t* rows, int64_t n_rows,
                     int64_t zero_upto, bint stream) noexcept nogil:
    cdef int64_t first = rows[n_rows - 1] + 1 if n_rows > 0 else 0
    if zero_upto > first:
        if stream:
            stream_zero(out + first * dim, (zero_upto - first) * dim * sizeof(floating))
            stream_fence()
        else:
            memset(out + first * dim, 0, (zero_upto - first) * dim * sizeof(floating))


cdef void _sum_block(
    const floating* grad, int64_t dim, const int64_t* perm, const int64_t* starts,
    const int64_t* rows, int64_t u_lo, int64_t u_hi, bint scale_by_count, floating* out,
    int64_t zero_upto, bint stream,
) noexcept nogil:
    """:func:`_sum_segments` of one thread's block, with its own row buffer when
    ``stream``. Without the buffer (no memory for it) the rows are written with
    plain stores: the same values."""
    cdef floating* scratch = <floating*> malloc(dim * sizeof(floating)) if stream else NULL
    _sum_segments(grad, dim, perm, starts, rows, u_lo, u_hi, scale_by_count, out,
                  zero_upto, scratch)
    free(scratch)


cdef void _sum_all(
    const floating* grad, int64_t dim, const int64_t* perm, const int64_t* starts,
    const int64_t* rows, int64_t n_rows, bint scale_by_count, floating* out,
    int64_t zero_upto, int n_threads, bint stream,
) noexcept nogil:
    """Split the segments into one block per thread with about the same number of
    grad rows each (a Zipf batch has a few very long segments), then sum each block.
    Each row is still summed by one thread in input order: the result does not
    depend on the thread count. ``stream``: write the output with non-temporal
    stores (see :func:`_sum_segments`)."""
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef int64_t t, u_lo, u_hi
    if T > n_rows:
        T = n_rows
    if T <= 1:
        _sum_block(grad, dim, perm, starts, rows, 0, n_rows, scale_by_count, out,
                   zero_upto, stream)
        if zero_upto >= 0:
            _zero_tail(out, dim, rows, n_rows, zero_upto, stream)
        return
    for t in prange(T, schedule="static", num_threads=T):
        u_lo = block_start(starts, n_rows, T, t)
        u_hi = block_start(starts, n_rows, T, t + 1)
        if u_lo < u_hi:
            _sum_block(grad, dim, perm, starts, rows, u_lo, u_hi, scale_by_count, out,
                       zero_upto, stream)
        if t == T - 1 and zero_upto >= 0:
            _zero_tail(out, dim, rows, n_rows, zero_upto, stream)


def dense_backward(
    const floating[:, ::1] grad,     # IN (n, dim) grad_output rows
    const int64_t[::1] perm,         # IN (m,) plan permutation
    const int64_t[::1] rows,         # IN (U,) distinct rows
    const int64_t[::1] starts,       # IN (U + 1,) segment bounds into perm
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (num_embeddings, dim), zero-filled by caller
    int n_threads,
):
    """``out[rows[u]] = sum(grad[perm[starts[u]:starts[u+1]]])`` (/ count)."""
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t dim = grad.shape[1]
    if n_rows == 0 or dim == 0:
        return
    with nogil:
        _sum_all(&grad[0, 0], dim, &perm[0], &starts[0], &rows[0], n_rows,
                 scale_by_count, &out[0, 0], -1, n_threads, False)


def dense_backward_fill(
    const floating[:, ::1] grad,     # IN (n, dim) grad_output rows
    const int64_t[::1] perm,         # IN (m,) plan permutation
    const int64_t[::1] rows,         # IN (U,) distinct rows
    const int64_t[::1] starts,       # IN (U + 1,) segment bounds into perm
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (num_embeddings, dim), any content
    int n_threads,
    bint stream=False,               # IN write out with non-temporal stores
):
    """:func:`dense_backward` into an uninitialised ``out``: the rows no id touches
    are zeroed in the same pass, so ``out`` need not be zero-filled first. With
    ``stream`` every row is written once with non-temporal stores (a large table:
    its lines are not read before they are written)."""
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef int64_t num_rows = out.shape[0]
    if num_rows == 0 or dim == 0:
        return
    with nogil:
        if n_rows == 0:
            if stream:
                stream_zero(&out[0, 0], num_rows * dim * sizeof(floating))
                stream_fence()
            else:
                memset(&out[0, 0], 0, num_rows * dim * sizeof(floating))
        else:
            _sum_all(&grad[0, 0], dim, &perm[0], &starts[0], &rows[0], n_rows,
                     scale_by_count, &out[0, 0], num_rows, n_threads, stream)


def row_sums(
    const floating[:, ::1] grad,     # IN (n, dim)
    const int64_t[::1] perm,         # IN (m,)
    const int64_t[::1] starts,       # IN (U + 1,)
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (U, dim), one row per distinct id
    int n_threads,
    bint stream=False,               # IN write out with non-temporal stores
):
    """``out[u] = sum(grad[perm[starts[u]:starts[u+1]]])`` (/ count)."""
    cdef int64_t n_rows = out.shape[0]
    cdef int64_t dim = grad.shape[1]
    if n_rows == 0 or dim == 0:
        return
    with nogil:
        _sum_all(&grad[0, 0], dim, &perm[0], &starts[0], NULL, n_rows,
                 scale_by_count, &out[0, 0], -1, n_threads, stream)


def fill_row_csr(
    const int64_t[::1] rows,   # IN (U,) sorted distinct rows
    int64_t num_rows,          # IN number of rows of the matrix
    index_t[::1] indptr,       # OUT (num_rows + 1,)
    index_t[::1] indices,      # OUT (U * dim,)
    int64_t dim,
    int n_threads,
    bint stream=False,         # IN write indices with non-temporal stores
):
    """CSR structure of a matrix whose non-empty rows are ``rows``, each full."""
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef int64_t u, r, j, lo, hi, t
    cdef index_t* pattern = NULL
    cdef index_t* mine
    if stream and n_rows > 0 and dim > 0:
        # one row of column numbers per thread, streamed into every stored row
        pattern = <index_t*> malloc(T * dim * sizeof(index_t))
        if pattern == NULL:
            raise MemoryError()
    try:
        with nogil:
            # indptr[r] = dim * #(rows < r), filled one gap between stored rows at a time
            for u in prange(n_rows + 1, schedule="static", num_threads=n_threads):
                lo = rows[u - 1] + 1 if u > 0 else 0
                hi = rows[u] if u < n_rows else num_rows
                for r in range(lo, hi + 1):
                    indptr[r] = <index_t> (u * dim)
            if pattern != NULL:
                for t in prange(T, schedule="static", num_threads=T):
                    mine = pattern + t * dim
                    for j in range(dim):
                        mine[j] = <index_t> j
                    for u in range((n_rows * t) // T, (n_rows * (t + 1)) // T):
                        stream_row(&indices[u * dim], mine, dim * sizeof(index_t))
                    stream_fence()
            else:
                for u in prange(n_rows, schedule="static", num_threads=n_threads):
                    for j in range(dim):
                        indices[u * dim + j] = <index_t> j
    finally:
        free(pattern)


def merge_rows(
    const int64_t[::1] rows_a,   # IN (Ua,) sorted distinct rows
    const int64_t[::1] rows_b,   # IN (Ub,) sorted distinct rows
    int64_t[::1] rows,           # OUT (>= Ua + Ub,) their union, sorted, in [:n]
    int64_t[::1] from_a,         # OUT (>= Ua + Ub,) position of rows[i] in rows_a, or -1
    int64_t[::1] from_b,         # OUT (>= Ua + Ub,) position of rows[i] in rows_b, or -1
):
    """Merge two sorted row lists (one pass, O(Ua + Ub)); returns n, the union's size.

    Serial: it moves 3 integers per row, against ``dim`` values per row for
    :func:`add_merged_rows`."""
    cdef int64_t na = rows_a.shape[0], nb = rows_b.shape[0]
    cdef int64_t i = 0, j = 0, k = 0
    if rows.shape[0] < na + nb or from_a.shape[0] < na + nb or from_b.shape[0] < na + nb:
        raise ValueError(f"merge_rows: outputs hold {min(rows.shape[0], from_a.shape[0], from_b.shape[0])}"
                         f" rows, need {na + nb}")
    with nogil:
        while i < na and j < nb:
            if rows_a[i] < rows_b[j]:
                rows[k] = rows_a[i]
                from_a[k] = i
                from_b[k] = -1
                i += 1
            elif rows_b[j] < rows_a[i]:
                rows[k] = rows_b[j]
                from_a[k] = -1
                from_b[k] = j
                j += 1
            else:
                rows[k] = rows_a[i]
                from_a[k] = i
                from_b[k] = j
                i += 1
                j += 1
            k += 1
        while i < na:
            rows[k] = rows_a[i]
            from_a[k] = i
            from_b[k] = -1
            i += 1
            k += 1
        while j < nb:
            rows[k] = rows_b[j]
            from_a[k] = -1
            from_b[k] = j
            j += 1
            k += 1
    return k


def add_merged_rows(
    const floating[:, ::1] values_a,  # IN (Ua, dim)
    const floating[:, ::1] values_b,  # IN (Ub, dim)
    const int64_t[::1] from_a,        # IN (n,) row of values_a for out[i], or -1
    const int64_t[::1] from_b,        # IN (n,) row of values_b for out[i], or -1
    floating[:, ::1] out,             # OUT (n, dim)
    int n_threads,
):
    """``out[i] = values_a[from_a[i]] + values_b[from_b[i]]``, a missing term left out
    (so a row held by one side only is copied bit for bit, -0.0 included).

    The caller guarantees from_a / from_b hold valid rows or -1, never both -1."""
    cdef int64_t n = out.shape[0], dim = out.shape[1]
    cdef int64_t i, j, ia, ib
    if dim == 0:
        return
    with nogil:
        for i in prange(n, schedule="static", num_threads=n_threads):
            ia = from_a[i]
            ib = from_b[i]
            if ia >= 0 and ib >= 0:
                for j in range(dim):
                    out[i, j] = values_a[ia, j] + values_b[ib, j]
            elif ia >= 0:
                memcpy(&out[i, 0], &values_a[ia, 0], dim * sizeof(floating))
            else:
                memcpy(&out[i, 0], &values_b[ib, 0], dim * sizeof(floating))
