/* Row prefetches: the prefetch instructions, which 64-byte lines a row touches, and
 * how many rows ahead to ask for. Shared by _memory.pxd (the copy and update
 * kernels), _simd_pool.h (the SIMD pooling and row sums) and _mf.pyx. */
#ifndef SPARSEMBED_LINES_H
#define SPARSEMBED_LINES_H

#include <stddef.h>
#include <stdint.h>

/* Rows are prefetched into every cache level (T0). prefetchnta (rows read once:
   into L1, not kept in L2 and L3) gained 3-15% on an AMD EPYC (L3 32 MiB; lookups
   and poolings of tables past it), but on the Intel Xeon VM (L3 480 MiB, filled
   from L2's evictions) it made the bag sum forward 1.3-4.6x slower, in cache or not
   (262,144 ids in bags of 32, 2 threads, ratio to torch, builds alternated: V = 1e6
   D = 64 uniform 2.62 -> 1.04, Zipf 1.25 -> 0.99, D = 256 2.20 -> 1.09 / 2.04 ->
   1.07; V = 1e4 D = 64 2.94 -> 0.95, D = 256 4.58 -> 1.00), and the sparse
   backward's row sums with it (fwd + bwd D = 64 Zipf 14.3 -> 5.5 ms). The hint
   chosen at run time by vendor cost the in-cache pooling up to 5% (a test per
   prefetch) there: T0 on every CPU. SE_PREFETCH_L2: into L2 and L3, not L1 (the far
   prefetches below). SE_KEEP: GCC treats a function that only prefetches as const
   and deletes calls to it once it is not inlined early; an empty volatile asm keeps
   them. */
#if defined(__GNUC__) || defined(__clang__)
    #define SE_PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)
    #define SE_PREFETCH_L2(p) __builtin_prefetch((const void*)(p), 0, 1)
    #define SE_KEEP() __asm__ __volatile__("")
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
    #include <xmmintrin.h>
    #define SE_PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
    #define SE_PREFETCH_L2(p) _mm_prefetch((const char*)(p), _MM_HINT_T2)
    #define SE_KEEP() ((void)0)
#else
    #define SE_PREFETCH(p) ((void)0)
    #define SE_PREFETCH_L2(p) ((void)0)
    #define SE_KEEP() ((void)0)
#endif

/* Whether the nbytes (> 0) at p reach into a line past the ceil(nbytes / 64) lines
 * from p's own. A row that does not start on a line boundary (numpy's large arrays
 * start 16 bytes past one: a user's grad_output or table) spans one line more,
 * which prefetches of p + 64 k alone never fetch: a demand miss on every row. Row
 * sums of 262,144 uniform ids, 64 floats, from a numpy grad_output, 2 threads, AMD
 * EPYC: 5.3 ms with that miss, 2.7 ms with the extra prefetch (2.4-2.6 from an
 * aligned copy of the same rows). */
#define SE_SPANS_EXTRA_LINE(p, nbytes)                                               \
    ((((uintptr_t)(p) & 63) + (size_t)(nbytes) - 1) / 64 >= ((size_t)(nbytes) + 63) / 64)

/* Whether a row of a table at `base`, rows `row_bytes` apart, may start off a line
 * boundary: checked once per call, to pick the loop variant that prefetches each
 * row's last byte too (a check per row cost aligned tables instructions). */
#define SE_ROWS_MAY_SKEW(base, row_bytes)                                            \
    ((((uintptr_t)(base) | (uintptr_t)(row_bytes)) & 63) != 0)

/* Every 64-byte line that [p, p + nbytes) touches, for reading. */
static inline void sparsembed_prefetch_row(const void* p, size_t nbytes)
{
    const char* c = (const char*)p;
    size_t o;
    for (o = 0; o < nbytes; o += 64) SE_PREFETCH(c + o);
    if (nbytes && SE_SPANS_EXTRA_LINE(c, nbytes)) SE_PREFETCH(c + nbytes - 1);
    SE_KEEP();
}

/* The line at p, into L2 (and L3), not L1. */
static inline void sparsembed_prefetch_line_l2(const void* p)
{
    SE_PREFETCH_L2(p);
    SE_KEEP();
}

/* How many rows of row_bytes make `span` bytes, clamped to [lo, hi] (hi for empty
 * rows): the prefetch distances (here and in _memory.pxd). */
static inline ptrdiff_t sparsembed_rows_ahead(size_t row_bytes, size_t span, size_t lo,
                                              size_t hi)
{
    size_t d = row_bytes ? span / row_bytes : hi;
    return (ptrdiff_t)(d < lo ? lo : (d > hi ? hi : d));
}

/* Rows ahead for a second prefetch, into L2, of rows read from past the caches,
 * where the T0 prefetch a few KiB ahead keeps only as many misses in flight as L1's
 * fill buffers hold (measurements: _simd_pool.h, SE_FAR and SE_FAR_LINE; _memory.pxd,
 * gather_far_distance). sparsembed_far_rows: every line of the row, 64 KiB of rows
 * on (the row sums of a large grad_output, read once each); sparsembed_far_line_rows:
 * its first line only, 16 KiB of rows on (table rows, which Zipf ids find cached:
 * one instruction a row, not one a line). Both 16 to 256 rows. */
static inline ptrdiff_t sparsembed_far_rows(size_t row_bytes)
{
    return sparsembed_rows_ahead(row_bytes, (size_t)64 << 10, 16, 256);
}

static inline ptrdiff_t sparsembed_far_line_rows(size_t row_bytes)
{
    return sparsembed_rows_ahead(row_bytes, (size_t)16 << 10, 16, 256);
}

#endif
