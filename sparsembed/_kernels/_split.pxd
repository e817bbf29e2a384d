# Work-balanced split of a row plan's segments between threads, shared by every
# kernel that sums rows segment by segment. A Zipf batch has a few segments holding
# a fifth of the entries, so splitting by segment count leaves one thread most of
# the work; block t instead ends where about (t + 1) / T of the entries do (with
# block_start_costed, of the entries plus a fixed cost per segment: the fused
# optimizer update also updates one table row per segment). Each segment still
# goes to exactly one thread, so results do not depend on T.

from libc.stdint cimport int64_t

from sparsembed._kernels._types cimport index_t


cdef inline int64_t block_start(
    const int64_t* starts,     # IN (n_rows + 1,) segment bounds, starts[n_rows] = m
    int64_t n_rows,
    int64_t T,                 # IN number of blocks
    int64_t t,                 # IN a block, 0 <= t <= T
) noexcept nogil:
    """First segment of block t (n_rows for t == T): block t holds the segments
    ``block_start(t) .. block_start(t + 1) - 1``. Returned, not written through a
    pointer: Cython makes a variable private to a prange thread only when it sees
    it assigned."""
    return block_start_costed(starts, n_rows, T, t, 0)


cdef inline int64_t block_start_costed(
    const int64_t* starts,     # IN (n_rows + 1,) segment bounds, starts[0] = 0
    int64_t n_rows,
    int64_t T,                 # IN number of blocks
    int64_t t,                 # IN a block, 0 <= t <= T
    int64_t row_cost,          # IN work of one segment besides its entries, in entries
) noexcept nogil:
    """:func:`block_start` when each segment also costs ``row_cost`` entries' worth
    of work of its own (an optimizer update of its row): the blocks hold about the
    same ``entries + row_cost * segments`` each. On a Zipf batch a split by entries
    alone gives one thread the few long segments and the other nearly every row
    update."""
    cdef int64_t lo = 0, hi = n_rows, mid, target
    if t <= 0:
        return 0
    if t >= T:
        return n_rows
    target = ((starts[n_rows] + row_cost * n_rows) * t) // T
    # first u with starts[u] + row_cost * u >= target (the cost is increasing in u)
    while lo < hi:
        mid = (lo + hi) >> 1
        if starts[mid] + row_cost * mid < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline int64_t block_start_spanned(
    const int64_t* starts,     # IN (n_rows + 1,) segment bounds, starts[0] = 0
    const int64_t* rows,       # IN (n_rows,) the segments' sorted distinct rows
    int64_t n_rows,
    int64_t num_rows,          # IN rows of the dense output, > rows[n_rows - 1]
    int64_t T,                 # IN number of blocks
    int64_t t,                 # IN a block, 0 <= t <= T
    int64_t entry_cost,        # IN work of one entry (a grad row read)
    int64_t row_cost,          # IN work of one output row (written, summed or zeroed)
) noexcept nogil:
    """:func:`block_start` for a dense output whose every row is written: block t
    also writes the rows between its segments, so blocks hold about the same
    ``entry_cost * entries + row_cost * output rows`` each. Split by entries alone, a
    Zipf batch whose hot rows sit low in the table left one thread most of the
    zero-filling (D = 64: 8.6 ms against 7.6 on uniform ids)."""
    cdef int64_t lo = 0, hi = n_rows, mid, target
    if t <= 0:
        return 0
    if t >= T:
        return n_rows
    target = ((starts[n_rows] * entry_cost + num_rows * row_cost) * t) // T
    # first u whose segments and rows below it reach the target (increasing in u)
    while lo < hi:
        mid = (lo + hi) >> 1
        if starts[mid] * entry_cost + rows[mid] * row_cost < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline int64_t first_at_least(const index_t* a, int64_t n, int64_t key) noexcept nogil:
    """First position of the sorted ``a[:n]`` whose value is >= ``key`` (n if none):
    also how many of them are below ``key``."""
    cdef int64_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo
