"""Row plan of a batch: a stable sort of the ids, computed once per batch and reused
by renorm, counts, the backward passes and the optimizers.

The sort is a parallel LSD radix sort over contiguous chunks. A stable sort has one
answer, so the permutation is identical for every thread count, and each row's
occurrences stay in input order: later per-row sums run in a fixed order.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

from sparsembed._kernels._types cimport index_t

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
# Small key range (num_rows <= n): one counting sort -- per-thread histograms of the
# ids, a prefix sum that also yields the distinct rows and their segment starts, and
# one stable scatter. Large key range: LSD radix sort on uint32 (key, position) pairs
# with balanced digits of at most 13 bits (two passes up to 2**26 rows), then one
# pass that widens the positions to int64 and finds the segments. Every pass splits
# its input into the same T contiguous chunks, so the result (a stable sort) does not
# depend on T.

cdef enum:
    MAX_DIGIT_BITS = 13


def build_plan(
    const index_t[::1] idx,      # IN (n,) validated ids in [0, num_rows)
    int64_t skip_row,            # IN an id to leave out (padding), or -1
    int64_t num_rows,            # IN exclusive upper bound of the ids, <= 2**32
    int64_t[::1] perm_out,       # OUT (n,) positions grouped by id, first m valid
    int64_t[::1] rows_out,       # OUT (n,) sorted distinct ids, first n_rows valid
    int64_t[::1] starts_out,     # OUT (n + 1,) segment bounds, first n_rows + 1 valid
    int n_threads,
    uint32_t[::1] scratch=None,  # IN/OUT optional work space of >= 4 * n entries
):
    """Stable sort of the ids other than ``skip_row`` and its segments.

    Returns ``(m, n_rows)``: ``perm_out[:m]`` lists the positions grouped by id (input
    order within an id), ``rows_out[:n_rows]`` the distinct ids and
    ``perm_out[starts_out[u]:starts_out[u + 1]]`` the positions of ``rows_out[u]``.
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
    if num_rows <= n or num_rows <= 4096:
        m, n_rows = _counting_plan(idx, skip_row, num_rows, perm_out, rows_out, starts_out, T)
    else:
        if scratch is not None and scratch.shape[0] < 4 * n:
            raise ValueError("scratch must hold 4 * n entries")
        m, n_rows = _radix_plan(idx, skip_row, num_rows, perm_out, rows_out, starts_out, T,
                                NULL if scratch is None else &scratch[0])
    return m, n_rows


cdef _counting_plan(const index_t[::1] idx, int64_t skip_row, int64_t R,
                    int64_t[::1] perm_out, int64_t[::1] rows_out,
                    int64_t[::1] starts_out, int64_t T):
    cdef int64_t n = idx.shape[0]
    cdef int64_t t, i, b, lo, hi, k, u = 0, running = 0, c
    cdef uint32_t* hist = <uint32_t*> calloc(T * R, sizeof(uint32_t))
    cdef uint32_t* h
    if hist == NULL:
        raise MemoryError()
    try:
        with nogil:
            for t in prange(T, schedule="static", num_threads=T):
                lo = _chunk_lo(n, T, t)
                hi = _chunk_lo(n, T, t + 1)
                h = hist + t * R
                for i in range(lo, hi):
                    h[idx[i]] += 1
            if 0 <= skip_row < R:
                for t in range(T):
                    hist[t * R + skip_row] = 0
            # prefix over (id, chunk): chunk t's first slot for id b, and the segments
            for b in range(R):
                c = running
                for t in range(T):
                    k = hist[t * R + b]
                    hist[t * R + b] = <uint32_t> running
                    running = running + k
                if running != c:
                    rows_out[u] = b
                    starts_out[u] = c
                    u = u + 1
            starts_out[u] = running
            for t in prange(T, schedule="static", num_threads=T):
                lo = _chunk_lo(n, T, t)
                hi = _chunk_lo(n, T, t + 1)
                h = hist + t * R
                for i in range(lo, hi):
                    k = idx[i]
                    if k != skip_row:
                        perm_out[h[k]] = i
                        h[k] += 1
    finally:
        free(hist)
    return running, u


cdef _radix_plan(const index_t[::1] idx, int64_t skip_row, int64_t R,
                 int64_t[::1] perm_out, int64_t[::1] rows_out,
                 int64_t[::1] starts_out, int64_t T, uint32_t* scratch):
    cdef int64_t n = idx.shape[0]
    cdef int64_t t, i, b, lo, hi, m, running, d, pos, k, u
    cdef int64_t n_bits = 0, n_pass, digit_bits, n_buckets, p, shift
    cdef bint last
    cdef uint32_t mask
    cdef uint32_t* hist = NULL
    cdef uint32_t* h
    cdef uint32_t* buf = NULL
    cdef uint32_t* src_k
    cdef uint32_t* src_p
    cdef uint32_t* dst_k
    cdef uint32_t* dst_p
    cdef uint32_t* swap
    cdef int64_t* counts = NULL
    while (R - 1) >> n_bits:
        n_bits += 1
    n_pass = (n_bits + MAX_DIGIT_BITS - 1) // MAX_DIGIT_BITS
    digit_bits = (n_bits + n_pass - 1) // n_pass
    n_buckets = (<int64_t> 1) << digit_bits
    mask = <uint32_t> (n_buckets - 1)

    hist = <uint32_t*> malloc(T * n_buckets * sizeof(uint32_t))
    buf = scratch if scratch != NULL else <uint32_t*> malloc(4 * n * sizeof(uint32_t))
    counts = <int64_t*> calloc(T + 1, sizeof(int64_t))
    if hist == NULL or buf == NULL or counts == NULL:
        free(hist); free(counts)
        if scratch == NULL:
            free(buf)
        raise MemoryError()
    src_k = buf
    src_p = buf + n
    dst_k = buf + 2 * n
    dst_p = buf + 3 * n
    try:
        with nogil:
            # pass 0 reads the ids themselves, leaving skip_row out
            memset(hist, 0, T * n_buckets * sizeof(uint32_t))
            for t in prange(T, schedule="static", num_threads=T):
                lo = _chunk_lo(n, T, t)
                hi = _chunk_lo(n, T, t + 1)
                h = hist + t * n_buckets
                for i in range(lo, hi):
                    if idx[i] != skip_row:
                        h[<uint32_t> idx[i] & mask] += 1
            running = 0
            for b in range(n_buckets):
                for t in range(T):
                    d = hist[t * n_buckets + b]
                    hist[t * n_buckets + b] = <uint32_t> running
                    running = running + d
            m = running
            last = n_pass == 1
            for t in prange(T, schedule="static", num_threads=T):
                lo = _chunk_lo(n, T, t)
                hi = _chunk_lo(n, T, t + 1)
                h = hist + t * n_buckets
                for i in range(lo, hi):
                    k = idx[i]
                    if k != skip_row:
                        pos = h[<uint32_t> k & mask]
                        h[<uint32_t> k & mask] = <uint32_t> (pos + 1)
                        dst_k[pos] = <uint32_t> k
                        if last:  # the last pass puts the positions where they go
                            perm_out[pos] = i
                        else:
                            dst_p[pos] = <uint32_t> i
            swap = src_k; src_k = dst_k; dst_k = swap
            swap = src_p; src_p = dst_p; dst_p = swap

            for p in range(1, n_pass):
                shift = p * digit_bits
                last = p == n_pass - 1
                memset(hist, 0, T * n_buckets * sizeof(uint32_t))
                for t in prange(T, schedule="static", num_threads=T):
                    lo = _chunk_lo(m, T, t)
                    hi = _chunk_lo(m, T, t + 1)
                    h = hist + t * n_buckets
                    for i in range(lo, hi):
                        h[(src_k[i] >> shift) & mask] += 1
                running = 0
                for b in range(n_buckets):
                    for t in range(T):
                        d = hist[t * n_buckets + b]
                        hist[t * n_buckets + b] = <uint32_t> running
                        running = running + d
                for t in prange(T, schedule="static", num_threads=T):
                    lo = _chunk_lo(m, T, t)
                    hi = _chunk_lo(m, T, t + 1)
                    h = hist + t * n_buckets
                    for i in range(lo, hi):
                        d = (src_k[i] >> shift) & mask
                        pos = h[d]
                        h[d] = <uint32_t> (pos + 1)
                        dst_k[pos] = src_k[i]
                        if last:
                            perm_out[pos] = src_p[i]
                        else:
                            dst_p[pos] = src_p[i]
                swap = src_k; src_k = dst_k; dst_k = swap
                swap = src_p; src_p = dst_p; dst_p = swap

            # the segments: count run starts per chunk, then write them at the
            # chunk's offset
            for t in prange(T, schedule="static", num_threads=T):
                lo = _chunk_lo(m, T, t)
                hi = _chunk_lo(m, T, t + 1)
                u = 0
                for i in range(lo, hi):
                    if i == 0 or src_k[i] != src_k[i - 1]:
                        u = u + 1
                counts[t + 1] = u
            for t in range(T):
                counts[t + 1] += counts[t]
            for t in prange(T, schedule="static", num_threads=T):
                lo = _chunk_lo(m, T, t)
                hi = _chunk_lo(m, T, t + 1)
                u = counts[t]
                for i in range(lo, hi):
                    if i == 0 or src_k[i] != src_k[i - 1]:
                        rows_out[u] = src_k[i]
                        starts_out[u] = i
                        u = u + 1
            u = counts[T]
            starts_out[u] = m
    finally:
        free(hist); free(counts)
        if scratch == NULL:
            free(buf)
    return m, u
