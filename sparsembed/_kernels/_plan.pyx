"""Row plan of a batch: a stable sort of the ids, computed once per batch and reused
by renorm, counts, the backward passes and the optimizers.

The sort is a parallel LSD radix sort over contiguous chunks. A stable sort has one
answer, so the permutation is identical for every thread count, and each row's
occurrences stay in input order: later per-row sums run in a fixed order.
"""

from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memmove, memset

from sparsembed._kernels._openmp_helpers cimport (
    omp_get_num_threads,
    omp_get_thread_num,
    se_barrier,
    se_barrier_init,
    se_barrier_wait,
)
from sparsembed._kernels._split cimport block_start, first_at_least
from sparsembed._kernels._types cimport index_t


cdef extern from "_radix.h" nogil:
    void wc_put "sparsembed_wc_put"(uint64_t* lines, const uint32_t* first, uint32_t* slots,
                                    uint64_t b, uint64_t* dst, uint32_t align,
                                    uint64_t word) noexcept
    void wc_flush "sparsembed_wc_flush"(const uint64_t* lines, const uint32_t* first,
                                        const uint32_t* slots, int64_t n_buckets,
                                        uint64_t* dst, uint32_t align) noexcept
    uint32_t wc_align "sparsembed_wc_align"(const uint64_t* dst) noexcept
    void stream_fence "sparsembed_stream_fence"() noexcept

cdef enum:
    RADIX_BITS = 11
    RADIX = 2048   # 1 << RADIX_BITS


cdef inline int64_t _chunk_lo(int64_t n, int64_t n_chunks, int64_t c) noexcept nogil:
    return (n * c) // n_chunks


def argsort_rows(
    const index_t[::1] idx,    # IN (n,) validated ids in [0, num_rows)
    int64_t skip_row,          # IN an id to leave out (padding), or -1
    int64_t num_rows,          # IN exclusive upper bound of the ids
    int64_t[::1] keys_out,     # OUT (n,) sorted ids, first m valid
    int64_t[::1] perm_out,     # OUT (n,) positions in idx, first m valid
    int n_threads,
):
    """Stable sort of the ids other than ``skip_row``; returns their number m."""
    cdef int64_t n = idx.shape[0]
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef int64_t t, i, b, lo, hi, m, running, shift, d, pos
    cdef int64_t n_bits = 0
    cdef int64_t* counts = NULL
    cdef int64_t* hist = NULL
    cdef int64_t* tmp_keys = NULL
    cdef int64_t* tmp_perm = NULL
    cdef int64_t* src_k
    cdef int64_t* src_p
    cdef int64_t* dst_k
    cdef int64_t* dst_p
    cdef int64_t* swap
    if n == 0:
        return 0
    if T > n:
        T = n
    while (num_rows - 1) >> n_bits:
        n_bits += 1

    counts = <int64_t*> calloc(T + 1, sizeof(int64_t))
    hist = <int64_t*> malloc(T * RADIX * sizeof(int64_t))
    tmp_keys = <int64_t*> malloc(n * sizeof(int64_t))
    tmp_perm = <int64_t*> malloc(n * sizeof(int64_t))
    if counts == NULL or hist == NULL or tmp_keys == NULL or tmp_perm == NULL:
        free(counts); free(hist); free(tmp_keys); free(tmp_perm)
        raise MemoryError()
    try:
        with nogil:
            # 1. drop skip_row, keeping input order: count per chunk, then copy
            for t in prange(T, schedule="static", num_threads=T):
                lo = _chunk_lo(n, T, t)
                hi = _chunk_lo(n, T, t + 1)
                m = 0
                for i in range(lo, hi):
                    if idx[i] != skip_row:
                        m = m + 1
                counts[t + 1] = m
            for t in range(T):
                counts[t + 1] += counts[t]
            m = counts[T]
            for t in prange(T, schedule="static", num_threads=T):
                lo = _chunk_lo(n, T, t)
                hi = _chunk_lo(n, T, t + 1)
                pos = counts[t]
                for i in range(lo, hi):
                    if idx[i] != skip_row:
                        keys_out[pos] = idx[i]
                        perm_out[pos] = i
                        pos = pos + 1

            # 2. LSD radix passes, ping-ponging between the outputs and scratch
            src_k = &keys_out[0]
            src_p = &perm_out[0]
            dst_k = tmp_keys
            dst_p = tmp_perm
            shift = 0
            while shift < n_bits and m > 0:
                memset(hist, 0, T * RADIX * sizeof(int64_t))
                for t in prange(T, schedule="static", num_threads=T):
                    lo = _chunk_lo(m, T, t)
                    hi = _chunk_lo(m, T, t + 1)
                    for i in range(lo, hi):
                        d = (src_k[i] >> shift) & (RADIX - 1)
                        hist[t * RADIX + d] += 1
                running = 0
                for b in range(RADIX):
                    for t in range(T):
                        d = hist[t * RADIX + b]
                        hist[t * RADIX + b] = running
                        running = running + d
                for t in prange(T, schedule="static", num_threads=T):
                    lo = _chunk_lo(m, T, t)
                    hi = _chunk_lo(m, T, t + 1)
                    for i in range(lo, hi):
                        d = (src_k[i] >> shift) & (RADIX - 1)
                        pos = hist[t * RADIX + d]
                        hist[t * RADIX + d] = pos + 1
                        dst_k[pos] = src_k[i]
                        dst_p[pos] = src_p[i]
                swap = src_k; src_k = dst_k; dst_k = swap
                swap = src_p; src_p = dst_p; dst_p = swap
                shift = shift + RADIX_BITS

            if src_k != &keys_out[0]:
                for i in prange(m, schedule="static", num_threads=T):
                    keys_out[i] = src_k[i]
                    perm_out[i] = src_p[i]
    finally:
        free(counts); free(hist); free(tmp_keys); free(tmp_perm)
    return m


def segments(
    const int64_t[::1] sorted_keys,  # IN (m,) sorted ids
    int64_t[::1] rows_out,           # OUT (>= number of distinct ids,)
    int64_t[::1] starts_out,         # OUT (>= distinct + 1,) segment bounds
):
    """Distinct ids of a sorted array and where each one's run starts; returns their number."""
    cdef int64_t m = sorted_keys.shape[0]
    cdef int64_t i, u = 0
    with nogil:
        for i in range(m):
            if i == 0 or sorted_keys[i] != sorted_keys[i - 1]:
                rows_out[u] = sorted_keys[i]
                starts_out[u] = i
                u += 1
        starts_out[u] = m
    return u


# --------------------------------------------------------------------------------------
# The fast plan: ids and positions fit in 32 bits (num_rows <= 2**32, n < 2**32).
#
# Small key range (see build_plan): one counting sort -- per-thread histograms of the
# ids, a prefix sum that also yields the distinct rows and their segment starts, and
# one stable scatter, in one parallel region. Large key range: LSD radix sort of (id << 32 | position) words
# with balanced digits of at most 13 bits (two passes up to 2**26 rows), then one
# pass that splits the words into the positions and the segments. The radix sort
# runs in one parallel region: its passes wait for each other at a spinning barrier
# (_spin.h) rather than each starting a region (and waking the sleeping threads).
# Each thread sorts K contiguous sub-chunks of the input with a histogram each; when
# one digit holds more than 1/64 of the ids (skewed ids: a hot row), the K sub-chunks
# are scattered interleaved, so that the hot digit's slot counter is not one long
# chain of dependent increments. A stable sort has one answer: how the work is split
# (thread count, team size, K) never changes the result.
#
# Ids that arrive sorted (np.unique's output, an arange, a batch sorted for
# locality) are already their own plan: each thread checks its chunk while it
# counts, and when every chunk is sorted the radix passes are skipped.
#
# A regular pattern that is not sorted (a reversed or tiled arange) fills every
# bucket equally, so a scatter that stores word by word has its 1024 write streams
# advance in lockstep at addresses a multiple of 2 KiB apart, all in two of L1's
# sets (262,144 ids, V = 1e6, 2 threads: 2.7-3.1 ms against 1.6 ms for random ids).
# From WC_MIN_IDS ids on, the scatter of a batch without a hot digit collects each
# bucket's words in a line of its own and stores whole lines, streamed (_radix.h):
# 1.2-1.5 ms for those patterns, and random ids no slower: 1.6 ms alone, and
# faster inside a training step (262,144 uniform ids timed between a lookup and a
# backward, alternating builds: 2.0-2.5 -> 1.7 ms; streamed words probably leave
# the step's other arrays in the caches).

cdef enum:
    MAX_DIGIT_BITS = 13
    SUB_CHUNKS = 4       # K above
    SKEW_SHARE = 64      # a digit with more than 1/SKEW_SHARE of the ids is hot
    # from this many ids on, the scatter of ids that are not skewed goes through
    # write-combining lines (_radix.h). Below it the words of a pass stay in the
    # caches for the next one and plain word stores are faster. Measured, 2 threads,
    # plan of uniform ids, plain vs combined (ms): 65,536 ids over V = 1e5 / 1e6 /
    # 1e7 rows 0.58 / 0.57 / 0.68 vs 0.73 / 0.66 / 0.84; 131,072 ids 0.89 / 0.88 /
    # 1.12 vs 0.92 / 0.83 / 1.00; 262,144 ids 1.53 / 1.60 / 1.85 vs 1.65 / 1.57 /
    # 1.72; 4,194,304 ids over 1e6 rows 41 vs 25. A reversed arange (see above),
    # 262,144 ids over 1e6 rows: 2.66 vs 1.37.
    WC_MIN_IDS = 1 << 17


cdef inline int64_t _digit_bits(int64_t num_rows, int64_t* n_pass) noexcept nogil:
    """Balanced digits of at most MAX_DIGIT_BITS for ids below num_rows: returns the
    digit width, and the number of passes in n_pass."""
    cdef int64_t n_bits = 0
    while (num_rows - 1) >> n_bits:
        n_bits += 1
    n_pass[0] = (n_bits + MAX_DIGIT_BITS - 1) // MAX_DIGIT_BITS
    return (n_bits + n_pass[0] - 1) // n_pass[0]


cdef inline int64_t _wc_words(int64_t num_rows, int64_t n_threads) noexcept nogil:
    """uint64 words of each thread's write-combining lines and first slots (_radix.h),
    with room to align them to a line."""
    cdef int64_t n_pass
    cdef int64_t n_buckets = (<int64_t> 1) << _digit_bits(num_rows, &n_pass)
    return n_threads * n_buckets * 8 + (n_threads * n_buckets + 1) // 2 + 8


def segment_of_entries(
    const int64_t[::1] perm,     # IN (m,) plan permutation: distinct entry positions
    const int64_t[::1] starts,   # IN (U + 1,) segment bounds into perm
    int64_t[::1] out,            # INOUT (n,) entries not in the plan keep their value
    int n_threads,
):
    """``out[perm[k]] = u`` for every k of segment u: each planned entry's distinct
    row, as an index into the plan's rows (the float16 path's compact ids). Entries
    are distinct, so each is written once, by the thread of its segment; the
    segments are split between threads by their entries (``_split.block_start``:
    a Zipf batch's few long segments). ValueError, before any write, for segment
    bounds that are not an increasing range of ``perm`` or an entry outside ``out``."""
    cdef int64_t n_rows = starts.shape[0] - 1
    cdef int64_t n = out.shape[0]
    cdef int64_t u, k, t, u_lo, u_hi
    cdef int64_t T = max(1, min(n_threads, n_rows))
    if n_rows < 0:
        raise ValueError("starts must hold at least one bound")
    for u in range(n_rows):
        if not 0 <= starts[u] <= starts[u + 1] <= perm.shape[0]:
            raise ValueError(f"starts must be an increasing range of perm's "
                             f"{perm.shape[0]} entries, got {starts[u]}, {starts[u + 1]}")
    for k in range(starts[0] if n_rows > 0 else 0, starts[n_rows]):
        if not 0 <= perm[k] < n:
            raise ValueError(f"entry {perm[k]} at plan position {k} is outside [0, {n})")
    if n_rows == 0:
        return
    with nogil:
        for t in prange(T, schedule="static", num_threads=T):
            u_lo = block_start(&starts[0], n_rows, T, t)
            u_hi = block_start(&starts[0], n_rows, T, t + 1)
            for u in range(u_lo, u_hi):
                for k in range(starts[u], starts[u + 1]):
                    out[perm[k]] = u


def plan_scratch_size(int64_t n, int64_t num_rows, int n_threads):
    """Entries of the ``scratch`` that :func:`build_plan` takes for ``n`` ids below
    ``num_rows`` on ``n_threads``: two copies of the ids and the write-combining
    lines of the radix scatter."""
    return 2 * n + _wc_words(max(num_rows, 2), max(n_threads, 1))


def build_plan(
    const index_t[::1] idx,      # IN (n,) ids, checked here against num_rows
    int64_t skip_row,            # IN an id to leave out (padding), or -1
    int64_t num_rows,            # IN exclusive upper bound of the ids, <= 2**32
    int64_t[::1] perm_out,       # OUT (n,) positions grouped by id, first m valid
    int64_t[::1] rows_out,       # OUT (n,) sorted distinct ids, first n_rows valid
    int64_t[::1] starts_out,     # OUT (n + 1,) segment bounds, first n_rows + 1 valid
    int n_threads,
    uint64_t[::1] scratch=None,  # IN/OUT optional work space, plan_scratch_size entries
):
    """Stable sort of the ids other than ``skip_row`` and its segments.

    Returns ``(m, n_rows)``: ``perm_out[:m]`` lists the positions grouped by id (input
    order within an id), ``rows_out[:n_rows]`` the distinct ids and
    ``perm_out[starts_out[u]:starts_out[u + 1]]`` the positions of ``rows_out[u]``.
    The ids are range-checked while they are counted (no pass of their own): with
    one outside ``[0, num_rows)`` the result is ``(-1, 0)`` and the outputs hold
    garbage.
    """
    cdef int64_t n = idx.shape[0]
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef int64_t m, n_rows
    if n == 0:
        starts_out[0] = 0
        return 0, 0
    if num_rows > (<int64_t> 1 << 32) or n >= (<int64_t> 1 << 32):
        raise ValueError("build_plan needs ids and positions that fit in 32 bits")
    if T > n:
        T = n
    # counting sort for few rows; with more threads its chunks' slots for one id are
    # neighbours written from different cores (cache lines ping-pong), so from
    # num_rows > n / (8 (T - 1)) the radix sort is faster. Measured, 262,144 ids, 2
    # threads, counting vs radix: 10,000 rows uniform 1.15 vs 1.08 ms, Zipf 0.66 vs
    # 0.99; 100,000 rows 2.55 vs 1.57 and 1.12 vs 1.07 (1 thread: 2.5 vs 2.7).
    if num_rows <= 4096 or (num_rows <= n and num_rows * 8 * (T - 1) <= n):
        m, n_rows = _counting_plan(idx, skip_row, num_rows, perm_out, rows_out, starts_out, T)
    else:
        if scratch is not None and scratch.shape[0] < 2 * n + _wc_words(num_rows, T):
            raise ValueError("scratch must hold plan_scratch_size(n, num_rows, n_threads) "
                             "entries")
        m, n_rows = _radix_plan(idx, skip_row, num_rows, perm_out, rows_out, starts_out, T,
                                NULL if scratch is None else &scratch[0])
    return m, n_rows


cdef _counting_plan(const index_t[::1] idx, int64_t skip_row, int64_t R,
                    int64_t[::1] perm_out, int64_t[::1] rows_out,
                    int64_t[::1] starts_out, int64_t T):
    cdef int64_t n = idx.shape[0]
    cdef int64_t i, lo, hi, k
    cdef int tid, team
    cdef uint32_t* h
    # written by thread 0 between two barriers: ids kept, (hot flag), distinct rows,
    # whether an id is out of range
    cdef int64_t shared[4]
    cdef se_barrier barrier
    cdef uint32_t* hist = <uint32_t*> calloc(T * R, sizeof(uint32_t))
    cdef int64_t* id_bad = <int64_t*> calloc(T, sizeof(int64_t))
    if hist == NULL or id_bad == NULL:
        free(hist); free(id_bad)
        raise MemoryError()
    se_barrier_init(&barrier)
    try:
        # one parallel region (see _spin.h): count, prefix (thread 0), scatter
        with nogil, parallel(num_threads=T):
            tid = omp_get_thread_num()
            team = omp_get_num_threads()
            lo = _chunk_lo(n, team, tid)
            hi = _chunk_lo(n, team, tid + 1)
            h = hist + tid * R
            for i in range(lo, hi):
                k = idx[i]
                if <uint64_t> k < <uint64_t> R:
                    h[k] += 1
                else:
                    id_bad[tid] = 1
            se_barrier_wait(&barrier, team)
            if tid == 0:
                shared[3] = _any(id_bad, team)
                if not shared[3]:
                    if 0 <= skip_row < R:
                        for k in range(team):
                            hist[k * R + skip_row] = 0
                    _slot_prefix(hist, R, team, n, shared, &rows_out[0], &starts_out[0])
            se_barrier_wait(&barrier, team)
            if not shared[3]:
                for i in range(lo, hi):
                    k = idx[i]
                    if k != skip_row:
                        perm_out[h[k]] = i
                        h[k] += 1
    finally:
        free(hist); free(id_bad)
    if shared[3]:
        return -1, 0
    return shared[0], shared[2]


cdef inline int64_t _any(const int64_t* flags, int64_t n) noexcept nogil:
    cdef int64_t t
    for t in range(n):
        if flags[t]:
            return 1
    return 0


cdef inline int64_t _sub_chunks(int64_t* bounds, int64_t n, int64_t team,
                                int64_t tid) noexcept nogil:
    """This thread's SUB_CHUNKS sub-chunks of [0, n) (bounds: SUB_CHUNKS + 1 entries);
    returns the shortest one's length."""
    cdef int64_t q, shortest
    for q in range(SUB_CHUNKS + 1):
        bounds[q] = _chunk_lo(n, team * SUB_CHUNKS, tid * SUB_CHUNKS + q)
    shortest = bounds[1] - bounds[0]
    for q in range(1, SUB_CHUNKS):
        if bounds[q + 1] - bounds[q] < shortest:
            shortest = bounds[q + 1] - bounds[q]
    return shortest


cdef inline void _slot_prefix(uint32_t* hist, int64_t n_buckets, int64_t n_sub, int64_t total,
                              int64_t* shared, int64_t* rows_out,
                              int64_t* starts_out) noexcept nogil:
    """Counts per (sub-chunk, bucket) -> first slots, in (bucket, sub-chunk) order;
    shared[0] = number of entries, shared[1] = whether one bucket holds more than
    1/SKEW_SHARE of ``total``. With ``rows_out`` (a counting sort, whose buckets are
    the ids) also the segments: the non-empty buckets, their first slots and the
    closing bound in ``starts_out``; shared[2] = their number."""
    cdef int64_t running = 0, b, s, d, before, hot = 0, u = 0
    for b in range(n_buckets):
        before = running
        for s in range(n_sub):
            d = hist[s * n_buckets + b]
            hist[s * n_buckets + b] = <uint32_t> running
            running = running + d
        if (running - before) * SKEW_SHARE > total:
            hot = 1
        if rows_out != NULL and running != before:
            rows_out[u] = b
            starts_out[u] = before
            u = u + 1
    shared[0] = running
    shared[1] = hot
    if rows_out != NULL:
        starts_out[u] = running
        shared[2] = u


cdef inline bint _count_ids(const index_t* idx, const int64_t* bounds, int64_t shortest,
                            int64_t skip_row, uint64_t mask, uint32_t* hist,
                            int64_t n_buckets, uint64_t upper) noexcept nogil:
    """Pass 0's histograms; returns whether an id is outside [0, upper) (a masked
    digit never indexes out of the histogram, so a bad id does no harm here)."""
    cdef int64_t j, q, i, k
    cdef bint bad = False
    for j in range(shortest):
        for q in range(SUB_CHUNKS):
            k = idx[bounds[q] + j]
            bad = bad | (<uint64_t> k >= upper)
            if k != skip_row:
                hist[q * n_buckets + (<uint64_t> k & mask)] += 1
    for q in range(SUB_CHUNKS):
        for i in range(bounds[q] + shortest, bounds[q + 1]):
            k = idx[i]
            bad = bad | (<uint64_t> k >= upper)
            if k != skip_row:
                hist[q * n_buckets + (<uint64_t> k & mask)] += 1
    return bad


cdef inline void _put(uint32_t* slots, uint64_t b, uint64_t* dst, uint64_t word) noexcept nogil:
    cdef uint32_t pos = slots[b]
    slots[b] = pos + 1
    dst[pos] = word


cdef inline void _scatter_ids(const index_t* idx, const int64_t* bounds, int64_t shortest,
                              int64_t skip_row, uint64_t mask, uint32_t* slots,
                              int64_t n_buckets, uint64_t* dst, bint hot,
                              uint64_t* lines, uint32_t* first) noexcept nogil:
    """Pass 0's scatter of the words (id << 32 | position); through the
    write-combining ``lines`` (with ``first``: n_buckets entries) unless NULL."""
    cdef int64_t j, q, i, k
    cdef uint32_t align = wc_align(dst)
    if hot:
        for j in range(shortest):
            for q in range(SUB_CHUNKS):
                i = bounds[q] + j
                k = idx[i]
                if k != skip_row:
                    _put(slots, q * n_buckets + (<uint64_t> k & mask), dst,
                         (<uint64_t> k << 32) | <uint64_t> i)
        for q in range(SUB_CHUNKS):
            for i in range(bounds[q] + shortest, bounds[q + 1]):
                k = idx[i]
                if k != skip_row:
                    _put(slots, q * n_buckets + (<uint64_t> k & mask), dst,
                         (<uint64_t> k << 32) | <uint64_t> i)
        return
    # the sub-chunks are consecutive and so are their slots in every bucket: the
    # first one's slots serve the whole chunk, read in order
    if lines == NULL:
        for i in range(bounds[0], bounds[SUB_CHUNKS]):
            k = idx[i]
            if k != skip_row:
                _put(slots, <uint64_t> k & mask, dst, (<uint64_t> k << 32) | <uint64_t> i)
        return
    memcpy(first, slots, n_buckets * sizeof(uint32_t))
    for i in range(bounds[0], bounds[SUB_CHUNKS]):
        k = idx[i]
        if k != skip_row:
            wc_put(lines, first, slots, <uint64_t> k & mask, dst, align,
                   (<uint64_t> k << 32) | <uint64_t> i)
    wc_flush(lines, first, slots, n_buckets, dst, align)
    stream_fence()


cdef inline void _count_words(const uint64_t* src, const int64_t* bounds, int64_t shortest,
                              int shift, uint64_t mask, uint32_t* hist,
                              int64_t n_buckets) noexcept nogil:
    cdef int64_t j, q, i
    for j in range(shortest):
        for q in range(SUB_CHUNKS):
            hist[q * n_buckets + ((src[bounds[q] + j] >> shift) & mask)] += 1
    for q in range(SUB_CHUNKS):
        for i in range(bounds[q] + shortest, bounds[q + 1]):
            hist[q * n_buckets + ((src[i] >> shift) & mask)] += 1


cdef inline void _scatter_words(const uint64_t* src, const int64_t* bounds, int64_t shortest,
                                int shift, uint64_t mask, uint32_t* slots, int64_t n_buckets,
                                uint64_t* dst, bint hot, uint64_t* lines,
                                uint32_t* first) noexcept nogil:
    """A later pass's scatter, as :func:`_scatter_ids`."""
    cdef int64_t j, q, i
    cdef uint64_t word
    cdef uint32_t align = wc_align(dst)
    if hot:
        for j in range(shortest):
            for q in range(SUB_CHUNKS):
                word = src[bounds[q] + j]
                _put(slots, q * n_buckets + ((word >> shift) & mask), dst, word)
        for q in range(SUB_CHUNKS):
            for i in range(bounds[q] + shortest, bounds[q + 1]):
                word = src[i]
                _put(slots, q * n_buckets + ((word >> shift) & mask), dst, word)
        return
    if lines == NULL:
        for i in range(bounds[0], bounds[SUB_CHUNKS]):
            word = src[i]
            _put(slots, (word >> shift) & mask, dst, word)
        return
    memcpy(first, slots, n_buckets * sizeof(uint32_t))
    for i in range(bounds[0], bounds[SUB_CHUNKS]):
        word = src[i]
        wc_put(lines, first, slots, (word >> shift) & mask, dst, align, word)
    wc_flush(lines, first, slots, n_buckets, dst, align)
    stream_fence()


cdef inline int64_t _note_run(int64_t key, int64_t prev, int64_t slot, int64_t* rows_out,
                              int64_t* starts_out, int64_t u) noexcept nogil:
    """A run of ``key`` starts at ``slot`` unless the previous key was the same: record
    it as run u; returns the next run's number."""
    if key != prev:
        rows_out[u] = key
        starts_out[u] = slot
        return u + 1
    return u


cdef inline int64_t _split_words(const uint64_t* words, int64_t lo, int64_t hi,
                                 int64_t* perm_out, int64_t* rows_out,
                                 int64_t* starts_out) noexcept nogil:
    """Positions of sorted words [lo, hi) into perm_out, and the runs starting there
    into rows_out/starts_out from slot lo on; returns the number of runs."""
    cdef int64_t i, k, u = lo, prev
    cdef uint64_t word
    if lo >= hi:
        return 0
    prev = -1 if lo == 0 else <int64_t> (words[lo - 1] >> 32)
    for i in range(lo, hi):
        word = words[i]
        perm_out[i] = <int64_t> (word & 0xffffffffu)
        k = <int64_t> (word >> 32)
        u = _note_run(k, prev, i, rows_out, starts_out, u)
        prev = k
    return u - lo


cdef inline bint _chunk_sorted(const index_t* idx, int64_t lo, int64_t hi) noexcept nogil:
    """Whether idx[lo - 1 (if any) .. hi) never decreases (random ids: a few reads)."""
    cdef int64_t i
    for i in range(lo if lo > 0 else 1, hi):
        if idx[i] < idx[i - 1]:
            return False
    return True


cdef inline int64_t _split_sorted(const index_t* idx, int64_t skip_at, int64_t skip_len,
                                  int64_t lo, int64_t hi, int64_t* perm_out,
                                  int64_t* rows_out, int64_t* starts_out) noexcept nogil:
    """:func:`_split_words` for ids that are already sorted, less the run of
    ``skip_len`` skipped ids at ``skip_at``: slot k holds position k before that run,
    k + skip_len after it."""
    cdef int64_t k, i, key, u = lo, prev
    if lo >= hi:
        return 0
    prev = -1
    if lo > 0:
        prev = idx[lo - 1 if lo - 1 < skip_at else lo - 1 + skip_len]
    for k in range(lo, hi):
        i = k if k < skip_at else k + skip_len
        perm_out[k] = i
        key = idx[i]
        u = _note_run(key, prev, k, rows_out, starts_out, u)
        prev = key
    return u - lo


cdef _radix_plan(const index_t[::1] idx, int64_t skip_row, int64_t R,
                 int64_t[::1] perm_out, int64_t[::1] rows_out,
                 int64_t[::1] starts_out, int64_t T, uint64_t* scratch):
    cdef int64_t n = idx.shape[0]
    cdef int64_t n_pass, digit_bits, n_buckets, p, shortest, m, lo, hi, u, t
    cdef int64_t skip_at, skip_len
    cdef int tid, team
    cdef int shift
    cdef uint64_t mask
    cdef int64_t* bounds
    cdef uint32_t* slots
    cdef uint64_t* src
    cdef uint64_t* dst
    cdef uint64_t* words0
    cdef uint64_t* words1
    cdef uint32_t* hist = NULL
    cdef int64_t* sub_bounds = NULL
    cdef int64_t* n_runs = NULL
    cdef uint64_t* buf = NULL
    cdef uint64_t* wc_lines0
    cdef uint32_t* wc_first0
    cdef uint64_t* wc_lines
    cdef uint32_t* wc_first
    # written by thread 0 between two barriers, read by all: word count, hot flag,
    # distinct rows, whether the ids arrived sorted, whether one is out of range
    cdef int64_t shared[5]
    cdef int64_t* chunk_unsorted = NULL
    cdef int64_t* id_bad = NULL
    cdef se_barrier barrier
    digit_bits = _digit_bits(R, &n_pass)
    n_buckets = (<int64_t> 1) << digit_bits
    mask = <uint64_t> (n_buckets - 1)

    hist = <uint32_t*> malloc(T * SUB_CHUNKS * n_buckets * sizeof(uint32_t))
    sub_bounds = <int64_t*> malloc(T * (SUB_CHUNKS + 1) * sizeof(int64_t))
    n_runs = <int64_t*> calloc(3 * T, sizeof(int64_t))
    buf = scratch if scratch != NULL else <uint64_t*> malloc(
        (2 * n + _wc_words(R, T)) * sizeof(uint64_t))
    if hist == NULL or sub_bounds == NULL or n_runs == NULL or buf == NULL:
        free(hist); free(sub_bounds); free(n_runs)
        if scratch == NULL:
            free(buf)
        raise MemoryError()
    words0 = buf
    words1 = buf + n
    # after the words: per thread a line of 8 words per bucket, line-aligned, then
    # each bucket's first slot
    wc_lines0 = <uint64_t*> ((<size_t> (buf + 2 * n) + 63) & ~(<size_t> 63))
    wc_first0 = <uint32_t*> (wc_lines0 + T * n_buckets * 8)
    chunk_unsorted = n_runs + T
    id_bad = n_runs + 2 * T
    se_barrier_init(&barrier)
    try:
        with nogil, parallel(num_threads=T):
            tid = omp_get_thread_num()
            team = omp_get_num_threads()
            bounds = sub_bounds + tid * (SUB_CHUNKS + 1)
            slots = hist + tid * SUB_CHUNKS * n_buckets
            wc_lines = wc_lines0 + tid * n_buckets * 8 if n >= WC_MIN_IDS else NULL
            wc_first = wc_first0 + tid * n_buckets
            # pass 0 reads the ids themselves, leaving skip_row out
            chunk_unsorted[tid] = not _chunk_sorted(&idx[0], _chunk_lo(n, team, tid),
                                                    _chunk_lo(n, team, tid + 1))
            shortest = _sub_chunks(bounds, n, team, tid)
            memset(slots, 0, SUB_CHUNKS * n_buckets * sizeof(uint32_t))
            id_bad[tid] = _count_ids(&idx[0], bounds, shortest, skip_row, mask, slots,
                                     n_buckets, <uint64_t> R)
            se_barrier_wait(&barrier, team)
            if tid == 0:
                shared[4] = _any(id_bad, team)
                shared[3] = not _any(chunk_unsorted, team)
                if not shared[3] and not shared[4]:
                    _slot_prefix(hist, n_buckets, team * SUB_CHUNKS, n, shared, NULL, NULL)
            se_barrier_wait(&barrier, team)
            if shared[4]:
                pass  # an id out of range: nothing more to do (every thread sees it)
            elif shared[3]:
                # sorted ids: the positions in order, less skip_row's one run
                skip_at = first_at_least(&idx[0], n, skip_row)
                skip_len = first_at_least(&idx[0], n, skip_row + 1) - skip_at
                m = n - skip_len
                if tid == 0:
                    shared[0] = m
                lo = _chunk_lo(m, team, tid)
                hi = _chunk_lo(m, team, tid + 1)
                n_runs[tid] = _split_sorted(&idx[0], skip_at, skip_len, lo, hi,
                                            &perm_out[0], &rows_out[0], &starts_out[0])
            else:
                m = shared[0]
                _scatter_ids(&idx[0], bounds, shortest, skip_row, mask, slots, n_buckets,
                             words0, shared[1], wc_lines, wc_first)
                for p in range(1, n_pass):
                    src = words0 if p % 2 == 1 else words1
                    dst = words1 if p % 2 == 1 else words0
                    shift = 32 + p * digit_bits
                    shortest = _sub_chunks(bounds, m, team, tid)
                    memset(slots, 0, SUB_CHUNKS * n_buckets * sizeof(uint32_t))
                    se_barrier_wait(&barrier, team)   # src complete
                    _count_words(src, bounds, shortest, shift, mask, slots, n_buckets)
                    se_barrier_wait(&barrier, team)
                    if tid == 0:
                        _slot_prefix(hist, n_buckets, team * SUB_CHUNKS, m, shared, NULL,
                                     NULL)
                    se_barrier_wait(&barrier, team)
                    _scatter_words(src, bounds, shortest, shift, mask, slots, n_buckets,
                                   dst, shared[1], wc_lines, wc_first)
                se_barrier_wait(&barrier, team)
                src = words0 if n_pass % 2 == 1 else words1
                lo = _chunk_lo(m, team, tid)
                hi = _chunk_lo(m, team, tid + 1)
                n_runs[tid] = _split_words(src, lo, hi, &perm_out[0], &rows_out[0],
                                           &starts_out[0])
            se_barrier_wait(&barrier, team)
            if tid == 0 and not shared[4]:
                # each chunk listed its runs from its own first slot on (a run count
                # never exceeds the chunk's length): close the gaps, in chunk order
                u = n_runs[0]
                for t in range(1, team):
                    lo = _chunk_lo(m, team, t)
                    if n_runs[t] > 0 and lo != u:
                        memmove(&rows_out[u], &rows_out[lo], n_runs[t] * sizeof(int64_t))
                        memmove(&starts_out[u], &starts_out[lo], n_runs[t] * sizeof(int64_t))
                    u = u + n_runs[t]
                starts_out[u] = m
                shared[2] = u
    finally:
        free(hist); free(sub_bounds); free(n_runs)
        if scratch == NULL:
            free(buf)
    if shared[4]:
        return -1, 0
    return shared[0], shared[2]
