/* Row prefetches: which 64-byte lines a row touches, and how many rows ahead to ask
 * for. Shared by _memory.pxd (the copy and update kernels) and _simd_pool.h (the
 * SIMD pooling and row sums). */
#ifndef SPARSEMBED_LINES_H
#define SPARSEMBED_LINES_H

#include <stddef.h>
#include <stdint.h>

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
