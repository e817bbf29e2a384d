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
