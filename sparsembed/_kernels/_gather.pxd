# The lookup's row copy, shared by the lookup (_lookup.gather) and the lookup that
# plans its ids on the side (_plan.gather_and_plan).

from cython cimport floating
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

from sparsembed._kernels._memory cimport (
    copy_row,
    gather_far_distance,
    gather_prefetch_distance,
    prefetch_line_l2,
    prefetch_row,
    stream_fence,
    stream_row,
)
from sparsembed._kernels._openmp_helpers cimport claim_part
from sparsembed._kernels._types cimport index_t


cdef inline int64_t first_hit(const int64_t* first, int64_t n_chunks) noexcept nogil:
    """The first chunk's hit (chunks in input order, -1 for none): the answer of a
    scan split into chunks, the same for every thread count."""
    cdef int64_t c
    for c in range(n_chunks):
        if first[c] >= 0:
            return first[c]
    return -1


cdef inline int64_t _gather_fixed(
    const floating* weight,   # (num_rows, dim), rows `stride` elements apart
    int64_t num_rows,
    const index_t* idx,
    int64_t lo,
    int64_t hi,
    int64_t dim,
    floating* out,            # (n, dim)
    int64_t stride,
    int64_t pf_end,           # ids in [lo, pf_end) prefetch the row `ahead` ids on
    int64_t ahead,
    size_t row_bytes,         # a constant at each call: the copy is a move or two
) noexcept nogil:
    # gather_rows for rows of 4 to 32 bytes (bias tables, D = 1 to 8 floats) with
    # plain stores and no far prefetch: no per-id branch on the width (copy_row's
    # switch), the streaming or the prefetch. AMD EPYC (Zen 3), 262,144 ids, builds
    # alternated, ms at 1 / 2 threads: V = 1e5 float32 D = 1 1.04-1.18 / 0.66-0.68
    # -> 0.25-0.51 / 0.16-0.19 (np.take 0.30-0.53 on one), D = 2 1.42 / 0.58-0.81
    # -> 0.33-0.56 / 0.19-0.29, D = 4 1.88-1.94 / 0.66-1.05 -> 0.40 / 0.24-0.35, D =
    # 8 1.70-1.83 / 0.76-0.95 -> 0.54-0.84 / 0.29-0.47; V = 1e6 D = 1 1.78-1.83 /
    # 0.90-0.92 -> 0.44-0.66 / 0.28-0.30
    cdef int64_t i, r
    for i in range(lo, pf_end):
        prefetch_row(weight + idx[i + ahead] * stride, row_bytes)
        r = idx[i]
        if <uint64_t> r >= <uint64_t> num_rows:
            return i
        memcpy(out + i * dim, weight + r * stride, row_bytes)
    for i in range(pf_end, hi):
        r = idx[i]
        if <uint64_t> r >= <uint64_t> num_rows:
            return i
        memcpy(out + i * dim, weight + r * stride, row_bytes)
    return -1


cdef inline int64_t gather_rows(
    const floating* weight,   # (num_rows, dim), rows `stride` elements apart
    int64_t num_rows,
    const index_t* idx,
    int64_t lo,
    int64_t hi,
    int64_t dim,
    floating* out,            # (n, dim)
    bint stream,              # non-temporal stores (a large output)
    int64_t stride,           # elements from a row of weight to the next (>= dim)
) noexcept nogil:
    # returns -1, or the first i in [lo, hi) whose id is outside [0, num_rows) (no
    # row is read for it; the rows before it are copied)
    cdef size_t row_bytes = dim * sizeof(floating)
    cdef int64_t i, r, ahead = gather_prefetch_distance(row_bytes)
    cdef int64_t far = gather_far_distance(row_bytes, num_rows * stride * sizeof(floating))
    cdef int64_t pf_end
    cdef size_t base = <size_t> weight
    cdef size_t step = stride * sizeof(floating)
    # no row straddles two lines: each starts at a multiple of a width dividing 64,
    # or on the same spot of lines 64 bytes apart
    cdef bint whole = row_bytes > 0 and (
        (64 % row_bytes == 0 and base % row_bytes == 0 and step % row_bytes == 0)
        or (step % 64 == 0 and base % 64 + row_bytes <= 64))
    if 0 < row_bytes < 64 and (not whole or num_rows * step <= (1 << 20)):
        # rows narrower than a line that may straddle two, or of a table a core's L2
        # holds: no prefetch. The Intel Xeon VM, 262,144 ids, 2 threads, prefetched vs
        # not (ms): V = 1e5, D = 8 float32 at 16 bytes past a line 1.18 vs 0.72 (0.55
        # either way on line-aligned rows), D = 3 0.72 vs 0.51, D = 6 0.98 vs 0.63, D
        # = 12 1.27 vs 1.00, D = 1 (400 KB) 0.50 vs 0.31 but V = 1e6 (4 MB) 0.68 vs
        # 0.92; D = 16 (64 bytes) off a line 1.07 vs 1.29: those keep theirs
        ahead = hi - lo
    pf_end = hi - ahead
    cdef int64_t far_end = hi - far if far > 0 else lo
    if not stream and far_end <= lo and row_bytes <= 32 and row_bytes % 4 == 0:
        if pf_end < lo:
            pf_end = lo
        # one call per width, each a constant the copy is compiled for
        if row_bytes == 4:
            return _gather_fixed(weight, num_rows, idx, lo, hi, dim, out, stride, pf_end,
                                 ahead, 4)
        if row_bytes == 8:
            return _gather_fixed(weight, num_rows, idx, lo, hi, dim, out, stride, pf_end,
                                 ahead, 8)
        if row_bytes == 12:
            return _gather_fixed(weight, num_rows, idx, lo, hi, dim, out, stride, pf_end,
                                 ahead, 12)
        if row_bytes == 16:
            return _gather_fixed(weight, num_rows, idx, lo, hi, dim, out, stride, pf_end,
                                 ahead, 16)
        if row_bytes == 20:
            return _gather_fixed(weight, num_rows, idx, lo, hi, dim, out, stride, pf_end,
                                 ahead, 20)
        if row_bytes == 24:
            return _gather_fixed(weight, num_rows, idx, lo, hi, dim, out, stride, pf_end,
                                 ahead, 24)
        if row_bytes == 28:
            return _gather_fixed(weight, num_rows, idx, lo, hi, dim, out, stride, pf_end,
                                 ahead, 28)
        return _gather_fixed(weight, num_rows, idx, lo, hi, dim, out, stride, pf_end,
                             ahead, 32)
    # rows are read in random order: ask for row i + ahead while copying row i (a
    # prefetch never faults, even for an id still to be checked), into every cache
    # level: with prefetchnta (rows read once) the Intel Xeon VM's lookup took 1.6-2x
    # as long (262,144 ids, V = 1e6, 2 threads, builds alternated: D = 64 uniform
    # 7.2 against 3.6 ms, Zipf 3.0 / 1.9, D = 256 31.0 / 19.8, 12.7 / 7.0), where
    # the AMD EPYC had gained 5-15% from it (_memory.pxd)
    for i in range(lo, hi):
        if i < far_end:
            # a table past the LLC: the first line of a row further on, into L2
            prefetch_line_l2(weight + idx[i + far] * stride)
        if i < pf_end:
            prefetch_row(weight + idx[i + ahead] * stride, row_bytes)
        r = idx[i]
        if <uint64_t> r >= <uint64_t> num_rows:
            if stream:
                stream_fence()
            return i
        if stream:
            stream_row(out + i * dim, weight + r * stride, row_bytes)
        else:
            copy_row(out + i * dim, weight + r * stride, row_bytes)
    if stream:
        stream_fence()
    return -1


cdef inline void gather_claimed(
    const floating* weight,   # (num_rows, dim), rows `stride` apart; NULL for 0 rows
    int64_t num_rows,
    const index_t* idx,       # (n,)
    int64_t n,
    int64_t dim,
    floating* out,            # (n, dim)
    bint stream,
    index_t* keep,            # (n,) a copy of idx, or NULL
    int64_t* first,           # (n_ranges,) each range's gather_rows result
    long long* next_range,    # the team's claim counter, from 0
    int64_t n_ranges,         # claimed_parts(n, n_threads)
    int64_t n_threads,
    int64_t stride,           # elements from a row of weight to the next (>= dim)
) noexcept nogil:
    """A team member's share of a lookup in ranges claimed as it comes free: every
    thread of the parallel region calls it (see _lookup.gather)."""
    cdef int64_t c, lo, hi
    c = claim_part(next_range, n_ranges, n_threads)
    while c < n_ranges:
        lo = (n * c) // n_ranges
        hi = (n * (c + 1)) // n_ranges
        first[c] = gather_rows(weight, num_rows, idx, lo, hi, dim, out, stream, stride)
        if keep != NULL:
            memcpy(keep + lo, idx + lo, (hi - lo) * sizeof(index_t))
        c = claim_part(next_range, n_ranges, n_threads)
