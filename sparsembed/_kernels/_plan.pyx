"""Row plan of a batch: a stable sort of the ids, computed once per batch and reused
by renorm, counts, the backward passes and the optimizers.

The sort is a parallel LSD radix sort over contiguous chunks. A stable sort has one
answer, so the permutation is identical for every thread count, and each row's
occurrences stay in input order: later per-row sums run in a fixed order.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memmove, memset

from sparsembed._kernels._gather cimport first_hit, gather_claimed
from sparsembed._kernels._memory cimport checked_set_llc_bytes, llc_bytes
from sparsembed._kernels._openmp_helpers cimport (
    claimed_parts,
    omp_get_num_threads,
    omp_get_thread_num,
    se_barrier,
    se_barrier_init,
    se_barrier_wait,
)
from sparsembed._kernels._split cimport block_start, first_at_least
from sparsembed._kernels._types cimport index_t


# the last-level cache size, read here once holding the GIL: the lookup's far prefetch
# (_memory.pxd: gather_far_distance) reads it again inside parallel regions
llc_bytes()


def set_last_level_cache_bytes(int64_t nbytes):
    """For tests: this module's kernels take the last-level cache to be ``nbytes``
    (0: read it again); returns the size now in use."""
    return checked_set_llc_bytes(nbytes)


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
# with balanced digits of at most 13 bits (two passes up to 2**26 rows; 8 bits for
# fewer than 4,096 ids, whose passes cost their buckets more than their ids), then one
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
    # fewer ids than this sort on digits of at most SMALL_DIGIT_BITS: a pass costs
    # its buckets as well as its ids, and a few ids over 1e7 rows (two passes of
    # 4,096 buckets, each bucket's counters cleared and summed) took 26-30 us where
    # V = 1e5 took 7 (16-1,024 ids, one thread)
    SMALL_DIGIT_IDS = 4096
    SMALL_DIGIT_BITS = 8


cdef inline int64_t _digit_bits(int64_t num_rows, int64_t n, int64_t* n_pass) noexcept nogil:
    """Balanced digits of at most MAX_DIGIT_BITS (SMALL_DIGIT_BITS for fewer than
    SMALL_DIGIT_IDS ids) for n ids below num_rows: returns the digit width, and the
    number of passes in n_pass."""
    cdef int64_t n_bits = 0
    cdef int64_t most = SMALL_DIGIT_BITS if n < SMALL_DIGIT_IDS else MAX_DIGIT_BITS
    while (num_rows - 1) >> n_bits:
        n_bits += 1
    n_pass[0] = (n_bits + most - 1) // most
    return (n_bits + n_pass[0] - 1) // n_pass[0]


cdef inline int64_t _wc_words(int64_t num_rows, int64_t n, int64_t n_threads) noexcept nogil:
    """uint64 words of each thread's write-combining lines and first slots (_radix.h)
    for n ids, with room to align them to a line."""
    cdef int64_t n_pass
    cdef int64_t n_buckets = (<int64_t> 1) << _digit_bits(num_rows, n, &n_pass)
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
    return 2 * n + _wc_words(max(num_rows, 2), n, max(n_threads, 1))


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
        if scratch is not None and scratch.shape[0] < 2 * n + _wc_words(num_rows, n, T):
            raise ValueError("scratch must hold plan_scratch_size(n, num_rows, n_threads) "
                             "entries")
        m, n_rows = _radix_plan(idx, skip_row, num_rows, perm_out, rows_out, starts_out, T,
                                NULL if scratch is None else &scratch[0])
    return m, n_rows


def gather_and_plan(
    const floating[:, ::1] weight,  # IN (num_rows, dim), dim >= 1
    const index_t[::1] idx,         # IN (n,) ids, n >= 1, checked here against num_rows
    floating[:, ::1] out,           # OUT (n, dim)
    bint stream,                    # IN write out with non-temporal stores
    index_t[::1] ids_out,           # OUT (n,) a copy of idx, or None
    int64_t skip_row,               # IN an id the plan leaves out (padding), or -1
    int64_t[::1] perm_out,          # OUT (n,) as build_plan's
    int64_t[::1] rows_out,          # OUT (n,)
    int64_t[::1] starts_out,        # OUT (n + 1,)
    uint64_t[::1] scratch,          # IN/OUT plan_scratch_size(n, num_rows, 1) entries
    int n_threads,
):
    """``_lookup.gather`` and ``build_plan`` of the same ids in one parallel region:
    the last thread of the team sorts the ids on its own (the radix plan on a team
    of one) while the others copy rows, then it claims the ranges still left.

    Why: the copy of rows from a large table is bound by the memory system, the plan
    by one core's instructions on data in its caches. While the host gives a second
    core no more memory bandwidth (see benchmarks/README.md) a second copying thread
    adds little, and the plan, which would follow the lookup, is hidden behind it; when
    it does, the lookup slows by what the planner leaves to the first thread. AMD
    EPYC, 262,144 uniform ids, V = 1e6, D = 64, 2 threads, lookup + plan one after
    the other against this (emulated with 64 ranges from Python): 3.54-3.85 vs
    2.93-3.45 ms while a second core adds no bandwidth, 2.45-2.53 vs 2.37-2.54 while
    it does.

    Returns ``(bad, m, n_rows)``: ``bad`` as gather's (-1, or the first position
    whose id is outside ``[0, num_rows)``; the plan is then garbage), ``m`` and
    ``n_rows`` as build_plan's.
    """
    cdef int64_t n = idx.shape[0]
    cdef int64_t num_rows = weight.shape[0]
    cdef int64_t dim = weight.shape[1]
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef int64_t n_ranges, found = -1
    cdef int tid, team
    cdef long long next_range = 0
    cdef int64_t* first = NULL
    cdef index_t* keep = NULL
    cdef radix_work w
    if n == 0 or dim == 0 or num_rows == 0:
        raise ValueError("gather_and_plan needs ids, rows and columns")
    if num_rows > (<int64_t> 1 << 32) or n >= (<int64_t> 1 << 32):
        raise ValueError("gather_and_plan needs ids and positions that fit in 32 bits")
    if out.shape[0] != n or out.shape[1] != dim:
        raise ValueError(f"out must be ({n}, {dim}), got ({out.shape[0]}, {out.shape[1]})")
    if perm_out.shape[0] < n or rows_out.shape[0] < n or starts_out.shape[0] < n + 1:
        raise ValueError(f"perm_out and rows_out must hold {n} entries, starts_out {n + 1}")
    if scratch is None or scratch.shape[0] < 2 * n + _wc_words(num_rows, n, 1):
        raise ValueError("scratch must hold plan_scratch_size(n, num_rows, 1) entries")
    if ids_out is not None:
        if ids_out.shape[0] != n:
            raise ValueError(f"ids_out has {ids_out.shape[0]} entries, expected {n}")
        keep = &ids_out[0]
    n_ranges = claimed_parts(n, T)
    first = <int64_t*> malloc(n_ranges * sizeof(int64_t))
    if first == NULL:
        raise MemoryError()
    if _radix_alloc(&w, n, num_rows, 1, &scratch[0]) < 0:
        free(first)
        raise MemoryError()
    try:
        with nogil, parallel(num_threads=T):
            tid = omp_get_thread_num()
            team = omp_get_num_threads()
            if tid == team - 1:
                _radix_team(&idx[0], n, skip_row, num_rows, &perm_out[0], &rows_out[0],
                            &starts_out[0], &w, 0, 1)
            gather_claimed(&weight[0, 0], num_rows, &idx[0], n, dim, &out[0, 0], stream,
                           keep, first, &next_range, n_ranges, T, dim)
        found = first_hit(first, n_ranges)
    finally:
        free(first)
        _radix_free(&w)
    if found >= 0:
        return found, 0, 0
    if w.shared[4]:
        return found, -1, 0  # never so: the lookup checks the same ids against num_rows
    return found, w.shared[0], w.shared[2]


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


cdef struct radix_work:
    # what one radix plan's team shares, set up by _radix_alloc
    uint32_t* hist           # per thread SUB_CHUNKS x buckets slot counts
    int64_t* sub_bounds      # per thread SUB_CHUNKS + 1 chunk bounds
    int64_t* n_runs          # per thread: its runs, then whether its chunk is unsorted,
                             # then whether it saw an id out of range (3 x team)
    uint64_t* buf            # 2 n words, then the write-combining lines
    bint own_buf             # buf was malloc'd here (no scratch given)
    # written by thread 0 between two barriers, read by all: word count, hot flag,
    # distinct rows, whether the ids arrived sorted, whether one is out of range
    int64_t shared[5]
    se_barrier barrier


cdef int _radix_alloc(radix_work* w, int64_t n, int64_t R, int64_t T,
                      uint64_t* scratch) noexcept nogil:
    """The work space of a radix plan of n ids below R on a team of at most T threads
    (scratch: plan_scratch_size(n, R, T) words, or NULL); -1 when out of memory (all
    freed)."""
    cdef int64_t n_pass
    cdef int64_t n_buckets = (<int64_t> 1) << _digit_bits(R, n, &n_pass)
    w.hist = <uint32_t*> malloc(T * SUB_CHUNKS * n_buckets * sizeof(uint32_t))
    w.sub_bounds = <int64_t*> malloc(T * (SUB_CHUNKS + 1) * sizeof(int64_t))
    w.n_runs = <int64_t*> calloc(3 * T, sizeof(int64_t))
    w.own_buf = scratch == NULL
    w.buf = scratch if scratch != NULL else <uint64_t*> malloc(
        (2 * n + _wc_words(R, n, T)) * sizeof(uint64_t))
    se_barrier_init(&w.barrier)
    if w.hist == NULL or w.sub_bounds == NULL or w.n_runs == NULL or w.buf == NULL:
        _radix_free(w)
        return -1
    return 0


cdef void _radix_free(radix_work* w) noexcept nogil:
    free(w.hist); free(w.sub_bounds); free(w.n_runs)
    if w.own_buf:
        free(w.buf)
    w.hist = NULL; w.sub_bounds = NULL; w.n_runs = NULL; w.buf = NULL


cdef _radix_plan(const index_t[::1] idx, int64_t skip_row, int64_t R,
                 int64_t[::1] perm_out, int64_t[::1] rows_out,
                 int64_t[::1] starts_out, int64_t T, uint64_t* scratch):
    cdef radix_work w
    if _radix_alloc(&w, idx.shape[0], R, T, scratch) < 0:
        raise MemoryError()
    try:
        with nogil, parallel(num_threads=T):
            _radix_team(&idx[0], idx.shape[0], skip_row, R, &perm_out[0], &rows_out[0],
                        &starts_out[0], &w, omp_get_thread_num(), omp_get_num_threads())
    finally:
        _radix_free(&w)
    if w.shared[4]:
        return -1, 0
    return w.shared[0], w.shared[2]


cdef void _radix_team(const index_t* idx, int64_t n, int64_t skip_row, int64_t R,
                      int64_t* perm_out, int64_t* rows_out, int64_t* starts_out,
                      radix_work* w, int tid, int team) noexcept nogil:
    """Thread tid's part of the radix plan on a team of team threads, all of which
    call it (team 1: one thread on its own, no waiting). The plan is in w.shared once
    every member has returned (see _radix_plan)."""
    cdef int64_t n_pass, digit_bits, n_buckets, p, shortest, m, lo, hi, u, t
    cdef int64_t skip_at, skip_len
    cdef int shift
    cdef uint64_t mask
    cdef int64_t* bounds
    cdef uint32_t* slots
    cdef uint64_t* src
    cdef uint64_t* dst
    cdef uint64_t* words0
    cdef uint64_t* words1
    cdef uint64_t* wc_lines0
    cdef uint32_t* wc_first0
    cdef uint64_t* wc_lines
    cdef uint32_t* wc_first
    cdef int64_t* shared = w.shared
    cdef int64_t* n_runs = w.n_runs
    cdef int64_t* chunk_unsorted = w.n_runs + team
    cdef int64_t* id_bad = w.n_runs + 2 * team
    cdef se_barrier* barrier = &w.barrier
    digit_bits = _digit_bits(R, n, &n_pass)
    n_buckets = (<int64_t> 1) << digit_bits
    mask = <uint64_t> (n_buckets - 1)
    words0 = w.buf
    words1 = w.buf + n
    # after the words: per thread a line of 8 words per bucket, line-aligned, then
    # each bucket's first slot
    wc_lines0 = <uint64_t*> ((<size_t> (w.buf + 2 * n) + 63) & ~(<size_t> 63))
    wc_first0 = <uint32_t*> (wc_lines0 + team * n_buckets * 8)

    bounds = w.sub_bounds + tid * (SUB_CHUNKS + 1)
    slots = w.hist + tid * SUB_CHUNKS * n_buckets
    wc_lines = wc_lines0 + tid * n_buckets * 8 if n >= WC_MIN_IDS else NULL
    wc_first = wc_first0 + tid * n_buckets
    # pass 0 reads the ids themselves, leaving skip_row out
    chunk_unsorted[tid] = not _chunk_sorted(idx, _chunk_lo(n, team, tid),
                                            _chunk_lo(n, team, tid + 1))
    shortest = _sub_chunks(bounds, n, team, tid)
    memset(slots, 0, SUB_CHUNKS * n_buckets * sizeof(uint32_t))
    id_bad[tid] = _count_ids(idx, bounds, shortest, skip_row, mask, slots,
                             n_buckets, <uint64_t> R)
    se_barrier_wait(barrier, team)
    if tid == 0:
        shared[4] = _any(id_bad, team)
        shared[3] = not _any(chunk_unsorted, team)
        if not shared[3] and not shared[4]:
            _slot_prefix(w.hist, n_buckets, team * SUB_CHUNKS, n, shared, NULL, NULL)
    se_barrier_wait(barrier, team)
    if shared[4]:
        pass  # an id out of range: nothing more to do (every thread sees it)
    elif shared[3]:
        # sorted ids: the positions in order, less skip_row's one run
        skip_at = first_at_least(idx, n, skip_row)
        skip_len = first_at_least(idx, n, skip_row + 1) - skip_at
        m = n - skip_len
        if tid == 0:
            shared[0] = m
        lo = _chunk_lo(m, team, tid)
        hi = _chunk_lo(m, team, tid + 1)
        n_runs[tid] = _split_sorted(idx, skip_at, skip_len, lo, hi,
                                    perm_out, rows_out, starts_out)
    else:
        m = shared[0]
        _scatter_ids(idx, bounds, shortest, skip_row, mask, slots, n_buckets,
                     words0, shared[1], wc_lines, wc_first)
        for p in range(1, n_pass):
            src = words0 if p % 2 == 1 else words1
            dst = words1 if p % 2 == 1 else words0
            shift = 32 + p * digit_bits
            shortest = _sub_chunks(bounds, m, team, tid)
            memset(slots, 0, SUB_CHUNKS * n_buckets * sizeof(uint32_t))
            se_barrier_wait(barrier, team)   # src complete
            _count_words(src, bounds, shortest, shift, mask, slots, n_buckets)
            se_barrier_wait(barrier, team)
            if tid == 0:
                _slot_prefix(w.hist, n_buckets, team * SUB_CHUNKS, m, shared, NULL,
                             NULL)
            se_barrier_wait(barrier, team)
            _scatter_words(src, bounds, shortest, shift, mask, slots, n_buckets,
                           dst, shared[1], wc_lines, wc_first)
        se_barrier_wait(barrier, team)
        src = words0 if n_pass % 2 == 1 else words1
        lo = _chunk_lo(m, team, tid)
        hi = _chunk_lo(m, team, tid + 1)
        n_runs[tid] = _split_words(src, lo, hi, perm_out, rows_out, starts_out)
    se_barrier_wait(barrier, team)
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
