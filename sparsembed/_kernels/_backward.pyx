"""Backward kernels: per-row sums of ``grad_output`` rows, dense or row-sparse.

Work is partitioned by row through the batch's row plan (see ``_plan``): each row is
summed by one thread, in input order, so results are bitwise identical for every
thread count and no atomics are needed.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.string cimport memcpy

from sparsembed._kernels._types cimport index_t


cdef inline void _sum_segment(
    const floating* grad,      # (n, dim) row-major
    int64_t dim,
    const int64_t* perm,
    int64_t lo,
    int64_t hi,
    bint scale_by_count,
    floating* out,             # (dim,)
) noexcept nogil:
    cdef int64_t k, j
    cdef const floating* src
    cdef floating inv
    # the first occurrence is copied, not added to zeros: no zero-fill needed
    memcpy(out, grad + perm[lo] * dim, dim * sizeof(floating))
    for k in range(lo + 1, hi):
        src = grad + perm[k] * dim
        for j in range(dim):
            out[j] += src[j]
    if scale_by_count and hi - lo > 1:
        inv = <floating> (hi - lo)
        for j in range(dim):
            out[j] /= inv


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
    cdef int64_t u
    if n_rows == 0 or dim == 0:
        return
    with nogil:
        for u in prange(n_rows, schedule="static", num_threads=n_threads):
            _sum_segment(&grad[0, 0], dim, &perm[0], starts[u], starts[u + 1],
                         scale_by_count, &out[rows[u], 0])


def row_sums(
    const floating[:, ::1] grad,     # IN (n, dim)
    const int64_t[::1] perm,         # IN (m,)
    const int64_t[::1] starts,       # IN (U + 1,)
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (U, dim), one row per distinct id
    int n_threads,
):
    """``out[u] = sum(grad[perm[starts[u]:starts[u+1]]])`` (/ count)."""
    cdef int64_t n_rows = out.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef int64_t u
    if n_rows == 0 or dim == 0:
        return
    with nogil:
        for u in prange(n_rows, schedule="static", num_threads=n_threads):
            _sum_segment(&grad[0, 0], dim, &perm[0], starts[u], starts[u + 1],
                         scale_by_count, &out[u, 0])


def fill_row_csr(
    const int64_t[::1] rows,   # IN (U,) sorted distinct rows
    int64_t num_rows,          # IN number of rows of the matrix
    index_t[::1] indptr,       # OUT (num_rows + 1,)
    index_t[::1] indices,      # OUT (U * dim,)
    int64_t dim,
    int n_threads,
):
    """CSR structure of a matrix whose non-empty rows are ``rows``, each full."""
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t u, r, j, lo, hi
    with nogil:
        # indptr[r] = dim * #(rows < r), filled one gap between stored rows at a time
        for u in prange(n_rows + 1, schedule="static", num_threads=n_threads):
            lo = rows[u - 1] + 1 if u > 0 else 0
            hi = rows[u] if u < n_rows else num_rows
            for r in range(lo, hi + 1):
                indptr[r] = <index_t> (u * dim)
        for u in prange(n_rows, schedule="static", num_threads=n_threads):
            for j in range(dim):
                indices[u * dim + j] = <index_t> j
