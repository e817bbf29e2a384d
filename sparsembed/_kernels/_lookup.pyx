"""Forward kernels: index validation, row gather and max-norm renormalisation."""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport fabs, pow, sqrt, INFINITY
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from sparsembed._kernels._gather cimport first_hit, gather_claimed, gather_rows
from sparsembed._kernels._memory cimport (
    checked_set_llc_bytes,
    copy_row,
    llc_bytes,
    prefetch_distance,
    prefetch_row,
)
from sparsembed._kernels._openmp_helpers cimport claim_part, claimed_parts
from sparsembed._kernels._reduce cimport abs_sum8, dot8
from sparsembed._kernels._types cimport index_t


# the last-level cache size, read here once holding the GIL: the lookup's far prefetch
# (_memory.pxd: gather_far_distance) reads it again inside parallel regions
llc_bytes()


def set_last_level_cache_bytes(int64_t nbytes):
    """For tests: this module's kernels take the last-level cache to be ``nbytes``
    (0: read it again); returns the size now in use."""
    return checked_set_llc_bytes(nbytes)


def first_out_of_range(
    const index_t[::1] idx,   # IN (n,)
    int64_t upper,            # IN valid ids are 0 <= i < upper
    int n_threads,
):
    """Position of the first entry outside ``[0, upper)``, or -1 when all are valid.

    Each thread scans one contiguous chunk and keeps its own first hit; the smallest
    chunk with a hit wins, so the answer is the same for every thread count.
    """
    cdef int64_t n = idx.shape[0]
    cdef int64_t n_chunks = 64
    cdef int64_t chunk = (n + n_chunks - 1) // n_chunks
    cdef int64_t c, i, lo, hi, found = -1
    cdef int64_t* first = NULL
    if n == 0:
        return -1
    if n < (1 << 19):
        # a scan of 4 MB of ids takes about as long as waking a second thread on
        # a virtual machine (~0.1 ms): not worth a parallel region below that
        n_threads = 1
    first = <int64_t*> malloc(n_chunks * sizeof(int64_t))
    if first == NULL:
        raise MemoryError()
    try:
        with nogil:
            for c in prange(n_chunks, schedule="static", num_threads=n_threads):
                first[c] = -1
                lo = c * chunk
                hi = lo + chunk
                if hi > n:
                    hi = n
                i = lo
                while i < hi:
                    if idx[i] < 0 or idx[i] >= upper:
                        first[c] = i
                        break
                    i = i + 1
            found = first_hit(first, n_chunks)
    finally:
        free(first)
    return found


cdef inline bint _rows_apart(Py_ssize_t n, Py_ssize_t d, Py_ssize_t s0, Py_ssize_t s1,
                             Py_ssize_t size) noexcept:
    # each of n rows of d values of size bytes contiguous, rows not overlapping (a
    # dimension of length 1 may have any stride)
    return (d <= 1 or s1 == size) and (n <= 1 or (s0 % size == 0 and s0 >= d * size))


def rows_apart(weight):
    """Whether the 2-D array ``weight``'s rows are each contiguous and do not overlap
    (C order, or a column slice of a wider table): what :func:`gather` reads."""
    return _rows_apart(weight.shape[0], weight.shape[1], weight.strides[0],
                       weight.strides[1], weight.itemsize)


def gather(
    const floating[:, :] weight,    # IN (num_rows, dim), each row contiguous
    const index_t[::1] idx,         # IN (n,) ids, checked here against num_rows
    floating[:, ::1] out,           # OUT (n, dim)
    int n_threads,
    bint stream=False,              # IN write out with non-temporal stores
    index_t[::1] ids_out=None,      # OUT (n,) a copy of idx, or None
):
    """``out[i, :] = weight[idx[i], :]``; returns -1, or the position of the first id
    outside ``[0, num_rows)`` (``out`` and ``ids_out`` are then partly written).

    The ids go out in ranges of consecutive positions (16 per thread), each thread
    claiming the next range as it comes free, copying that block of ``out`` and
    prefetching the table rows a few ids ahead, so that the random reads overlap.
    Claimed in a parallel block, not split by a prange: a worker that wakes late
    (passive waiting on a virtual machine: 30-50 us) leaves its ranges to the
    others, and there is no start barrier (see _spin.h: se_claim). Ids are checked
    on the way, so a lookup needs no separate validation pass. With ``ids_out``
    each range's ids are copied too, just read (a forward that keeps its ids for the
    backward needs no copy of its own: 0.15 ms on one thread for 262,144 ids).
    """
    cdef int64_t n = idx.shape[0]
    cdef int64_t num_rows = weight.shape[0]
    cdef int64_t dim = weight.shape[1]
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef int64_t n_ranges, found = -1
    cdef long long next_range = 0
    cdef int64_t* first = NULL
    cdef index_t* keep = NULL
    cdef int64_t stride = dim
    # a table whose rows are contiguous but further apart than dim (a column slice
    # of a wider table) is read in place: torch does, and copying the named rows
    # first (sorting the ids to find them) cost 3-8x torch
    if not _rows_apart(num_rows, dim, weight.strides[0], weight.strides[1],
                       sizeof(floating)):
        raise ValueError("gather reads tables whose rows are contiguous and do not overlap")
    if num_rows > 1:
        stride = weight.strides[0] // sizeof(floating)
    if ids_out is not None:
        if ids_out.shape[0] != n:
            raise ValueError(f"ids_out has {ids_out.shape[0]} entries, expected {n}")
        if n > 0:
            keep = &ids_out[0]
    if n == 0:
        return -1
    if dim == 0:
        if keep != NULL:
            memcpy(keep, &idx[0], n * sizeof(index_t))
        return first_out_of_range(idx, num_rows, n_threads)
    if T > n:
        T = n
    if T == 1:
        # no parallel region and no per-range table: 0.55 us less a call (0.94 ->
        # 0.38 us for 16 ids), a fifth of a small lookup
        with nogil:
            found = gather_rows(&weight[0, 0] if num_rows > 0 else NULL, num_rows, &idx[0],
                                0, n, dim, &out[0, 0], stream, stride)
            if keep != NULL:
                memcpy(keep, &idx[0], n * sizeof(index_t))
        return found
    n_ranges = claimed_parts(n, T)
    first = <int64_t*> malloc(n_ranges * sizeof(int64_t))
    if first == NULL:
        raise MemoryError()
    try:
        with nogil, parallel(num_threads=T):
            gather_claimed(&weight[0, 0] if num_rows > 0 else NULL, num_rows, &idx[0], n,
                           dim, &out[0, 0], stream, keep, first, &next_range, n_ranges, T,
                           stride)
        found = first_hit(first, n_ranges)
    finally:
        free(first)
    return found


def check_row_ids(
    const int64_t[::1] rows,  # IN (U,) row ids
    int64_t num_rows,         # IN valid ids are 0 <= r < num_rows
):
    """ValueError naming the first row id outside ``[0, num_rows)``: the check of the
    kernels that take row ids from their callers and write or read those rows."""
    cdef int64_t u = first_out_of_range(rows, num_rows, 1) if rows.shape[0] > 0 else -1
    if u >= 0:
        raise ValueError(f"row {rows[u]} at position {u} is outside [0, {num_rows})")


def scatter_rows(
    const floating[:, ::1] src,     # IN (U, dim)
    const int64_t[::1] rows,        # IN (U,) distinct row ids, checked here
    floating[:, ::1] out,           # INOUT (num_rows, dim)
    int n_threads,
):
    """``out[rows[u]] = src[u]`` for distinct ``rows`` (each row written by one
    thread: race-free). ValueError, before any write, for a row outside ``out``."""
    cdef int64_t n = rows.shape[0]
    cdef int64_t dim = src.shape[1]
    cdef int64_t num_rows = out.shape[0]
    cdef int64_t u
    cdef int64_t T = max(1, min(n_threads, n))
    if src.shape[0] != n or out.shape[1] != dim:
        raise ValueError(f"src must be ({n}, {out.shape[1]}), got ({src.shape[0]}, {dim})")
    check_row_ids(rows, num_rows)
    if n == 0 or dim == 0:
        return
    with nogil:
        for u in prange(n, schedule="static", num_threads=T):
            copy_row(&out[rows[u], 0], &src[u, 0], dim * sizeof(floating))


cdef inline double _row_norm(const floating* row, int64_t dim, double p) noexcept nogil:
    cdef int64_t j
    cdef double acc = 0.0, a
    if p == 2.0:
        return sqrt(dot8(row, row, dim))
    if p == 1.0:
        return abs_sum8(row, dim)
    # the max and min keep a NaN once met (a != a), as torch's reductions do: a row
    # holding one has a NaN norm and is left as it is (no NaN > max_norm)
    if p == INFINITY:
        for j in range(dim):
            a = fabs(<double> row[j])
            if a > acc or a != a:
                acc = a
        return acc
    if p == -INFINITY:
        acc = INFINITY
        for j in range(dim):
            a = fabs(<double> row[j])
            if a < acc or a != a:
                acc = a
        return acc
    if p == 0.0:
        for j in range(dim):
            if row[j] != 0:
                acc += 1.0
        return acc
    for j in range(dim):
        acc += pow(fabs(<double> row[j]), p)
    return pow(acc, 1.0 / p)


def renorm_rows(
    floating[:, ::1] weight,   # IN/OUT (num_embeddings, dim), rows rescaled in place
    const int64_t[::1] rows,   # IN (n_rows,) distinct row ids
    double max_norm,
    double norm_type,
    int n_threads,
):
    """torch's ``embedding_renorm_`` on distinct rows: a row whose norm exceeds
    ``max_norm`` is scaled by ``max_norm / (norm + 1e-7)``.

    Rows are distinct, so each is touched by one thread: race-free and identical
    for every thread count. The rows go out in ranges claimed as threads come free
    (``claim_part``, as the gather's; A/B, 2 threads, D = 64, passive waiting:
    2,046-8,161 rows 0.43-0.60x the time of the static split, 32,000 0.74x,
    205,000 1.02-1.03x). Each thread prefetches its rows ahead: sorted rows a few
    apart are no stream the hardware prefetcher follows (230,000 rows of 10^6, D =
    64, 2 threads: 11.1 ms without, the rows' latency one after another).
    """
    cdef int64_t n = rows.shape[0]
    cdef int64_t dim = weight.shape[1]
    cdef int64_t k, j, r, c, k_lo, k_hi
    cdef int64_t T = max(1, min(n_threads, n))
    cdef int64_t n_ranges = claimed_parts(n, T)
    cdef long long next_range = 0
    cdef size_t row_bytes = dim * sizeof(floating)
    cdef int64_t ahead = prefetch_distance(row_bytes)
    cdef double norm
    cdef floating scale
    if n == 0 or dim == 0:
        return
    with nogil, parallel(num_threads=T):
        c = claim_part(&next_range, n_ranges, T)
        while c < n_ranges:
            k_lo = n * c // n_ranges
            k_hi = n * (c + 1) // n_ranges
            for k in range(k_lo, k_hi):
                if k + ahead < k_hi:
                    prefetch_row(&weight[rows[k + ahead], 0], row_bytes)
                r = rows[k]
                norm = _row_norm(&weight[r, 0], dim, norm_type)
                if norm > max_norm:
                    # torch multiplies in the table's dtype
                    scale = <floating> (max_norm / (norm + 1e-7))
                    for j in range(dim):
                        weight[r, j] = weight[r, j] * scale
            c = claim_part(&next_range, n_ranges, T)
