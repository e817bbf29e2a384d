/* Write-combined scatter for the radix plan (_plan.pyx).

   A radix pass scatters its words to one write stream per bucket. Written one word
   at a time, each stream's current line sits in L1 until it is full; with random
   ids that is ~1,000 lines touched at random, and with regular ids (a reversed or
   tiled arange) the streams advance in lockstep at addresses a multiple of 2 KiB
   apart, all in two of L1's 64 sets, and every store misses. Here each bucket
   collects its words in a line of its own (a thread's lines are consecutive, so
   they never collide) and a full line leaves with one 64-byte store, streamed
   past the caches where the CPU allows.

   Words are placed by their line in the destination: word `pos` of the output sits
   at index (pos + align) & 7 of its line, align = (dst's address / 8) % 8. The
   first line of a bucket's range and its last one can be shared with the ranges
   next to it (another bucket, another thread): their words go out one by one, so
   no whole-line store ever covers a word of someone else's range.
   sparsembed_stream_fence() (_stream.h) must run before another thread reads dst. */
#ifndef SPARSEMBED_RADIX_H
#define SPARSEMBED_RADIX_H

#include <stdint.h>
#include <string.h>
#include "_stream.h"

/* lines: n_buckets x 8 words, 64-byte aligned; first[b]: bucket b's first slot in
   this pass; slots[b]: its next slot */
static inline void sparsembed_wc_put(uint64_t* lines, const uint32_t* first, uint32_t* slots,
                                     uint64_t b, uint64_t* dst, uint32_t align, uint64_t word)
{
    uint32_t pos = slots[b];
    uint32_t q = (pos + align) & 7u;
    uint64_t* line = lines + 8 * b;
    uint32_t k;
    slots[b] = pos + 1;
    line[q] = word;
    if (q == 7u) {
        if (pos >= first[b] + 7u) {
            sparsembed_stream_row(dst + (pos - 7u), line, 64);
        } else {
            for (k = first[b]; k <= pos; k++) dst[k] = line[(k + align) & 7u];
        }
    }
}

/* the words still held: each bucket's last line, from the later of its first slot
   and that line's start */
static inline void sparsembed_wc_flush(const uint64_t* lines, const uint32_t* first,
                                       const uint32_t* slots, int64_t n_buckets,
                                       uint64_t* dst, uint32_t align)
{
    int64_t b;
    uint32_t k, lo, end, held;
    for (b = 0; b < n_buckets; b++) {
        end = slots[b];
        held = (end + align) & 7u;
        lo = end - first[b] < held ? first[b] : end - held;
        for (k = lo; k < end; k++) dst[k] = lines[8 * b + ((k + align) & 7u)];
    }
}

static inline uint32_t sparsembed_wc_align(const uint64_t* dst)
{
    return (uint32_t)(((uintptr_t)dst >> 3) & 7u);
}

#endif
