"""Row plan of a batch: a stable sort of the ids, computed once per batch and reused
by renorm, counts, the backward passes and the optimizers.

The sort is a parallel LSD radix sort over contiguous chunks. A stable sort has one
answer, so the permutation is identical for every thread count, and each row's
occurrences stay in input order: later per-row sums run in a fixed order.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t
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
