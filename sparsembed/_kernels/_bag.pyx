"""EmbeddingBag kernels: pooled forward (sum, mean, max), per-sample-weight gradient
and the row-partitioned backward.

Bags are given as ``starts`` (n_bags + 1, int64): bag ``b`` holds the entries
``starts[b]:starts[b + 1]``. The forward sums and averages ranges of consecutive
bags, which the threads claim as they come free, through the SIMD kernels of
``_simd_pool.h`` (one call per range, the widest vector level the CPU has); max
mode gives each thread a contiguous range of bags through those of ``_simd_max.h``
(one call per bag); float16 tables' sum and mean go through ``_simd_half.h``. The
backward goes through the row plan of the entries (see ``_plan``): each distinct
row is summed by one thread in plan order, so results are bitwise identical for
every thread count -- sum and mean bags by ``_backward``'s SIMD row sums, once
:func:`entry_grad_rows` has mapped the plan's entries to their bags, max mode
with the helper :func:`bag_row_sum` from ``_bag.pxd`` and the won-column masks of
:func:`won_masks`.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t, uint16_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

from sparsembed._kernels._bag cimport bag_row_sum
from sparsembed._kernels._gaps cimport ENTRY_COST, ROW_COST, zero_gaps, zero_rows
from sparsembed._kernels._memory cimport (
    checked_set_llc_bytes,
    far_table,
    fits_in_cache,
    gather_prefetch_distance,
    llc_bytes,
    prefetch_distance,
    prefetch_row,
    short_pool_distance,
    stream_fence,
    stream_row,
    table_pool_distance,
)
from sparsembed._kernels._openmp_helpers cimport (
    claim_part,
    claimed_parts,
    omp_get_thread_num,
)
from sparsembed._kernels._reduce cimport dot8
from sparsembed._kernels._simd cimport (
    SE_FAR_LINE,
    SE_MEAN,
    SE_ONE_PASS,
    SE_STREAM,
    max_bag,
    max_table,
    max_table_at,
    pool_level,
    pool_set_level,
    pool_sum,
    pool_table,
    pool_table_flags,
)
from sparsembed._kernels._sum_pooling cimport pool_table_at
from sparsembed._kernels._split cimport block_start, block_start_spanned
from sparsembed._kernels._types cimport index_t

cdef extern from "_simd_half.h":
    ctypedef int64_t (*half_pool_i32_t)(
        const uint16_t*, int64_t, int64_t, const int32_t*, int64_t, const int64_t*, int64_t,
        int64_t, int64_t, const float*, int64_t, int, uint16_t*, int64_t*,
        float*) noexcept nogil
    ctypedef int64_t (*half_pool_i64_t)(
        const uint16_t*, int64_t, int64_t, const int64_t*, int64_t, const int64_t*, int64_t,
        int64_t, int64_t, const float*, int64_t, int, uint16_t*, int64_t*,
        float*) noexcept nogil
    ctypedef struct half_pool_table "se_half_pool_table":
        half_pool_i32_t i32
        half_pool_i64_t i64
    half_pool_table half_pool_table_at "sparsembed_half_pool_table"(int level) noexcept nogil
    int64_t HALF_SPREAD "SE_HALF_SPREAD"

cdef enum:
    MODE_SUM = 0
    MODE_MEAN = 1
    MODE_MAX = 2


# the last-level cache size and the CPU's vendor, read here once holding the GIL:
# pool_table_flags (_simd.pxd) and table_pool_distance read them inside parallel regions
llc_bytes()
short_pool_distance()


def simd_level():
    """The highest SIMD level the pooling runs at: 0 baseline, 1 AVX2, 2 AVX-512F
    (rows narrower than its vectors pool at a lower one: see ``_level_for_rows``)."""
    return pool_level()


def set_simd_level(int level):
    """Run the pooling at ``level`` (capped at what the CPU supports);
    returns the level now in use. For tests: every level gives the same bits."""
    return pool_set_level(level)


def last_level_cache_bytes():
    """The last-level cache size the pooling's prefetch distance is chosen by: the
    largest cache of cpu0 in Linux's sysfs, else 32 MiB."""
    return llc_bytes()


def set_last_level_cache_bytes(int64_t nbytes):
    """For tests: this module's kernels take the last-level cache to be ``nbytes``
    (0: read it again); returns the size now in use."""
    return checked_set_llc_bytes(nbytes)


def pool_rows_ahead(int64_t row_bytes, int64_t table_bytes):
    """How many entries ahead the pooling prefetches rows of ``row_bytes`` from a
    table of ``table_bytes``: 8 KiB of rows (8 to 32) when the table fits in half
    the last-level cache or the CPU is an Intel one, else 32 KiB (8 to 64)."""
    return table_pool_distance(row_bytes, table_bytes)


# Rows under 512 bytes of a table past 32 MiB (or the last-level cache) get the far
# prefetch of their first line (SE_FAR_LINE) when a sample of the batch's ids are
# mostly distinct: rows read from memory, where it pays, not a few hot rows read again
# and again from the cache, where the loop is bound by instructions and it costs one
# more per row. Intel Xeon VM, 262,144 ids in bags of 32, 2 threads, with and without
# in one process, ratio to torch: V = 1e6, D = 64 uniform 1.12 / 0.94 -> 0.87 / 0.78
# (two runs), Zipf 0.94 / 0.94 -> 1.02 / 0.97; D = 32 uniform 1.02 -> 0.95, Zipf 0.84
# -> 0.90; V = 1e5 (24 MiB) uniform 1.01 -> 0.90, Zipf 0.86 -> 0.91; V = 3e5 (73 MiB)
# level. A strided sample of 1,024 ids is 99-100% distinct for uniform ids over 1e5 to
# 1e7 rows, 35-39% for Zipf(1.2) ones; the count costs ~3 us, from
# FAR_SAMPLE_MIN_IDS ids on (a bag sum of 65,536 ids takes ~0.7 ms).
DEF FAR_SAMPLE = 1024
DEF FAR_SAMPLE_SLOTS = 2048
DEF FAR_SAMPLE_MIN_IDS = 65536


cdef inline int _far_line_flags(int flags, const index_t* idx, int64_t n,
                                size_t table_bytes) noexcept nogil:
    """``flags`` (pool_table_flags') with SE_FAR_LINE where the sample says so."""
    if (not (flags & SE_FAR_LINE) and n >= FAR_SAMPLE_MIN_IDS and far_table(table_bytes)
            and _mostly_distinct(idx, n)):
        return flags | SE_FAR_LINE
    return flags


def far_line_prefetch(const index_t[::1] idx, int64_t table_bytes, int64_t row_bytes):
    """Whether the sum pooling of the ids ``idx`` from a table of ``table_bytes`` in
    rows of ``row_bytes`` prefetches each row's first line far ahead too (for tests)."""
    cdef int flags = pool_table_flags(table_bytes, row_bytes)
    return bool(_far_line_flags(flags, &idx[0] if idx.shape[0] > 0 else NULL, idx.shape[0],
                                table_bytes) & SE_FAR_LINE)


cdef inline int _level_for_rows(int64_t row_bytes) noexcept nogil:
    """The pooling's SIMD level for rows of ``row_bytes``: the widest whose vectors
    (16, 32 and 64 bytes at the baseline, AVX2 and AVX-512 levels) a row fills, as a
    row narrower than a vector goes through the kernels' column tails. Every level
    gives the same bits. 2,048 bags of 32 (and 65,536 of 1), V = 1e5, 2 threads,
    float32 sum, ms at AVX-512 / AVX2 / baseline: D = 4 0.27 / 0.21 / 0.10, D = 8
    0.25 / 0.17 / 0.16, D = 12 0.34 / 0.21 / 0.26, D = 16 0.30 / 0.32 / 0.32 (torch
    0.26 / 0.28 / 0.32 / 0.37)."""
    cdef int level = pool_level()
    if row_bytes < 32:
        return min(level, 0)
    if row_bytes < 64:
        return min(level, 1)
    return level


cdef bint _mostly_distinct(const index_t* idx, int64_t n) noexcept nogil:
    """Whether at least 3/4 of FAR_SAMPLE ids taken at a stride over ``idx[:n]`` differ
    (counted in an open-addressing set; a bad id is just another value here)."""
    cdef uint64_t[FAR_SAMPLE_SLOTS] slots
    cdef uint64_t key, h
    cdef int64_t i, stride = n // FAR_SAMPLE
    cdef int distinct = 0
    # all ones: an empty slot (a bad id of -1 then reads as one: it is not counted)
    memset(slots, 0xFF, sizeof(slots))
    for i in range(FAR_SAMPLE):
        key = <uint64_t> idx[i * stride]
        h = (key * <uint64_t> 0x9E3779B97F4A7C15) >> (64 - 11)
        while slots[h] != key and slots[h] != <uint64_t> -1:
            h = (h + 1) & (FAR_SAMPLE_SLOTS - 1)
        if slots[h] != key:
            slots[h] = key
            distinct += 1
    return distinct * 4 >= FAR_SAMPLE * 3


def bag_forward(
    const floating[:, ::1] weight,   # IN (num_rows, dim)
    const index_t[::1] idx,          # IN (n,) ids, checked here against num_rows
    const int64_t[::1] starts,       # IN (n_bags + 1,) bag bounds, starts[-1] <= n
    int64_t pad,                     # IN padding id, or -1
    int mode,                        # IN 0 sum, 1 mean, 2 max
    const floating[::1] psw,         # IN (n,) per-sample weights, or (0,) for none
    floating[:, ::1] out,            # OUT (n_bags, dim)
    int64_t[:, ::1] argmax,          # OUT (n_bags, dim) in max mode, else (0, 0)
    int64_t[::1] counts,             # OUT (n_bags,) non-padding entries per bag
    int n_threads,
    bint stream=False,               # IN sum/mean: write out with non-temporal stores
):
    """Pool each bag's rows: sum (optionally weighted), mean or element-wise max.

    Padding entries are skipped and not counted; an empty bag (or one of padding
    only) gives zeros, and in max mode an argmax of -1. Sums run in entry order per
    column at every SIMD level, so the bits never depend on the CPU.

    Ids are range-checked on the way (no row is read for a bad one), so a forward
    needs no separate validation pass. Returns the number of bags holding an id
    outside ``[0, num_rows)``; for such a bag ``counts[b]`` is ``-(e + 1)``, ``e``
    its first bad entry, and ``out`` is garbage. Entries past ``starts[-1]`` are not
    looked at. ``dim`` must be positive. ``stream``: a large output (many small
    bags) that will not be read back soon goes out past the caches; max mode ignores it.
    """
    cdef int64_t n_bags = starts.shape[0] - 1
    cdef int64_t num_rows = weight.shape[0]
    cdef int64_t dim = weight.shape[1]
    cdef int64_t n_idx = starts[n_bags] if n_bags >= 0 else 0
    cdef int64_t b, t, c
    cdef int64_t n_bad = 0
    cdef int flags
    cdef const floating* w = NULL
    cdef const floating* ps = NULL
    cdef const index_t* ix = NULL
    # rows are read at random: keep upcoming rows in flight (past the end of a bag:
    # the first rows of the next bag are requested while this one is summed), 32 KiB
    # of them, 8 to 64 rows. On an Intel Xeon 4 rows of 1 KiB came too late and 8 were
    # enough (D = 256 vs torch 1.02-1.04 -> 0.98-1.01); on an AMD EPYC (Zen 5), whose
    # shared L3 holds less of a skewed batch's rows, 4 KiB ahead came too late
    # (bag sum forward, 2 threads, V = 1e6, A/B with the prefetches of _simd_pool.h
    # spread among the adds: D = 64 uniform 1.27-1.45 -> 1.06-1.15 ms with 64 rows,
    # D = 256 Zipf 2.01-2.15 -> 1.55-1.57 with 32; D = 256 uniform level). A table
    # that fits in half the last-level cache gets 8 KiB of rows (_memory.pxd).
    cdef int64_t ahead = table_pool_distance(dim * sizeof(floating),
                                             num_rows * dim * sizeof(floating))
    cdef int level = _level_for_rows(dim * sizeof(floating))
    cdef pool_table fns = pool_table_at(level)
    cdef max_table mfns = max_table_at(level)
    if n_bags <= 0 or dim <= 0:
        return 0
    if num_rows > 0:
        w = &weight[0, 0]
    if idx.shape[0] > 0:
        ix = &idx[0]
    if psw.shape[0] > 0:
        ps = &psw[0]
    if mode == MODE_MAX:
        with nogil:
            for b in prange(n_bags, schedule="static", num_threads=n_threads):
                c = max_bag(&mfns, w, num_rows, dim, ix, starts[b], starts[b + 1], n_idx, pad,
                            ahead, &out[b, 0], &argmax[b, 0])
                counts[b] = c
                if c < 0:
                    n_bad += 1
        return n_bad
    # sum and mean: one kernel call per range of consecutive bags (no call per bag),
    # 16 ranges per thread, each thread claiming the next one as it comes free. A
    # static split (one range per thread) waits for the last thread to start: with
    # passive waiting (the benchmarks' setting) a sleeping worker wakes 30-50 us late
    # on a virtual machine, and the call ends that much after the caller's half.
    # The ranges are claimed in a parallel block, not a prange, whose start barrier
    # would make the caller wait for the late worker anyway (see _spin.h: se_claim).
    # Measured (2 threads, passive, bags of 32, D = 64, kernel alone, A/B in one
    # process, ratio to torch; static halves -> claimed ranges): 256 bags 1.35 ->
    # 0.45, 2,048 bags 1.47 -> 1.04, 8,192 bags in cache 1.19 -> 0.99, V = 1e6 Zipf
    # 1.09-1.13 -> 0.98-1.01; V = 1e6 uniform and D = 256 level. A bag's sum never
    # depends on its thread.
    n_threads = max(1, min(n_threads, n_bags))
    cdef int64_t n_ranges = claimed_parts(n_bags, n_threads)
    cdef long long next_range = 0
    cdef int tid
    cdef int64_t* bad_per_thread
    flags = ((SE_MEAN if mode == MODE_MEAN else 0) | (SE_STREAM if stream else 0)
             | pool_table_flags(num_rows * dim * sizeof(floating), dim * sizeof(floating)))
    flags = _far_line_flags(flags, ix, n_idx, num_rows * dim * sizeof(floating))
    if n_threads == 1:
        # all bags in one call, no parallel region: as the lookup's one-thread path
        with nogil:
            n_bad = pool_sum(&fns, w, num_rows, dim, ix, n_idx, &starts[0], 0, n_bags, pad,
                             ps, ahead, flags, &out[0, 0], NULL, &counts[0])
        return n_bad
    bad_per_thread = <int64_t*> calloc(n_threads, sizeof(int64_t))
    if bad_per_thread == NULL:
        raise MemoryError()
    with nogil, parallel(num_threads=n_threads):
        tid = omp_get_thread_num()
        c = claim_part(&next_range, n_ranges, n_threads)
        while c < n_ranges:
            bad_per_thread[tid] += pool_sum(&fns, w, num_rows, dim, ix, n_idx, &starts[0],
                                            c * n_bags // n_ranges,
                                            (c + 1) * n_bags // n_ranges, pad, ps, ahead,
                                            flags, &out[0, 0], NULL, &counts[0])
            c = claim_part(&next_range, n_ranges, n_threads)
    for t in range(n_threads):
        n_bad += bad_per_thread[t]
    free(bad_per_thread)
    return n_bad


def half_bag_forward(
    const uint16_t[:, ::1] weight,   # IN (num_rows, dim) float16 table, as its bits
    const index_t[::1] idx,          # IN (n,) ids, checked here against num_rows
    const int64_t[::1] starts,       # IN (n_bags + 1,) bag bounds, starts[-1] <= n
    int64_t pad,                     # IN padding id, or -1
    bint mean,                       # IN divide each bag's sum by its count
    const float[::1] psw,            # IN (n,) per-sample weights, or (0,) for none
    uint16_t[:, ::1] out,            # OUT (n_bags, dim) float16 results, as their bits
    int64_t[::1] counts,             # OUT (n_bags,) non-padding entries per bag
    int n_threads,
):
    """Sum or mean pooling of a float16 table's rows, read as they are, summed in
    float32 and rounded once (``_simd_half.h``): the bits of pooling the rows
    converted to float32, then rounding. Returns the number of bags holding an id
    outside ``[0, num_rows)`` (then ``counts[b] = -(e + 1)``, ``e`` the bag's first
    bad entry)."""
    cdef int64_t n_bags = starts.shape[0] - 1
    cdef int64_t num_rows = weight.shape[0]
    cdef int64_t dim = weight.shape[1]
    cdef int64_t n_idx = starts[n_bags] if n_bags >= 0 else 0
    cdef int64_t t, c, T, n_ranges, n_bad = 0
    cdef long long next_range = 0
    cdef int tid
    cdef int64_t* bad_per_thread = NULL
    cdef int failed = 0
    cdef int* failed_ptr = &failed
    cdef float* acc = NULL
    cdef const uint16_t* w = &weight[0, 0] if num_rows > 0 and dim > 0 else NULL
    cdef const index_t* ix = &idx[0] if idx.shape[0] > 0 else NULL
    cdef const float* ps = &psw[0] if psw.shape[0] > 0 else NULL
    # rows past SE_HALF_SPREAD bytes, and any rows of a table past half the
    # last-level cache, as far ahead as the float32 pooling's; narrower rows of a
    # cached table ~4 KiB, at least 8, a row's lines at once as its id is checked.
    # AMD EPYC, V = 1e6, 262,144 ids in bags of 32, 2 threads, ratio to torch, old
    # and new builds alternated: uniform ids D = 50 / 64 / 100 / 128 0.58 / 0.57-0.59
    # / 0.88-0.91 / 0.79 -> 0.41 / 0.41 / 0.58 / 0.69 (64, 64, 64 and 64 rows ahead
    # instead of 40, 32, 20 and 16), Zipf ids level but D = 128 1.16-1.18 -> 1.03
    cdef int64_t row_bytes = dim * <int64_t>sizeof(uint16_t)
    cdef int64_t ahead = (table_pool_distance(row_bytes, num_rows * row_bytes)
                          if row_bytes > HALF_SPREAD or not fits_in_cache(num_rows * row_bytes)
                          else max(8, prefetch_distance(row_bytes)))
    # rows of 8-15 values at the AVX2 level, whose vectors hold 8: at the AVX-512
    # level they are narrower than a vector and were summed one value at a time
    # (2,048 bags of 32, V = 1e5, 2 threads: D = 8 1.00 -> 0.20 ms, D = 12 1.54 ->
    # 0.21; torch 0.25 / 0.28)
    cdef half_pool_table fns = half_pool_table_at(min(pool_level(), 1) if dim < 16
                                                  else pool_level())
    # one pass per bag for rows that are not whole vectors (SE_HALF_CHUNK_LAST) at
    # every table size: unlike float32 rows, float16 ones gained over V = 1e6 on
    # the whole (2 threads, ratio to torch: Zipf ids D = 50 1.25-1.34 -> 1.12-1.19,
    # D = 100 1.29-1.34 -> 1.14-1.15; uniform D = 50 0.41-0.42 -> 0.39-0.40, D = 100
    # 0.58-0.62 -> 0.59-0.67)
    cdef int flags = (SE_MEAN if mean else 0) | SE_ONE_PASS
    if out.shape[0] != n_bags or out.shape[1] != dim or counts.shape[0] != n_bags:
        raise ValueError("out and counts must hold one row / count per bag")
    if n_idx > idx.shape[0] or (ps != NULL and psw.shape[0] < n_idx):
        raise ValueError("the bags run past the ids or the per-sample weights")
    if n_bags <= 0 or dim <= 0:
        return 0
    T = max(1, min(n_threads, n_bags))
    # ranges of bags claimed as threads come free, as in bag_forward
    n_ranges = claimed_parts(n_bags, T)
    bad_per_thread = <int64_t*> calloc(T, sizeof(int64_t))
    if bad_per_thread == NULL:
        raise MemoryError()
    with nogil, parallel(num_threads=T):
        tid = omp_get_thread_num()
        acc = <float*> malloc(dim * sizeof(float))  # the bag's float32 sums
        if acc == NULL:
            failed_ptr[0] = 1
        c = claim_part(&next_range, n_ranges, T)
        while c < n_ranges and acc != NULL:
            if index_t is int32_t:
                bad_per_thread[tid] += fns.i32(w, num_rows, dim, ix, n_idx, &starts[0],
                                               c * n_bags // n_ranges,
                                               (c + 1) * n_bags // n_ranges, pad, ps, ahead,
                                               flags, &out[0, 0], &counts[0], acc)
            else:
                bad_per_thread[tid] += fns.i64(w, num_rows, dim, ix, n_idx, &starts[0],
                                               c * n_bags // n_ranges,
                                               (c + 1) * n_bags // n_ranges, pad, ps, ahead,
                                               flags, &out[0, 0], &counts[0], acc)
            c = claim_part(&next_range, n_ranges, T)
        free(acc)
    for t in range(T):
        n_bad += bad_per_thread[t]
    free(bad_per_thread)
    if failed:
        raise MemoryError("could not allocate the float16 pooling's row buffer")
    return n_bad


def offsets_to_starts(
    const index_t[::1] offsets,      # IN (k,) bag starts as given
    int64_t[::1] starts,             # OUT (>= k,) starts[:k] = offsets
):
    """Copy ``offsets`` into ``starts`` and return the first position ``i`` where
    ``offsets[i] < offsets[i - 1]``, or -1 when they never decrease: one pass, where
    ``np.diff`` and ``min`` took two and a temporary (1M bags: 3.1 ms for the check
    and the copy before)."""
    cdef Py_ssize_t k = offsets.shape[0]
    cdef Py_ssize_t i, first = -1
    cdef bint decreases = False
    if starts.shape[0] < k:
        raise ValueError(f"starts holds {starts.shape[0]} entries, expected at least {k}")
    if k == 0:
        return -1
    with nogil:
        starts[0] = offsets[0]
        # a flag, not the first position: the loop vectorizes (no exit, no branch)
        for i in range(1, k):
            starts[i] = offsets[i]
            decreases = decreases | (offsets[i] < offsets[i - 1])
        if decreases:
            for i in range(1, k):
                if offsets[i] < offsets[i - 1]:
                    first = i
                    break
    return first


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
    and for entries past the last bag), accumulated in double (``_reduce.dot8``). The
    table rows are read at random: each thread prefetches its rows ahead, as the
    lookup does (8 KiB of rows). AMD EPYC, with prefetchnta then,
    262,144 entries, V = 1e6, old/new builds alternated in one process: D = 64
    uniform 4.8-5.1 -> 4.0-4.3 ms on one thread, D = 256 uniform 26-33 -> 14-27 on one
    and 11.7-14.7 -> 7.2-9.7 on two; Zipf ids level or faster (3-10%)."""
    cdef int64_t m = entry_bag.shape[0]
    cdef int64_t dim = weight.shape[1]
    cdef int64_t e, r, b, t, e_lo, e_hi
    cdef int64_t T = max(1, min(n_threads, m))
    cdef size_t row_bytes = dim * sizeof(floating)
    cdef int64_t ahead = gather_prefetch_distance(row_bytes)
    if m == 0 or dim == 0:
        return
    with nogil:
        for t in prange(T, schedule="static", num_threads=T):
            e_lo = m * t // T
            e_hi = m * (t + 1) // T
            for e in range(e_lo, e_hi):
                if e + ahead < e_hi:
                    prefetch_row(&weight[0, 0] + idx[e + ahead] * dim, row_bytes)
                r = idx[e]
                if r == pad:
                    out[e] = 0
                    continue
                b = entry_bag[e]
                out[e] = <floating> dot8(&grad[b, 0], &weight[r, 0], dim)


def entry_grad_rows(
    const int64_t[::1] perm,         # IN (m,) plan permutation over the entries
    const int64_t[::1] entry_bag,    # IN (n,) bag of each entry
    const floating[::1] scale,       # IN (n,) per-entry factor, or (0,) for none
    int64_t[::1] bag_of,             # OUT (m,) entry_bag[perm[k]]
    floating[::1] scale_of,          # OUT (m,) scale[perm[k]], or (0,) without scale
    int n_threads,
):
    """The plan in grad_output's terms: the bag (grad row) and the factor of each plan
    entry, so that sum and mean bags sum through the backward's SIMD row sums
    (``_backward``, ``weights`` = ``scale_of``) as the Embedding's rows do, in
    registers, rather than one entry at a time through :func:`bag_row_sum`."""
    cdef int64_t m = perm.shape[0]
    cdef int64_t n = entry_bag.shape[0]
    cdef bint has_scale = scale.shape[0] > 0
    cdef int64_t k, e
    cdef int64_t T = max(1, n_threads)
    if bag_of.shape[0] != m or (has_scale and (scale_of.shape[0] != m or scale.shape[0] != n)):
        raise ValueError(f"bag_of and scale_of must hold the plan's {m} entries, scale the "
                         f"{n} entries")
    with nogil:
        for k in prange(m, schedule="static", num_threads=T):
            e = perm[k]
            if 0 <= e < n:
                bag_of[k] = entry_bag[e]
                if has_scale:
                    scale_of[k] = scale[e]
            else:
                # never so in a plan; an id the row sums refuse (they stop the row)
                bag_of[k] = -1
                if has_scale:
                    scale_of[k] = 0


def won_masks(
    const int64_t[:, ::1] argmax,    # IN (n_bags, dim) winning entry per column, -1: none
    const int64_t[::1] entry_bag,    # IN (n,) bag of each entry
    uint64_t[:, ::1] won,            # OUT (n, (dim + 63) // 64)
    int n_threads,
):
    """Max mode's winners by entry: bit ``j % 64`` of ``won[e, j // 64]`` is set when
    ``argmax[entry_bag[e], j] == e`` (no other argmax entry counts), so that the
    backward reads one word per 64 columns of an entry instead of its bag's argmax
    row (``dim`` int64 per entry). Each thread owns a range of entries: it zeroes
    their masks, then looks through the bags they belong to."""
    cdef int64_t n = entry_bag.shape[0]
    cdef int64_t n_bags = argmax.shape[0]
    cdef int64_t dim = argmax.shape[1]
    cdef int64_t words = won.shape[1]
    cdef int64_t T = max(1, min(n_threads, n))
    cdef int64_t t, e_lo, e_hi, b_lo, b_hi, b, j, e
    _check_won(won, n, dim, True)
    if n == 0 or words == 0:
        return
    with nogil:
        for t in prange(T, schedule="static", num_threads=T):
            e_lo = n * t // T
            e_hi = n * (t + 1) // T
            memset(&won[e_lo, 0], 0, (e_hi - e_lo) * words * sizeof(uint64_t))
            # the bags of these entries (one contiguous range when entry_bag is
            # sorted, as a bag batch's is)
            b_lo = n_bags
            b_hi = 0
            for e in range(e_lo, e_hi):
                b_lo = min(b_lo, entry_bag[e])
                b_hi = max(b_hi, entry_bag[e] + 1)
            b_lo = max(b_lo, 0)
            b_hi = min(b_hi, n_bags)
            for b in range(b_lo, b_hi):
                for j in range(dim):
                    e = argmax[b, j]
                    if e_lo <= e < e_hi and entry_bag[e] == b:
                        won[e, j >> 6] |= (<uint64_t> 1) << (j & 63)


cdef inline void _pointers(
    const floating[::1] scale, const uint64_t[:, ::1] won,
    const floating** sp, const uint64_t** wp,
) noexcept nogil:
    sp[0] = &scale[0] if scale.shape[0] > 0 else NULL
    wp[0] = &won[0, 0] if won.shape[0] > 0 and won.shape[1] > 0 else NULL


def bag_dense_backward(
    const floating[:, ::1] grad,     # IN (n_bags, dim) grad_output
    const int64_t[::1] perm,         # IN (m,) plan permutation over the entries
    const int64_t[::1] rows,         # IN (U,) distinct rows
    const int64_t[::1] starts,       # IN (U + 1,) segment bounds into perm
    const int64_t[::1] entry_bag,    # IN (n,) bag of each entry
    const floating[::1] scale,       # IN (n,) per-entry factor, or (0,) for none
    const uint64_t[:, ::1] won,      # IN (n, words) max mode's won_masks, or (0, 0)
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (num_embeddings, dim), any content
    int n_threads,
    bint stream=False,               # IN write out with non-temporal stores
):
    """``out[rows[u]] = bag_row_sum(segment u)`` for every planned row and zeros in
    every other row, in one pass (``out`` need not be zero-filled first): each thread
    writes a contiguous range of rows, its segments' sums and the gaps between them.
    With ``stream`` every row goes out with non-temporal stores (a large table: no
    line is read before it is written)."""
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef int64_t num_rows = out.shape[0]
    cdef int64_t u, t, u_lo, u_hi
    cdef int64_t T = max(1, min(n_threads, num_rows))
    cdef int64_t words = won.shape[1]
    cdef const floating* sp
    cdef const uint64_t* wp
    cdef floating* buf = NULL
    cdef floating* dst
    cdef int failed = 0
    cdef int* failed_ptr = &failed
    if num_rows == 0 or dim == 0:
        return
    _check_won(won, entry_bag.shape[0], dim)
    if n_rows > 0 and rows[n_rows - 1] >= num_rows:
        raise ValueError(f"row {rows[n_rows - 1]} is outside out's {num_rows} rows")
    _pointers(scale, won, &sp, &wp)
    with nogil, parallel(num_threads=T):
        buf = <floating*> malloc(dim * sizeof(floating)) if stream else NULL
        for t in prange(T, schedule="static"):
            if stream and buf == NULL:
                failed_ptr[0] = 1
                continue
            # blocks with about the same work each: entries summed plus rows written
            u_lo = block_start_spanned(&starts[0], &rows[0], n_rows, num_rows, T, t,
                                       ENTRY_COST, ROW_COST) if n_rows > 0 else 0
            u_hi = block_start_spanned(&starts[0], &rows[0], n_rows, num_rows, T, t + 1,
                                       ENTRY_COST, ROW_COST) if n_rows > 0 else 0
            if n_rows == 0:
                zero_rows(&out[0, 0], dim, num_rows * t // T, num_rows * (t + 1) // T,
                          stream)
            else:
                zero_gaps(&out[0, 0], dim, &rows[0], u_lo, u_hi,
                          num_rows if t == T - 1 else -1, stream)
            for u in range(u_lo, u_hi):
                dst = &out[rows[u], 0]
                bag_row_sum(&grad[0, 0], dim, &perm[0], starts[u], starts[u + 1],
                            &entry_bag[0], sp, wp, words, scale_by_count,
                            buf if stream else dst)
                if stream:
                    stream_row(dst, buf, dim * sizeof(floating))
            if stream:
                stream_fence()
        free(buf)
    if failed:
        raise MemoryError("could not allocate the dense backward's row buffer")


def bag_max_dense_backward(
    const floating[:, ::1] grad,     # IN (n_bags, dim) grad_output
    const int64_t[:, ::1] argmax,    # IN (n_bags, dim) winning entry, -1 for none
    const index_t[::1] flat,         # IN (n,) the entries' ids
    floating[:, ::1] out,            # OUT (num_embeddings, dim), any content
    int n_threads,
    bint stream=False,               # IN zero-fill out with non-temporal stores
):
    """Max mode's dense gradient from the winners alone:
    ``out[flat[argmax[b, c]], c] += grad[b, c]`` over the bags in order, zeros
    elsewhere. No plan: the work is ``n_bags x dim`` adds after the fill, where the
    planned path (:func:`bag_dense_backward`) sorts all ``n`` entries and walks them.

    The threads zero-fill ranges of rows, then each adds a range of 64-byte column
    chunks (its own cache lines of each row where rows are whole lines) for every
    bag in order: each element's sum runs in bag order, as in the planned path's
    segments (entries in position order), so the bits are that path's and the same
    for every thread count. Returns the number of winners whose entry or id lies
    outside ``flat`` or ``out`` (skipped; 0 unless the caller broke its promise)."""
    cdef int64_t n_bags = grad.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef int64_t num_rows = out.shape[0]
    cdef int64_t n = flat.shape[0]
    cdef int64_t per_chunk = max(1, 64 // <int64_t>sizeof(floating))
    cdef int64_t n_chunks = (dim + per_chunk - 1) // per_chunk
    cdef int64_t T = max(1, n_threads)
    cdef int64_t T_cols = max(1, min(T, n_chunks))
    cdef int64_t t, b, c, c_lo, c_hi, e, r, n_bad = 0
    cdef const int64_t* am
    cdef const floating* g
    if argmax.shape[0] != n_bags or argmax.shape[1] != dim:
        raise ValueError(f"argmax must have shape ({n_bags}, {dim}), got "
                         f"({argmax.shape[0]}, {argmax.shape[1]})")
    if out.shape[1] != dim:
        raise ValueError(f"out must have {dim} columns, got {out.shape[1]}")
    if num_rows == 0 or dim == 0:
        return 0
    with nogil, parallel(num_threads=T):
        for t in prange(T, schedule="static"):
            zero_rows(&out[0, 0], dim, num_rows * t // T, num_rows * (t + 1) // T, stream)
            if stream:
                stream_fence()
        # (the end of a prange is a barrier: every row is zero before any add)
        for t in prange(T_cols, schedule="static"):
            c_lo = min(dim, n_chunks * t // T_cols * per_chunk)
            c_hi = min(dim, n_chunks * (t + 1) // T_cols * per_chunk)
            for b in range(n_bags):
                am = &argmax[b, 0]
                g = &grad[b, 0]
                for c in range(c_lo, c_hi):
                    e = am[c]
                    if e < 0:
                        continue
                    r = flat[e] if e < n else -1
                    if r < 0 or r >= num_rows:
                        n_bad += 1
                        continue
                    out[r, c] += g[c]
    return n_bad


cdef _check_won(const uint64_t[:, ::1] won, int64_t n, int64_t dim, bint required=False):
    """A won-mask array holds one row of (dim + 63) // 64 words per entry (or, when
    not ``required``, is empty: no max mode)."""
    if (required or won.shape[0] > 0) and (won.shape[0] != n or
                                           won.shape[1] != (dim + 63) // 64):
        raise ValueError(f"won must have shape ({n}, {(dim + 63) // 64}), "
                         f"got ({won.shape[0]}, {won.shape[1]})")


def bag_row_sums(
    const floating[:, ::1] grad,     # IN (n_bags, dim) grad_output
    const int64_t[::1] perm,         # IN (m,)
    const int64_t[::1] starts,       # IN (U + 1,)
    const int64_t[::1] entry_bag,    # IN (n,)
    const floating[::1] scale,       # IN (n,) or (0,)
    const uint64_t[:, ::1] won,      # IN (n, words) max mode's won_masks, or (0, 0)
    bint scale_by_count,
    floating[:, ::1] out,            # OUT (U, dim), one row per distinct id
    int n_threads,
):
    """``out[u] = bag_row_sum(segment u)``: the row-sparse gradient's values."""
    cdef int64_t n_rows = out.shape[0]
    cdef int64_t dim = grad.shape[1]
    cdef int64_t u, t, u_lo, u_hi
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef int64_t words = won.shape[1]
    cdef const floating* sp
    cdef const uint64_t* wp
    if n_rows == 0 or dim == 0:
        return
    _check_won(won, entry_bag.shape[0], dim)
    _pointers(scale, won, &sp, &wp)
    if T > n_rows:
        T = n_rows
    with nogil:
        # blocks of rows with about the same number of entries each (_split.pxd)
        for t in prange(T, schedule="static", num_threads=T):
            u_lo = block_start(&starts[0], n_rows, T, t)
            u_hi = block_start(&starts[0], n_rows, T, t + 1)
            for u in range(u_lo, u_hi):
                bag_row_sum(&grad[0, 0], dim, &perm[0], starts[u], starts[u + 1],
                            &entry_bag[0], sp, wp, words, scale_by_count, &out[u, 0])
