"""Backward kernels: per-row sums of ``grad_output`` rows, dense or row-sparse.

Work is partitioned by row through the batch's row plan (see ``_plan``): each row is
summed by one thread, in input order, so results are bitwise identical for every
thread count and no atomics are needed.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from sparsembed._kernels._gaps cimport ENTRY_COST, ROW_COST, zero_gaps, zero_rows
from sparsembed._kernels._memory cimport (
    checked_set_llc_bytes,
    copy_row,
    llc_bytes,
    prefetch_distance,
    stream_fence,
    stream_row,
    stream_zero,
)
from sparsembed._kernels._openmp_helpers cimport (
    claim_part,
    claimed_parts,
    omp_get_thread_num,
)
from sparsembed._kernels._simd cimport (
    SE_MEAN,
    SE_STREAM,
    SE_ZERO_GAPS,
    pool_level,
    pool_read_once_flags,
    pool_set_level,
    pool_stages,
    pool_sum,
    pool_table,
)
from sparsembed._kernels._sum_pooling cimport pool_table_at
from sparsembed._kernels._split cimport block_start, block_start_spanned, first_at_least
from sparsembed._kernels._types cimport index_t

cdef extern from "_scatter_rows.h":
    void first_row_f32 "sparsembed_first_row_f32"(float* d, const float* s, size_t n) noexcept nogil
    void first_row_f64 "sparsembed_first_row_f64"(double* d, const double* s, size_t n) noexcept nogil
    void add_row_f32 "sparsembed_add_row_f32"(float* d, const float* s, size_t n) noexcept nogil
    void add_row_f64 "sparsembed_add_row_f64"(double* d, const double* s, size_t n) noexcept nogil


# the last-level cache size, read here once holding the GIL: pool_read_once_flags (_simd.pxd)
# reads it again inside parallel regions
llc_bytes()


def simd_level():
    """The SIMD level the row sums run at: 0 baseline, 1 AVX2, 2 AVX-512F (this
    module's own; ``_bag`` has another, both capped by SPARSEMBED_SIMD)."""
    return pool_level()


def set_simd_level(int level):
    """Run the row sums at ``level`` (capped at what the CPU supports); returns the
    level now in use. For tests: every level gives the same bits."""
    return pool_set_level(level)

def set_last_level_cache_bytes(int64_t nbytes):
    """For tests: this module's kernels take the last-level cache to be ``nbytes``
    (0: read it again); returns the size now in use."""
    return checked_set_llc_bytes(nbytes)


cdef void _sum_all(
    const floating* grad, int64_t n_grad, int64_t dim, const int64_t* perm,
    const floating* weights, const int64_t* starts, const int64_t* rows, int64_t n_rows,
    bint scale_by_count, floating* out, int64_t zero_upto, int n_threads, bint stream,
) noexcept nogil:
    """Sum each segment of the plan from zero, in plan order (= input order), into
    ``out[rows[u]]`` (or ``out[u]`` when ``rows`` is NULL), each grad row times
    ``weights[k]`` unless ``weights`` is NULL, divided by its count with
    ``scale_by_count``; with ``zero_upto >= 0`` (a dense output in unzeroed memory)
    also zero every other row below it, so one pass writes each row once.

    The segments are split into 16 blocks per thread with about the same number of
    grad rows each (a Zipf batch has a few very long segments), each thread claiming
    the next block as it comes free (a worker that wakes late leaves its blocks to
    the others; a parallel block, not a prange, has no start barrier: see _spin.h,
    se_claim). Each segment is one bag of the SIMD pooling of ``_simd_pool.h`` (ids:
    plan positions, table: ``grad``), whose sums stay in vector registers. Each row
    is summed by one thread in input order: the result does not depend on the
    thread count. ``stream``: write ``out`` with non-temporal stores (a large
    output, not read back soon)."""
    cdef int64_t T = max(1, min(n_threads, n_rows))
    cdef int64_t n_blocks = claimed_parts(n_rows, T)
    cdef long long next_block = 0
    with parallel(num_threads=T):
        _sum_claimed(grad, n_grad, dim, perm, weights, starts, rows, n_rows, scale_by_count,
                     out, zero_upto, stream, &next_block, n_blocks, T)


cdef void _sum_claimed(
    const floating* grad, int64_t n_grad, int64_t dim, const int64_t* perm,
    const floating* weights, const int64_t* starts, const int64_t* rows, int64_t n_rows,
    bint scale_by_count, floating* out, int64_t zero_upto, bint stream,
    long long* next_block, int64_t n_blocks, int64_t n_threads,
) noexcept nogil:
    """One thread's part of :func:`_sum_all`: blocks claimed from ``next_block``
    (shared by the team, from 0) until all ``n_blocks`` are taken."""
    cdef int64_t c = claim_part(next_block, n_blocks, n_threads)
    while c < n_blocks:
        _sum_block(grad, n_grad, dim, perm, weights, starts, rows, n_rows, scale_by_count,
                   out, zero_upto, stream, c, n_blocks)
        c = claim_part(next_block, n_blocks, n_threads)


cdef void _sum_block(
    const floating* grad, int64_t n_grad, int64_t dim, const int64_t* perm,
    const floating* weights, const int64_t* starts, const int64_t* rows, int64_t n_rows,
    bint scale_by_count, floating* out, int64_t zero_upto, bint stream, int64_t t,
    int64_t T,
) noexcept nogil:
    """Block t of T of :func:`_sum_all`."""
    cdef int64_t ahead = prefetch_distance(dim * sizeof(floating))
    cdef int flags = ((SE_MEAN if scale_by_count else 0) | (SE_STREAM if stream else 0)
                      | pool_read_once_flags(n_grad * dim * sizeof(floating)))
    cdef pool_table fns = pool_table_at(pool_level())
    cdef int64_t u_lo, u_hi, gaps_from
    if zero_upto >= 0:
        # every output row is written: balance the entries and the rows
        u_lo = block_start_spanned(starts, rows, n_rows, zero_upto, T, t, ENTRY_COST, ROW_COST)
        u_hi = block_start_spanned(starts, rows, n_rows, zero_upto, T, t + 1, ENTRY_COST,
                                   ROW_COST)
    else:
        u_lo = block_start(starts, n_rows, T, t)
        u_hi = block_start(starts, n_rows, T, t + 1)
    gaps_from = u_lo
    if zero_upto >= 0 and pool_stages(out, dim * sizeof(floating), flags):
        # rows summed through a stage (not whole lines, or divided): the pooling
        # zeroes each gap just before the row after it, so that the lines they share
        # go out whole; only the rows after the last one are left to zero_gaps
        flags = flags | SE_ZERO_GAPS
        gaps_from = u_hi
    if zero_upto >= 0:
        zero_gaps(out, dim, rows, gaps_from, u_hi, zero_upto if t == T - 1 else -1, stream)
    pool_sum(&fns, grad, n_grad, dim, perm, starts[n_rows], starts, u_lo, u_hi, -1, weights,
             ahead, flags, out, rows, NULL)


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
        _sum_all(&grad[0, 0], grad.shape[0], dim, &perm[0], <const floating*> NULL,
                 &starts[0], &rows[0], n_rows, scale_by_count, &out[0, 0], -1, n_threads,
                 False)


def dense_backward_fill(
    const floating[:, ::1] grad,     # IN (n, dim) grad_output rows
    const int64_t[::1] perm,         # IN (m,) plan permutation
    const int64_t[::1] rows,         # IN (U,) distinct rows
    const int64_t[::1] starts,       # IN (U + 1,) segment bounds into perm
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (num_embeddings, dim), any content
    int n_threads,
    bint stream=False,               # IN write out with non-temporal stores
    const floating[::1] weights=None,  # IN (m,) factor of each plan entry's grad row
):
    """:func:`dense_backward` into an uninitialised ``out``: the rows no id touches
    are zeroed in the same pass, so ``out`` need not be zero-filled first. With
    ``stream`` every row is written once with non-temporal stores (a large table:
    its lines are not read before they are written). ``weights``: each plan entry's
    grad row is multiplied by its weight before it is added (EmbeddingBag's
    per-sample weights and mean factors; ``perm`` then holds each entry's bag)."""
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef int64_t num_rows = out.shape[0]
    cdef int64_t T = max(1, min(n_threads, num_rows))
    cdef int64_t t
    cdef const floating* w = _weights(weights, perm.shape[0])
    if num_rows == 0 or dim == 0:
        return
    with nogil:
        if n_rows == 0:
            # nothing to sum: every thread zeroes its share of the rows
            for t in prange(T, schedule="static", num_threads=T):
                zero_rows(&out[0, 0], dim, num_rows * t // T, num_rows * (t + 1) // T, stream)
                if stream:
                    stream_fence()
        else:
            _sum_all(&grad[0, 0], grad.shape[0], dim, &perm[0], w, &starts[0], &rows[0],
                     n_rows, scale_by_count, &out[0, 0], num_rows, n_threads, stream)


def dense_backward_scatter(
    const floating[:, ::1] grad,     # IN (n, dim) grad_output rows, in id order
    const index_t[::1] idx,          # IN (n,) ids, checked here against out's rows
    int64_t skip_row,                # IN an id whose row gets no gradient (padding), or -1
    floating[:, ::1] out,            # OUT (num_rows, dim), any content: line-aligned rows
    int n_threads,
):
    """The dense gradient ``out[r] = sum of grad[i] over the i with idx[i] == r`` (zero
    for rows no id names and for ``skip_row``), without a row plan: each thread owns
    a range of rows (whole 64-row words of a bitmap of the rows seen), reads every
    id in order and adds the grad rows of its own rows into ``out``. A row's first
    grad row goes out with non-temporal stores (as ``0 + g``: the bits of the
    pooling's sum from zero), the rows after it are added in place; then the rows
    none touched are zeroed with non-temporal stores. Each row is summed in input
    order by one thread, as the planned kernels sum it: the same bits, for every
    thread count.

    Why: the planned dense backward sorts the ids first and then reads the grad
    rows in sorted order, at random; here they are read in order (the hardware
    prefetcher streams them) and only the output rows are written at random, with
    whole-line streamed stores that read nothing. Measurements and where the
    caller uses it: ``_cpu.SCATTER_MAX_ROW_BYTES``. Every thread reads every id
    (n_threads x n reads): for a few threads. Tried and dropped: a first pass
    marking the rows more than one id names, whose first row then went out with
    plain stores (cached for the adds that follow): 5-8% slower, uniform and Zipf.

    For rows of whole 64-byte lines in a line-aligned ``out`` (the caller checks):
    a streamed store of part of a line would be slower than a plain one. Returns -1,
    or the first position whose id is outside ``[0, num_rows)`` (``out`` is then
    garbage).
    """
    cdef int64_t n = idx.shape[0]
    cdef int64_t num_rows = out.shape[0]
    cdef int64_t dim = out.shape[1]
    cdef int64_t n_words = (num_rows + 63) // 64
    cdef int64_t T = max(1, min(n_threads, n_words))
    cdef int64_t bad = -1
    cdef int64_t t
    cdef uint64_t* seen
    if grad.shape[0] != n or grad.shape[1] != dim:
        raise ValueError(f"grad must be ({n}, {dim}), got ({grad.shape[0]}, {grad.shape[1]})")
    if num_rows == 0 or dim == 0:
        # nothing to write: only the ids to check
        for t in range(n):
            if <uint64_t> idx[t] >= <uint64_t> num_rows:
                return t
        return -1
    if (dim * sizeof(floating)) % 64 or (<size_t> &out[0, 0]) % 64:
        raise ValueError("dense_backward_scatter needs line-aligned rows of whole lines")
    seen = <uint64_t*> malloc(n_words * sizeof(uint64_t))
    if seen == NULL:
        raise MemoryError()
    try:
        with nogil:
            for t in prange(T, schedule="static", num_threads=T):
                _scatter_owned(&grad[0, 0] if n > 0 else NULL, &idx[0] if n > 0 else NULL, n,
                               skip_row, &out[0, 0], num_rows, dim, seen,
                               n_words * t // T, n_words * (t + 1) // T,
                               &bad if t == 0 else NULL)
    finally:
        free(seen)
    return bad


cdef void _scatter_owned(
    const floating* grad, const index_t* idx, int64_t n, int64_t skip_row, floating* out,
    int64_t num_rows, int64_t dim, uint64_t* seen, int64_t w_lo, int64_t w_hi,
    int64_t* bad,
) noexcept nogil:
    """One thread's part of :func:`dense_backward_scatter`: the rows of bitmap words
    ``[w_lo, w_hi)``; ``bad`` (one thread's) gets the first id out of range."""
    cdef int64_t lo = w_lo * 64
    cdef int64_t hi = min(w_hi * 64, num_rows)
    cdef size_t row_bytes = dim * sizeof(floating)
    cdef int64_t i, r, s
    cdef uint64_t bit, word
    cdef floating* o
    cdef const floating* g
    if w_hi <= w_lo:
        return
    memset(seen + w_lo, 0, (w_hi - w_lo) * sizeof(uint64_t))
    for i in range(n):
        r = <int64_t> idx[i]
        if r < lo or r >= hi or r == skip_row:
            if bad != NULL and bad[0] < 0 and <uint64_t> r >= <uint64_t> num_rows:
                bad[0] = i
            continue
        o = out + r * dim
        g = grad + i * dim
        bit = (<uint64_t> 1) << (r & 63)
        if seen[r >> 6] & bit:
            if floating is float:
                add_row_f32(o, g, dim)
            else:
                add_row_f64(o, g, dim)
        else:
            seen[r >> 6] |= bit
            if floating is float:
                first_row_f32(o, g, dim)
            else:
                first_row_f64(o, g, dim)
    # the rows no id touched, in runs
    r = lo
    while r < hi:
        while r < hi and (seen[r >> 6] >> (r & 63)) & 1:
            r += 1
        s = r
        while r < hi:
            word = seen[r >> 6]
            if (r & 63) == 0 and word == 0 and r + 64 <= hi:
                r += 64
            elif (word >> (r & 63)) & 1:
                break
            else:
                r += 1
        if r > s:
            stream_zero(out + s * dim, (r - s) * row_bytes)
    stream_fence()


def row_sums(
    const floating[:, ::1] grad,     # IN (n, dim)
    const int64_t[::1] perm,         # IN (m,)
    const int64_t[::1] starts,       # IN (U + 1,)
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (U, dim), one row per distinct id
    int n_threads,
    bint stream=False,               # IN write out with non-temporal stores
    const floating[::1] weights=None,  # IN (m,) factor of each plan entry's grad row
):
    """``out[u] = sum(grad[perm[starts[u]:starts[u+1]]])`` (/ count), each row summed
    from zero in plan order (= input order) by the SIMD pooling of ``_simd_pool.h``:
    a segment is a bag whose ids are plan positions and whose table is ``grad``.
    Its sums stay in vector registers (AVX-512: a 1 KiB row in 16 of them) instead
    of being added into ``out`` one row at a time. ``weights``: as for
    :func:`dense_backward_fill`."""
    cdef int64_t n_rows = out.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef const floating* w = _weights(weights, perm.shape[0])
    if n_rows == 0 or dim == 0:
        return
    with nogil:
        _sum_all(&grad[0, 0], grad.shape[0], dim, &perm[0], w, &starts[0], NULL, n_rows,
                 scale_by_count, &out[0, 0], -1, n_threads, stream)


cdef const floating* _weights(const floating[::1] weights, int64_t m) except? NULL:
    """The weights' data (NULL when None or empty), checked to hold one per plan entry."""
    if weights is None or weights.shape[0] == 0:
        return NULL
    if weights.shape[0] != m:
        raise ValueError(f"weights holds {weights.shape[0]} entries, the plan {m}")
    return &weights[0]


def fill_row_csr(
    const int64_t[::1] rows,   # IN (U,) sorted distinct rows
    int64_t num_rows,          # IN number of rows of the matrix
    index_t[::1] indptr,       # OUT (num_rows + 1,)
    index_t[::1] indices,      # OUT (U * dim,), or (0,): not written
    int64_t dim,
    int n_threads,
    bint stream=False,         # IN write indices with non-temporal stores
):
    """CSR structure of a matrix whose non-empty rows are ``rows``, each full. An
    empty ``indices`` leaves the column indices to the caller (a shared array of
    them: see ``sparsembed._rowsparse.column_indices``)."""
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef index_t* pattern = NULL
    cdef bint fill = _fills_indices(indices.shape[0], n_rows, dim, num_rows, indptr.shape[0])
    if stream and fill and n_rows > 0 and dim > 0:
        pattern = <index_t*> malloc(T * dim * sizeof(index_t))
        if pattern == NULL:
            raise MemoryError()
    cdef long long next_block = 0
    cdef int64_t n_blocks = claimed_parts(num_rows + 1, T)
    try:
        # one parallel region: the row pointer and the column indices are separate
        # writes, so each block does its share of both without waiting
        with nogil, parallel(num_threads=T):
            _csr_claimed(&rows[0] if n_rows > 0 else NULL, n_rows, num_rows, &indptr[0],
                         &indices[0] if fill and n_rows * dim > 0 else NULL, dim,
                         pattern + omp_get_thread_num() * dim if pattern != NULL else NULL,
                         &next_block, n_blocks, T)
    finally:
        free(pattern)


cdef bint _fills_indices(int64_t n_indices, int64_t n_rows, int64_t dim, int64_t num_rows,
                         int64_t n_indptr) except -1:
    """Whether the csr kernels write the column indices (``indices`` holds U * dim
    entries) or leave them (it is empty); ValueError for any other length, or a row
    pointer that is not num_rows + 1 long."""
    if n_indptr != num_rows + 1 or (n_indices != n_rows * dim and n_indices != 0):
        raise ValueError("indptr and indices must hold num_rows + 1 and U * dim (or no) "
                         "entries")
    return n_indices > 0


cdef inline void _fill_run(index_t* dst, int64_t lo, int64_t hi, index_t value,
                           int64_t end) noexcept nogil:
    """dst[lo:hi] = value (lo < hi), where dst[hi:end] is written after it by the
    same thread. Whole blocks of 8 entries from lo while they end by ``end``: their
    stores past hi are overwritten by the runs that follow, and a run of a few
    entries (a dense set of ids: ~4 rows a gap) takes no loop exit to mispredict
    (the row pointer of 230,000 rows out of 10^6: 3.1 -> 0.69 ms on one thread,
    2.0 -> 0.43 ms on two)."""
    cdef index_t block[8]
    cdef int64_t r, j
    if lo + ((hi - lo + 7) // 8) * 8 > end:
        for r in range(lo, hi):
            dst[r] = value
        return
    for j in range(8):
        block[j] = value
    memcpy(&dst[lo], block, sizeof(block))
    r = lo + 8
    while r < hi:
        memcpy(&dst[r], block, sizeof(block))
        r = r + 8


cdef void _csr_claimed(
    const int64_t* rows, int64_t n_rows, int64_t num_rows, index_t* indptr,
    index_t* indices, int64_t dim, index_t* mine, long long* next_block, int64_t n_blocks,
    int64_t n_threads,
) noexcept nogil:
    """One thread's part of the csr structure of :func:`fill_row_csr`: blocks claimed
    from ``next_block`` (shared by the team, from 0), as the row sums' (_sum_all);
    ``mine``: NULL for plain stores, else this thread's row of dim column numbers
    (streamed stores)."""
    cdef int64_t c = claim_part(next_block, n_blocks, n_threads)
    while c < n_blocks:
        _csr_block(rows, n_rows, num_rows, indptr, indices, dim, mine, c, n_blocks)
        c = claim_part(next_block, n_blocks, n_threads)


cdef void _csr_block(
    const int64_t* rows, int64_t n_rows, int64_t num_rows, index_t* indptr,
    index_t* indices, int64_t dim, index_t* mine, int64_t t, int64_t T,
) noexcept nogil:
    """Part t of T of the csr structure of :func:`fill_row_csr`: a t-th of the row
    pointer's entries and of the stored rows' column indices; ``mine``: NULL for
    plain stores, else room for a row of column numbers (streamed stores)."""
    cdef int64_t u, j, lo, hi, u_hi
    cdef int64_t r_lo = (num_rows + 1) * t // T, r_hi = (num_rows + 1) * (t + 1) // T
    # indptr[r] = dim * #(rows < r), filled one gap between stored rows at a time.
    # Parts are cut by entries, not by stored rows: ids crowded at one end of the
    # table (a vocabulary sorted by frequency) left one part the whole rest of it
    if r_hi > r_lo:
        u_hi = first_at_least(rows, n_rows, r_hi)
        lo = r_lo
        for u in range(first_at_least(rows, n_rows, r_lo), u_hi):
            hi = rows[u] + 1  # <= r_hi
            _fill_run(indptr, lo, hi, <index_t> (u * dim), r_hi)
            lo = hi
        if lo < r_hi:
            _fill_run(indptr, lo, r_hi, <index_t> (u_hi * dim), r_hi)
    if dim == 0 or indices == NULL:
        return
    if mine != NULL:
        # one row of column numbers per thread, streamed into every stored row
        for j in range(dim):
            mine[j] = <index_t> j
        for u in range(n_rows * t // T, n_rows * (t + 1) // T):
            stream_row(&indices[u * dim], mine, dim * sizeof(index_t))
        stream_fence()
    else:
        for u in range(n_rows * t // T, n_rows * (t + 1) // T):
            for j in range(dim):
                indices[u * dim + j] = <index_t> j


def sparse_row_grad(
    const floating[:, ::1] grad,     # IN (n, dim) grad_output rows
    const int64_t[::1] perm,         # IN (m,) plan permutation
    const int64_t[::1] starts,       # IN (U + 1,) segment bounds into perm
    const int64_t[::1] rows,         # IN (U,) sorted distinct rows
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (U, dim) row sums: the csr's data
    int64_t num_rows,                # IN number of rows of the matrix
    index_t[::1] indptr,             # OUT (num_rows + 1,)
    index_t[::1] indices,            # OUT (U * dim,), or (0,): not written
    int n_threads,
    bint stream_sums=False,          # IN write out with non-temporal stores
    bint stream_indices=False,       # IN write indices with non-temporal stores
    const floating[::1] weights=None,  # IN (m,) as for dense_backward_fill
):
    """:func:`row_sums` and :func:`fill_row_csr` of a canonical row-sparse gradient in
    one parallel region (one wake-up of the waiting threads, not two): each thread
    sums the blocks of segments it claims, then writes the blocks of the csr
    structure it claims (an empty ``indices``: the row pointer only, as for
    :func:`fill_row_csr`)."""
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef int t
    cdef long long next_sum = 0, next_csr = 0
    cdef int64_t n_sum_blocks = claimed_parts(n_rows, T)
    cdef int64_t n_csr_blocks = claimed_parts(num_rows + 1, T)
    cdef index_t* pattern = NULL
    cdef const floating* w = _weights(weights, perm.shape[0])
    if out.shape[0] != n_rows or starts.shape[0] != n_rows + 1:
        raise ValueError("out and starts must match rows")
    cdef bint fill = _fills_indices(indices.shape[0], n_rows, dim, num_rows, indptr.shape[0])
    if stream_indices and fill and n_rows > 0 and dim > 0:
        pattern = <index_t*> malloc(T * dim * sizeof(index_t))
        if pattern == NULL:
            raise MemoryError()
    try:
        with nogil, parallel(num_threads=T):
            t = omp_get_thread_num()
            if n_rows > 0 and dim > 0:
                _sum_claimed(&grad[0, 0], grad.shape[0], dim, &perm[0], w, &starts[0], NULL,
                             n_rows, scale_by_count, &out[0, 0], -1, stream_sums, &next_sum,
                             n_sum_blocks, T)
            _csr_claimed(&rows[0] if n_rows > 0 else NULL, n_rows, num_rows, &indptr[0],
                         &indices[0] if fill and n_rows * dim > 0 else NULL, dim,
                         pattern + t * dim if pattern != NULL else NULL, &next_csr,
                         n_csr_blocks, T)
    finally:
        free(pattern)


def rows_hold_all(
    const index_t[::1] indptr,   # IN (num_rows + 1,) a csr row pointer
    const int64_t[::1] rows,     # IN (U,) row ids
):
    """Whether ``indptr`` starts at 0 and gives each of ``rows`` at least one entry,
    their lengths adding up to ``indptr[-1]`` (so no other row holds any): the O(U)
    check that a gradient's cached row list still describes its row pointer. False
    for a row outside ``[0, len(indptr) - 1)``. One pass in C: the same check in
    numpy cost ~4 us of a 20 us optimizer step on a small batch."""
    if indptr.shape[0] == 0:
        return False
    return _rows_hold_all(&indptr[0], indptr.shape[0],
                          &rows[0] if rows.shape[0] > 0 else NULL, rows.shape[0])


cdef bint _rows_hold_all(const index_t* indptr, int64_t n, const int64_t* rows,
                         int64_t n_rows) noexcept nogil:
    cdef int64_t u, r, length, total = 0
    if indptr[0] != 0:
        return False
    for u in range(n_rows):
        r = rows[u]
        if r < 0 or r + 1 >= n:
            return False
        length = <int64_t> indptr[r + 1] - <int64_t> indptr[r]
        if length <= 0:
            return False
        total += length
    return total == indptr[n - 1]


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
    cdef int64_t x, y, take_a, take_b
    if rows.shape[0] < na + nb or from_a.shape[0] < na + nb or from_b.shape[0] < na + nb:
        raise ValueError(f"merge_rows: outputs hold {min(rows.shape[0], from_a.shape[0], from_b.shape[0])}"
                         f" rows, need {na + nb}")
    with nogil:
        # without a branch on which side is smaller: two interleaved row lists make
        # it a coin flip, mispredicted half the time (246,000 rows: 2.6 ms before)
        while i < na and j < nb:
            x = rows_a[i]
            y = rows_b[j]
            take_a = x <= y
            take_b = y <= x
            rows[k] = x if take_a else y
            from_a[k] = (i + 1) * take_a - 1
            from_b[k] = (j + 1) * take_b - 1
            i += take_a
            j += take_b
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


# Elements summed per buffer by add_dense before they are streamed out: two (1e6,
# 64) float32 gradients on 2 threads (Intel Xeon VM), 256 or 512 a buffer 23 ms,
# 2,048 24, 8,192 25; plain stores 28, numpy's a + b (one thread, new pages) 80
DEF ADD_CHUNK = 512


def add_dense(
    const floating[::1] a,           # IN (n,) a dense gradient, flat
    const floating[::1] b,           # IN (n,)
    floating[::1] out,               # OUT (n,), a new array
    int n_threads,
    bint stream=False,               # IN write out with non-temporal stores
):
    """``out = a + b``, one addition per element (the bits of numpy's ``a + b``), on
    ``n_threads`` threads: the sum of two dense gradients of a table's size (a layer's
    gradients accumulated over backward calls). ``stream``: a large output goes out
    past the caches, through a buffer per thread."""
    cdef int64_t n = out.shape[0]
    cdef int64_t T = max(1, min(n_threads, n // ADD_CHUNK + 1))
    cdef int64_t t
    cdef floating* bufs = NULL
    if a.shape[0] != n or b.shape[0] != n:
        raise ValueError(f"a, b and out must hold as many elements, got {a.shape[0]}, "
                         f"{b.shape[0]} and {n}")
    if n == 0:
        return
    if stream:
        bufs = <floating*> malloc(T * ADD_CHUNK * sizeof(floating))
        if bufs == NULL:
            raise MemoryError()
    try:
        with nogil:
            for t in prange(T, schedule="static", num_threads=T):
                # whole lines to each thread (of a line-aligned out)
                _add_range(&a[0], &b[0], &out[0], _line_start(n, t, T, sizeof(floating)),
                           _line_start(n, t + 1, T, sizeof(floating)),
                           bufs + t * ADD_CHUNK if stream else NULL)
    finally:
        free(bufs)


def zero_fill(
    floating[::1] out,               # OUT (n,) a dense gradient, flat
    int n_threads,
    bint stream=False,               # IN write out with non-temporal stores
):
    """``out[:] = 0`` on ``n_threads`` threads, each a range of whole lines: a dense
    gradient zeroed in place (``zero_grad(set_to_none=False)``)."""
    cdef int64_t n = out.shape[0]
    cdef int64_t T = max(1, min(n_threads, n // ADD_CHUNK + 1))
    cdef int64_t t
    if n == 0:
        return
    with nogil:
        for t in prange(T, schedule="static", num_threads=T):
            zero_rows(&out[0], 1, _line_start(n, t, T, sizeof(floating)),
                      _line_start(n, t + 1, T, sizeof(floating)), stream)
            if stream:
                stream_fence()


cdef inline int64_t _line_start(int64_t n, int64_t t, int64_t T, size_t itemsize) noexcept nogil:
    """Where thread t of T starts on n elements: a multiple of a 64-byte line's worth."""
    cdef int64_t per_line = 64 // itemsize
    if t >= T:
        return n
    return min(n, (n // per_line) * t // T * per_line)


cdef void _add_range(const floating* a, const floating* b, floating* out, int64_t lo,
                     int64_t hi, floating* buf) noexcept nogil:
    """Elements [lo, hi) of :func:`add_dense`; streamed through ``buf`` (ADD_CHUNK
    entries) unless it is NULL."""
    cdef int64_t i, j, m
    if buf == NULL:
        for i in range(lo, hi):
            out[i] = a[i] + b[i]
        return
    i = lo
    while i < hi:
        m = min(ADD_CHUNK, hi - i)
        for j in range(m):
            buf[j] = a[i + j] + b[i + j]
        stream_row(out + i, buf, m * sizeof(floating))
        i += m
    stream_fence()


def add_merged_rows(
    const floating[:, ::1] values_a,  # IN (Ua, dim)
    const floating[:, ::1] values_b,  # IN (Ub, dim)
    const int64_t[::1] from_a,        # IN (n,) row of values_a for out[i], or -1
    const int64_t[::1] from_b,        # IN (n,) row of values_b for out[i], or -1
    floating[:, ::1] out,             # OUT (n, dim)
    int n_threads,
    bint stream=False,                # IN write out with non-temporal stores
):
    """``out[i] = values_a[from_a[i]] + values_b[from_b[i]]``, a missing term left out
    (so a row held by one side only is copied bit for bit, -0.0 included).

    The caller guarantees from_a / from_b hold valid rows or -1, never both -1.
    ``stream``: a large output goes out past the caches (each sum through a row
    buffer per thread), as the sparse backward's row sums do."""
    cdef int64_t n = out.shape[0], dim = out.shape[1]
    cdef int64_t T = max(1, min(n_threads, n))
    cdef int64_t t
    cdef floating* bufs = NULL
    if dim == 0 or n == 0:
        return
    if stream:
        bufs = <floating*> malloc(T * dim * sizeof(floating))
        if bufs == NULL:
            raise MemoryError()
    try:
        with nogil:
            for t in prange(T, schedule="static", num_threads=T):
                _add_rows(&values_a[0, 0] if values_a.shape[0] > 0 else NULL,
                          &values_b[0, 0] if values_b.shape[0] > 0 else NULL,
                          &from_a[0], &from_b[0], &out[0, 0], dim, n * t // T,
                          n * (t + 1) // T, bufs + t * dim if stream else NULL)
    finally:
        free(bufs)


cdef void _add_rows(
    const floating* values_a, const floating* values_b, const int64_t* from_a,
    const int64_t* from_b, floating* out, int64_t dim, int64_t lo, int64_t hi,
    floating* buf,
) noexcept nogil:
    """Rows [lo, hi) of :func:`add_merged_rows`; streamed through ``buf`` (dim
    entries) unless it is NULL."""
    cdef int64_t i, j, ia, ib
    cdef size_t row_bytes = dim * sizeof(floating)
    cdef floating* dst
    cdef floating* sum_to
    cdef const floating* src
    for i in range(lo, hi):
        ia = from_a[i]
        ib = from_b[i]
        dst = out + i * dim
        if ia >= 0 and ib >= 0:
            # the sum goes to its row, or to the buffer that is then streamed there
            sum_to = dst if buf == NULL else buf
            for j in range(dim):
                sum_to[j] = values_a[ia * dim + j] + values_b[ib * dim + j]
            src = sum_to
        else:
            src = (values_a + ia * dim) if ia >= 0 else (values_b + ib * dim)
        if buf != NULL:
            stream_row(dst, src, row_bytes)
        elif src != dst:
            copy_row(dst, src, row_bytes)
    if buf != NULL:
        stream_fence()
