# Memory helpers for the hot loops: software prefetch of a row that will be read
# soon (the instructions and row prefetches are _lines.h's, shared with the SIMD
# pooling), prefetch distances, row copies and the last-level cache's size. Inline
# C, so it costs nothing where the compiler has no prefetch builtin (the fallback is
# a no-op); never ISA-specific beyond SSE, which x86-64 always has.
cdef extern from *:
    """
    #include <stddef.h>
    #include <stdio.h>
    #include <string.h>
    #include "_lines.h"
    /* copy a row; the common widths (16-128 floats) with a size known at compile
       time, which the compiler turns into inline moves: a memcpy of a run-time size
       is a call into libc per row, most of the cost of a 64-512 byte row in cache
       (a loop of fixed 64-byte copies does not do: GCC turns it back into that call) */
    static inline void sparsembed_copy_row(void* dst, const void* src, size_t nbytes) {
        switch (nbytes) {
        /* narrow rows (bias tables, D = 1-8 floats, 1-4 doubles): a call into libc
           per 4-32 bytes cost 3x numpy's take (lookup of 262,144 ids, D = 1: 0.84
           against 0.20 ms) */
        case 4: memcpy(dst, src, 4); return;
        case 8: memcpy(dst, src, 8); return;
        case 12: memcpy(dst, src, 12); return;
        case 16: memcpy(dst, src, 16); return;
        case 20: memcpy(dst, src, 20); return;
        case 24: memcpy(dst, src, 24); return;
        case 28: memcpy(dst, src, 28); return;
        case 32: memcpy(dst, src, 32); return;
        case 48: memcpy(dst, src, 48); return;
        case 64: memcpy(dst, src, 64); return;
        case 128: memcpy(dst, src, 128); return;
        case 256: memcpy(dst, src, 256); return;
        case 512:
            /* two halves: GCC emits a 512-byte memcpy as `rep movsq`, which costs
               ~2x the moves on an AMD EPYC (lookup of 16,384 in-cache rows of 64
               float64, one thread: 0.41 ms, torch 0.21) */
            memcpy(dst, src, 256);
            memcpy((char*)dst + 256, (const char*)src + 256, 256);
            return;
        default: memcpy(dst, src, nbytes);
        }
    }
    /* (sparsembed_rows_ahead, in _lines.h, gives the prefetch distances below) */
    /* how many rows ahead to prefetch: 4 KiB of rows, 4 to 32 */
    static inline ptrdiff_t sparsembed_prefetch_distance(size_t row_bytes) {
        return sparsembed_rows_ahead(row_bytes, 4096, 4, 32);
    }
    /* rows ahead for the lookup's copies: 8 KiB of rows, 4 to 32. On an AMD EPYC
       (262,144 ids, V = 1e6, 2 threads, distances switched in one process, two
       runs): D = 64 uniform 3.12 / 3.31 -> 2.93 / 2.87 ms against 4 KiB, D = 256
       Zipf 7.87 / 6.12 -> 7.29 / 5.68; D = 64 Zipf and D = 256 uniform level */
    static inline ptrdiff_t sparsembed_gather_prefetch_distance(size_t row_bytes) {
        return sparsembed_rows_ahead(row_bytes, 8192, 4, 32);
    }
    /* rows ahead for the bag pooling, whose prefetches go out one line per add:
       32 KiB of rows, 8 to 64 (see _bag.pyx: bag_forward) */
    static inline ptrdiff_t sparsembed_pool_prefetch_distance(size_t row_bytes) {
        return sparsembed_rows_ahead(row_bytes, 32768, 8, 64);
    }
    /* The size of the last-level cache in bytes: the largest cache of cpu0 that
       Linux's sysfs lists (what lscpu shows), else 32 MiB. Not glibc's
       sysconf(_SC_LEVEL3_CACHE_SIZE): on the AMD EPYC VM it reads 384 MiB (the
       host's), where sysfs and the guest's measured behaviour say 32 MiB. Read
       once per module; the first call is made holding the GIL. */
    static size_t sparsembed_llc = 0;  /* this module's; 0 until first read */
    static size_t sparsembed_llc_bytes(void) {
        size_t llc = sparsembed_llc;
        if (llc == 0) {
            size_t best = 0;
    #if defined(__linux__)
            int i;
            for (i = 0; i < 8; i++) {
                char path[64];
                unsigned long kib = 0;
                char unit = 0;
                FILE* f;
                snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
                f = fopen(path, "r");
                if (f == NULL) continue;
                if (fscanf(f, "%lu%c", &kib, &unit) >= 1) {
                    size_t bytes = (size_t)kib * (unit == 'M' ? 1048576 : (unit == 'K' ? 1024 : 1));
                    if (bytes > best) best = bytes;
                }
                fclose(f);
            }
    #endif
            llc = best >= ((size_t)1 << 20) ? best : ((size_t)32 << 20);
            sparsembed_llc = llc;
        }
        return llc;
    }
    /* For tests: the size this module's kernels take the last-level cache to be
       (0: read it again), so that a small table can stand for one past half of it
       on any machine. Returns the size now in use. Call it holding the GIL, with no
       kernel of the module running. */
    static size_t sparsembed_set_llc_bytes(size_t nbytes) {
        sparsembed_llc = nbytes;
        return sparsembed_llc_bytes();
    }
    /* Rows ahead for pooling the rows of a table of table_bytes. One that fits in
       half the last-level cache is read from there at cache latency: 8 KiB of
       rows, 8 to 32, keep enough in flight, where the 32 KiB of rows that hide
       DRAM's latency pushed rows out of L1 before their adds. Chosen on the AMD
       EPYC (L1 48 KiB, L3 32 MiB) from distances switched in one process; then
       old/new builds alternated, bag sum forward of 262,144 uniform ids in bags
       of 32, 2 threads, ratio to torch: V = 1e4 D = 64 1.10-1.14 -> 1.03-1.06, D =
       100 1.18 -> 0.97, D = 256 1.01 -> 0.97-1.00; V = 1e3 D = 100 1.56-1.59 ->
       1.30, D = 256 1.18-1.22 -> 0.97-0.98; V = 3e4 D = 100 1.04-1.06 -> 0.88-0.95;
       one thread V = 1e4 D = 100 1.30 -> 1.00; Zipf ids V = 1e4 D = 256 1.25 ->
       1.13; max pooling 5-7% faster. Tables past half the L3 keep the long
       distance, which they want (V = 1e5, D = 64: 0.69-0.73 with 64 rows, 0.86-0.91
       with 24), as do Zipf ids over V = 1e6, whose hot rows are cached (D = 256:
       1.04-1.16 with 32 rows, 1.13-1.31 with 16). */
    static inline int sparsembed_fits_in_cache(size_t nbytes) {
        return nbytes <= sparsembed_llc_bytes() / 2;
    }
    /* the bound past which rows read from memory are prefetched far ahead (the
       functions below): the cache's bound, but never more than 32 MiB */
    static inline size_t sparsembed_at_most_far_bytes(size_t cache_bound) {
        const size_t far_bytes = (size_t)32 << 20;
        return cache_bound < far_bytes ? cache_bound : far_bytes;
    }
    /* whether rows read once from a source of nbytes (the backward's grad_output, in
       plan order) are prefetched far ahead too (SE_FAR, _simd_pool.h): past half the
       last-level cache, or past 32 MiB whatever the cache. A grad_output of tens of
       MiB rarely survives in the cache the forward's traffic since it was written.
       Intel Xeon VM (sysfs L3 480 MiB), V = 1e6, D = 64, 2 threads, with and
       without in one process: 262,144 ids (64 MiB) sparse forward + backward
       uniform 15.9 -> 14.7 ms, Zipf 7.58 -> 7.01; SparseAdam step 34.8 -> 32.6
       (fused 31.6 -> 29.6), Adagrad 30.1 -> 28.0 (25.5 -> 24.2); Zipf steps 1.5-11%
       faster; 16,384 to 131,072 ids (4-32 MiB) level (-3% to +3%). */
    static inline int sparsembed_read_once_far(size_t nbytes) {
        return nbytes > sparsembed_at_most_far_bytes(sparsembed_llc_bytes() / 2);
    }
    /* whether nbytes are more than the last-level cache holds (the test for the
       far prefetches of table rows: gather_far_distance, SE_FAR_LINE) */
    static inline int sparsembed_past_cache(size_t nbytes) {
        return nbytes > sparsembed_llc_bytes();
    }
    /* Whether the pooling keeps the short distance for tables of any size: on Intel
       CPUs. The Intel Xeon VM (L3 480 MiB, L2 2 MiB a core), distances switched in
       one process, bag sum forward of 262,144 ids in bags of 32 over V = 1e6, 2
       threads, ratio to torch: D = 64 (244 MiB) uniform 0.996 with 64 rows ahead,
       0.954-0.968 with 8-32, Zipf 1.007 / 0.974-0.996 with 12-32; D = 256 (977 MiB,
       past the L3) uniform 1.090 with 32, 0.993-1.002 with 8-12, Zipf 1.021 /
       0.977-0.983. The AMD EPYC's tables past half its L3 wanted the long one.
       Read once per module (the first call holding the GIL), as llc_bytes. */
    static int sparsembed_short_pool_distance(void) {
        static int answer = -1;
        if (answer < 0) {
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
            __builtin_cpu_init();
            answer = __builtin_cpu_is("intel") ? 1 : 0;
    #else
            answer = 0;
    #endif
        }
        return answer;
    }
    /* Rows ahead for the lookup's second prefetch, of a row's first line into L2,
       for a table past the last-level cache (0 for one it holds): 16 KiB of rows,
       16 to 256. That miss goes out well before the row's T0 prefetch (8 KiB of
       rows ahead: gather_prefetch_distance), whose lines then come from L2 or are
       already on their way. Intel Xeon VM (L3 480 MiB), 262,144 ids, 2 threads,
       builds switched in one process: V = 1e6, D = 256 (977 MiB) uniform 20.6 ->
       18.4 ms, Zipf 7.85 -> 7.60; V = 1e7, D = 64 (2.4 GiB) uniform 5.4 -> 4.6-4.9
       with 32-64 rows, Zipf 2.56 -> 2.64; the whole row so prefetched: uniform 17%
       faster but Zipf 3-14% slower (their rows are cached: instructions).
       Past 32 MiB too, whatever the cache (as sparsembed_read_once_far): session 25
       found a table the L3 holds (V = 1e6, D = 64, 244 MiB) 9% slower with it, but
       session 27, with and without in one process, 262,144 ids, 2 threads: D = 64
       uniform lookup 6.26 -> 5.06 ms at V = 1e6, 4.40 -> 3.73 at 5e5 (122 MiB),
       3.05 -> 2.99 at 2.5e5 (61 MiB); the sparse forward + backward 15.3 -> 13.8,
       14.1 -> 12.6, 13.8 -> 12.9; Zipf ids level (-2% to +4%); 30 MiB level. */
    static inline int sparsembed_far_table(size_t table_bytes) {
        return table_bytes > sparsembed_at_most_far_bytes(sparsembed_llc_bytes());
    }
    static inline ptrdiff_t sparsembed_gather_far_distance(size_t row_bytes,
                                                           size_t table_bytes) {
        return sparsembed_far_table(table_bytes) ? sparsembed_far_line_rows(row_bytes) : 0;
    }
    static inline ptrdiff_t sparsembed_table_pool_distance(size_t row_bytes, size_t table_bytes) {
        if (sparsembed_fits_in_cache(table_bytes) || sparsembed_short_pool_distance())
            return sparsembed_rows_ahead(row_bytes, 8192, 8, 32);
        return sparsembed_pool_prefetch_distance(row_bytes);
    }
    """
    void prefetch_row "sparsembed_prefetch_row"(const void* p, size_t nbytes) noexcept nogil
    void prefetch_line_l2 "sparsembed_prefetch_line_l2"(const void* p) noexcept nogil
    void copy_row "sparsembed_copy_row"(void* dst, const void* src, size_t nbytes) noexcept nogil
    Py_ssize_t prefetch_distance "sparsembed_prefetch_distance"(size_t row_bytes) noexcept nogil
    Py_ssize_t gather_prefetch_distance "sparsembed_gather_prefetch_distance"(
        size_t row_bytes) noexcept nogil
    Py_ssize_t pool_prefetch_distance "sparsembed_pool_prefetch_distance"(
        size_t row_bytes) noexcept nogil
    Py_ssize_t gather_far_distance "sparsembed_gather_far_distance"(
        size_t row_bytes, size_t table_bytes) noexcept nogil
    Py_ssize_t table_pool_distance "sparsembed_table_pool_distance"(
        size_t row_bytes, size_t table_bytes) noexcept nogil
    size_t llc_bytes "sparsembed_llc_bytes"() noexcept nogil
    size_t set_llc_bytes "sparsembed_set_llc_bytes"(size_t nbytes) noexcept nogil
    # whether the pooling prefetches a table of any size as one in cache (Intel CPUs)
    bint short_pool_distance "sparsembed_short_pool_distance"() noexcept nogil
    # whether nbytes fit in half the last-level cache (the pooling's test of a table)
    bint fits_in_cache "sparsembed_fits_in_cache"(size_t nbytes) noexcept nogil
    # whether nbytes are more than the last-level cache
    bint past_cache "sparsembed_past_cache"(size_t nbytes) noexcept nogil
    # whether rows read at random from a table of nbytes are prefetched far ahead
    # (past the last-level cache or 32 MiB: gather_far_distance)
    bint far_table "sparsembed_far_table"(size_t table_bytes) noexcept nogil
    # whether rows read once from a source of nbytes are prefetched far ahead too
    bint read_once_far "sparsembed_read_once_far"(size_t nbytes) noexcept nogil



cdef inline size_t checked_set_llc_bytes(long long nbytes) except 0:
    # each module's set_last_level_cache_bytes (for tests; the size is the module's own)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return set_llc_bytes(<size_t> nbytes)


# Streamed (non-temporal) row stores: see _stream.h.
cdef extern from "_stream.h":
    void stream_row "sparsembed_stream_row"(void* dst, const void* src, size_t nbytes) noexcept nogil
    void stream_zero "sparsembed_stream_zero"(void* dst, size_t nbytes) noexcept nogil
    void stream_fence "sparsembed_stream_fence"() noexcept nogil
