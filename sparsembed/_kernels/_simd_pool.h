/* Sum pooling of rows picked by an index array, built once per x86 SIMD level and
 * picked at run time. It serves the EmbeddingBag forward (table rows by id) and
 * every backward row sum (grad_output rows by plan position: a row's segment of the
 * plan is a bag): the sparse and dense backward and the fused optimizer update.
 *
 * Why: the wheel is built for the baseline ISA (SSE2 on x86-64), whose 4-wide adds
 * leave a bag's sum compute-bound once its rows sit in cache (skewed ids, small
 * tables), and -march=native would make a wheel that crashes on older CPUs. Here
 * the same C body is compiled three times (baseline, AVX2, AVX-512F) through
 * function target attributes, and the widest one the CPU and OS support is used.
 *
 * Results are bitwise identical at every level: each output column is summed over
 * the bag's entries in entry order, lanes only run across columns, and the build
 * passes -ffp-contract=off so that no level fuses the weighted sum's multiply-add.
 *
 * SPARSEMBED_SIMD=baseline|avx2|avx512 in the environment caps the level (read once,
 * on first use); sparsembed_pool_set_level() does the same from the tests.
 *
 * This header holds the body (SE_DEFINE_POOL) and each including module's level;
 * the bodies themselves are instantiated by _simd_pool_bodies.h (baseline, AVX2: in
 * _sum_pooling) and _simd_pool_bodies_avx512.h (in _sum_pooling_avx512), whose
 * tables the other modules call through _sum_pooling.pool_table_at.
 */
#ifndef SPARSEMBED_SIMD_POOL_H
#define SPARSEMBED_SIMD_POOL_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_lines.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    #define SE_X86_DISPATCH 1
    #define SE_TARGET(isa) __attribute__((target(isa)))
#else
    #define SE_X86_DISPATCH 0
    #define SE_TARGET(isa)
#endif

#if defined(__GNUC__) || defined(__clang__)
    #define SE_ALWAYS_INLINE static inline __attribute__((always_inline))
    /* (helpers some including modules do not call: no warning there) */
    #define SE_MAYBE_UNUSED __attribute__((unused))
    #define SE_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
    #define SE_ALWAYS_INLINE static inline
    #define SE_MAYBE_UNUSED
    #define SE_UNLIKELY(x) (x)
#endif

enum { SE_LEVEL_BASELINE = 0, SE_LEVEL_AVX2 = 1, SE_LEVEL_AVX512 = 2 };

/* flags of the range functions (SE_ONE_PASS: see SE_CHUNK_LAST; SE_FAR and
   SE_FAR_LINE below) */
enum { SE_MEAN = 1, SE_STREAM = 2, SE_ZERO_GAPS = 4, SE_ONE_PASS = 8, SE_FAR = 16,
       SE_FAR_LINE = 32 };

/* With SE_FAR each entry also prefetches, into L2, the row 64 KiB of rows further on
   (16 to 256 rows: sparsembed_far_rows, _lines.h) than its T0 prefetch: for rows each
   read once from a source past the cache (the row sums of a grad_output past half
   the last-level cache, read in plan order), whose misses go to memory and outlast
   what L1's fill buffers keep in flight. Intel Xeon VM, V = 1e6, 262,144 ids, D = 256
   (1 KiB rows: 64 ahead), 2 threads, builds switched in one process: sparse backward
   uniform 19.6 -> 17.1 ms, Zipf 14.4 -> 12.1; dense backward 37.4 -> 34.6 / 37.7 ->
   35.0; Adagrad step (backward, then step) Zipf 34.7 -> 31.1 (16 rows ahead gained
   half of that, 256 a little less); the first line alone (as SE_FAR_LINE) 8-14%
   slower than the whole row. In a C loop over a 64 MiB grad_output (D = 64, cached
   in L3) the same prefetches cost up to 10%, so sources that fit in half the cache
   go without.
   With SE_FAR_LINE (the bag sums of a table past the last-level cache) only the
   row's first line goes out, 16 KiB of rows on (sparsembed_far_line_rows): Zipf ids
   find most rows cached, where a prefetch per line cost instructions (whole rows:
   V = 1e6, D = 256, 3.0 -> 3.8 ms). Bag sum forward, 8,192 bags of 32, same
   machine and method: V = 1e6 D = 256 uniform 16.9 -> 15.5 ms, Zipf 3.09 -> 2.83;
   V = 2e6 D = 128 uniform 7.08 -> 6.51, Zipf 1.60 -> 1.54; V = 1e7 D = 64 uniform
   3.95 -> 3.47 but Zipf 0.99 -> 1.05, and a table the L3 holds (V = 1e6, D = 64)
   Zipf 0.75 -> 0.80: rows under 512 bytes and tables the L3 holds go without
   (_simd.pxd: pool_table_flags). */

/* Store vector v at p (aligned to its size) with a non-temporal store: a large
 * output that is not read back soon skips the read-for-ownership of its lines. One
 * per SIMD level (passed to SE_DEFINE_POOL), since the instruction and register
 * width differ; the register is printed as xmm / ymm / zmm from v's size. */
#if SE_X86_DISPATCH
    #define SE_NT_SSE(p, v) __asm__ volatile("movntps %1, %0" : "=m"(*(VEC*)(p)) : "x"(v))
    #define SE_NT_AVX(p, v) __asm__ volatile("vmovntps %1, %0" : "=m"(*(VEC*)(p)) : "x"(v))
    #define SE_NT_AVX512(p, v) __asm__ volatile("vmovntps %1, %0" : "=m"(*(VEC*)(p)) : "v"(v))
    #define SE_STREAM_FENCE() __asm__ volatile("sfence" ::: "memory")
#else
    #define SE_NT_SSE(p, v) memcpy((p), &(v), sizeof(v))
    #define SE_STREAM_FENCE() ((void)0)
#endif

#include "_stream.h"

/* Streamed rows that are not whole lines (a width such as 100 or 300 floats) or
 * that are divided after summing go through a stage: each row is summed into a
 * buffer at its destination's offset within a line, right after the bytes the
 * previous row left in the line they share, then every whole line of the buffer is
 * streamed out and the rest carried to its front for the next row. So each line is
 * written whole by one burst of non-temporal stores. Stored in place, such rows
 * mixed plain stores (vectors off their alignment, the columns past the last whole
 * vector) and streamed ones in a line, and the division read streamed lines back
 * (measured, 262,144 uniform ids, 2 threads: row sums at D = 300 28 ms, as slow as
 * plain stores, against 17 ms at D = 304). A line the rows do not fill from its
 * start (the first and last of a block, rows that are not consecutive) is written
 * with plain stores: correct when another thread writes the rest of it. */
typedef struct {
    char* mem;       /* malloc'd, NULL when the rows are stored in place */
    char* buf;       /* mem rounded up to a line; NULL when not staging */
    char* held_at;   /* where the `held` bytes at buf[0:held] belong */
    size_t held;
} se_stage;

/* Whether rows of row_bytes at out, written with `flags`, go through a stage */
static inline int se_stage_wanted(const void* out, size_t row_bytes, int flags)
{
    return (flags & SE_STREAM) && ((flags & SE_MEAN) || (((uintptr_t)out | row_bytes) & 63));
}

static inline void se_stage_init(se_stage* st, int wanted, size_t row_bytes)
{
    st->mem = wanted ? (char*)malloc(row_bytes + 128) : NULL;  /* NULL: in place */
    st->buf = st->mem ? (char*)(((uintptr_t)st->mem + 63) & ~(uintptr_t)63) : NULL;
    st->held_at = NULL;
    st->held = 0;
}

/* the held bytes with plain stores */
static inline void se_stage_flush(se_stage* st)
{
    if (st->held) memcpy(st->held_at, st->buf, st->held);
    st->held = 0;
}

/* dst's offset in its line, after storing the held bytes unless dst continues them */
static inline size_t se_stage_at(se_stage* st, const char* dst)
{
    size_t off = (uintptr_t)dst & 63;
    if (st->held && (st->held != off || st->held_at + off != dst)) se_stage_flush(st);
    return off;
}

/* where to sum the row bound for dst */
static inline char* se_stage_row(se_stage* st, char* dst)
{
    return st->buf + se_stage_at(st, dst);
}

/* nbytes of zeros at dst (rows no id touches, between summed ones) through the same
 * stage: a line they share with the rows around them goes out whole too */
SE_MAYBE_UNUSED static void se_stage_zero(se_stage* st, char* dst, size_t nbytes)
{
    size_t off, k, whole;
    if (nbytes == 0) return;
    off = se_stage_at(st, dst);
    if (off) {
        k = 64 - off < nbytes ? 64 - off : nbytes;
        if (st->held) {
            memset(st->buf + off, 0, k);
            st->held = off + k;
            if (st->held < 64) return;
            sparsembed_stream_row(st->held_at, st->buf, 64);
            st->held = 0;
        } else {
            memset(dst, 0, k);  /* nothing of this line before the zeros: plain */
        }
        dst += k;
        nbytes -= k;
    }
    whole = nbytes & ~(size_t)63;
    sparsembed_stream_zero(dst, whole);
    if (nbytes > whole) {
        st->held = nbytes - whole;
        st->held_at = dst + whole;
        memset(st->buf, 0, st->held);
    }
}

/* the row summed at se_stage_row(st, dst): out with its whole lines */
SE_MAYBE_UNUSED static void se_stage_store(se_stage* st, char* dst, size_t row_bytes)
{
    size_t off = (uintptr_t)dst & 63, end = off + row_bytes, first = 0, whole;
    char* line = dst - off;
    if (off && !st->held) {
        /* nothing of this line before the row: its part of it with plain stores */
        first = end < 64 ? end : 64;
        memcpy(dst, st->buf + off, first - off);
        if (end <= 64) return;
    }
    whole = end & ~(size_t)63;
    if (whole > first) sparsembed_stream_row(line + first, st->buf + first, whole - first);
    st->held = end - whole;
    st->held_at = line + whole;
    if (st->held) memmove(st->buf, st->buf + whole, st->held);
}

static inline void se_stage_done(se_stage* st)
{
    se_stage_flush(st);
    free(st->mem);
}

/* One pass over a bag's entries for the NV vectors of columns at j0, adding into
 * acc[0:NV] (NV is a constant: the loops unroll and acc lives in registers).
 * FIRST (a constant too): the first pass, which also prefetches the row `ahead`
 * entries on, range-checks each id and counts the non-padding entries (as the
 * bag's length less its padding entries); later passes find their rows in cache
 * and do none of it. HASPAD: some valid id is the padding id (else no per-entry
 * compare is needed). CLAMP: the entry `ahead` on may be past the end. SKEW (not
 * with HASPAD): rows may start off a line boundary, so the row's last byte is
 * prefetched too.
 * Once a bag's rows are in cache (skewed ids) the loop is bound by instructions,
 * so the common case carries none it does not need. */
#define SE_ROW_STEP(NV, FIRST, WEIGHTED, HASPAD, CLAMP, SKEW)                        \
    {                                                                                \
        int64_t r;                                                                   \
        const SE_T* w;                                                               \
        int v_, l_;                                                                  \
        /* this pass's lines of the row `ahead` entries on (a prefetch never        \
           faults, even for an id still to be range-checked), in a burst before the \
           adds (and before a padding entry skips them). Was one per line among the  \
           adds, FBGEMM's order, 2-5% faster with T0 prefetches and the width known  \
           at run time only; with prefetchnta (then) and the common widths as        \
           constants (SE_BAG_AT), builds alternated on an AMD EPYC: D = 64           \
           uniform on one thread 1.72 -> 1.28 ms, other widths, Zipf ids and two     \
           threads level */                                                          \
        int64_t pe = CLAMP ? (e + ahead < n ? e + ahead : n - 1) : e + ahead;        \
        const char* p = (const char*)(weight + (int64_t)idx[pe] * dim + j0);         \
        for (l_ = 0; l_ < (int)((NV * sizeof(VEC) + 63) / 64); l_++)                 \
            SE_PREFETCH(p + 64 * l_);                                                \
        if (HASPAD ? SE_SPANS_EXTRA_LINE(p, span_) : SKEW)                           \
            SE_PREFETCH(p + span_ - 1);                                              \
        if (far) {                                                                   \
            /* (a loop-invariant test: no cost measured in the cached bag sums) */     \
            int64_t pf_ = e + far < n ? e + far : n - 1;                             \
            const char* q_ = (const char*)(weight + (int64_t)idx[pf_] * dim + j0);   \
            if (far_line)                                                            \
                SE_PREFETCH_L2(q_);                                                  \
            else                                                                     \
                for (l_ = 0; l_ < (int)((NV * sizeof(VEC) + 63) / 64); l_++)         \
                    SE_PREFETCH_L2(q_ + 64 * l_);                                    \
        }                                                                            \
        r = (int64_t)idx[e];                                                         \
        if (FIRST && SE_UNLIKELY((uint64_t)r >= (uint64_t)num_rows)) return -(e + 1); \
        if (HASPAD && r == pad) {                                                    \
            /* padding entries are counted (rare), not the others: a count kept    \
               in memory (register pressure) cost a store-forwarded add per row */  \
            if (FIRST) count++;                                                      \
            continue;                                                                \
        }                                                                            \
        w = weight + r * dim + j0;                                                   \
        for (v_ = 0; v_ < NV; v_++) {                                                \
            VEC x_;                                                                  \
            memcpy(&x_, w + (v_ == NV - 1 ? last_ : v_ * LANES), sizeof(VEC));       \
            if (WEIGHTED) x_ = psw[e] * x_;                                          \
            acc[v_] += x_;                                                           \
        }                                                                            \
    }

/* The first entry of [lo, hi) whose row `ahead` entries on lies past the batch's n
 * entries (hi if none): the entry loops run up to it without clamping that row's
 * position, and the rest with the clamp. */
static inline int64_t se_clamp_from(int64_t lo, int64_t hi, int64_t n, int64_t ahead)
{
    int64_t split = n - ahead < hi ? n - ahead : hi;
    return split < lo ? lo : split;
}

#define SE_ROW_LOOP(NV, FIRST, WEIGHTED, HASPAD, SKEW)                               \
    do {                                                                             \
        int64_t split_ = se_clamp_from(lo, hi, n, ahead);                            \
        for (e = lo; e < split_; e++) SE_ROW_STEP(NV, FIRST, WEIGHTED, HASPAD, 0, SKEW) \
        for (; e < hi; e++) SE_ROW_STEP(NV, FIRST, WEIGHTED, HASPAD, 1, SKEW)        \
        if (FIRST) count = hi - lo - (HASPAD ? count : 0);                           \
    } while (0)

#define SE_CHUNK(NV, FIRST, NTSTORE) SE_CHUNK_AT(NV, FIRST, NTSTORE, (NV - 1) * LANES)

/* The NV vectors of columns from j0 to the row's end in one pass, the last one
 * moved back to end at the row's last column: NV - 1 whole vectors and one that
 * covers the rest and some of the columns before it again (summed in the same
 * entry order: the same bits). For rows of (NV - 1) * LANES + 1 to NV * LANES - 1
 * columns (2 to 16 vectors; 8 where there are 16 vector registers), which take two
 * passes over the bag's entries otherwise (a power-of-two chunk, then one that
 * ends at the last column). Only with SE_ONE_PASS, which the callers give for
 * rows read from a source that fits in half the last-level cache (_simd.pxd:
 * pool_pass_flags). AMD EPYC, 262,144 ids in bags of 32, 2 threads, ratio to
 * torch, two-pass and one-pass builds alternated in one process: V = 1e4, D =
 * 20 / 50 / 100 / 200 uniform 1.13 / 1.04-1.15 / 0.98 / 0.98-1.01 -> 0.93 /
 * 0.87-0.93 / 0.86-0.90 / 0.97-0.99, Zipf 1.36 / 1.37-1.41 / 1.29-1.36 /
 * 1.21-1.22 -> 1.10 / 1.06-1.13 / 1.06-1.11 / 1.07-1.08; one thread alike;
 * sparse backward row sums (V = 1e5, 16,384 and 65,536 ids) D = 50 8-21% faster,
 * D = 100 and 200 level to 5%. Over V = 1e6 Zipf ids gained too (D = 50 1.21 ->
 * 1.11, D = 100 0.90 -> 0.80), but uniform ones, bound by DRAM, were 6-15%
 * slower at D = 100 and 9-10% at D = 200 in most of five runs (faster in the
 * others), however far ahead the rows were prefetched: such tables keep two
 * passes. Costs ~2 MB of code in each module that builds the poolings. */
#define SE_CHUNK_LAST(NV, FIRST, NTSTORE) SE_CHUNK_AT(NV, FIRST, NTSTORE, dim - LANES - j0)

/* NV vectors of columns summed over the bag: vector v at j0 + v * LANES, the last
 * one at j0 + LAST (a constant, (NV - 1) * LANES, but for SE_CHUNK_LAST). span_:
 * the bytes from j0 to the end of the last vector, for the prefetch of a row's
 * last line. */
#define SE_CHUNK_AT(NV, FIRST, NTSTORE, LAST)                                        \
    do {                                                                             \
        VEC acc[NV];                                                                 \
        const int64_t last_ = (LAST);                                                \
        const size_t span_ = (size_t)last_ * sizeof(SE_T) + sizeof(VEC);             \
        int i_;                                                                      \
        for (i_ = 0; i_ < NV; i_++) acc[i_] = (VEC){0};                              \
        if (psw) {                                                                   \
            if (haspad) SE_ROW_LOOP(NV, FIRST, 1, 1, 0);                             \
            else if (skew) SE_ROW_LOOP(NV, FIRST, 1, 0, 1);                          \
            else SE_ROW_LOOP(NV, FIRST, 1, 0, 0);                                    \
        } else {                                                                     \
            if (haspad) SE_ROW_LOOP(NV, FIRST, 0, 1, 0);                             \
            else if (skew) SE_ROW_LOOP(NV, FIRST, 0, 0, 1);                          \
            else SE_ROW_LOOP(NV, FIRST, 0, 0, 0);                                    \
        }                                                                            \
        /* one store per register (a memcpy of the whole array made GCC spill     \
           acc to the stack and copy it from there) */                             \
        if (stream && last_ == (NV - 1) * LANES                                     \
            && ((uintptr_t)(out + j0) & (sizeof(VEC) - 1)) == 0)                     \
            for (i_ = 0; i_ < NV; i_++) NTSTORE(out + j0 + i_ * LANES, acc[i_]);     \
        else                                                                         \
            for (i_ = 0; i_ < NV; i_++)                                              \
                memcpy(out + j0 + (i_ == NV - 1 ? last_ : i_ * LANES), &acc[i_], sizeof(VEC)); \
        j0 += last_ + LANES;                                                         \
    } while (0)

/* The columns j0..dim-1 one by one (fewer than one vector's worth), straight into
 * out; FIRST as above, for a row narrower than one vector. */
#define SE_TAIL(FIRST)                                                               \
    do {                                                                             \
        int64_t k;                                                                   \
        for (k = j0; k < dim; k++) out[k] = 0;                                       \
        for (e = lo; e < hi; e++) {                                                  \
            int64_t r;                                                               \
            const SE_T* w;                                                           \
            {                                                                        \
                int64_t pe = e + ahead < n ? e + ahead : n - 1;                      \
                SE_PREFETCH(weight + (int64_t)idx[pe] * dim + j0);                   \
                SE_PREFETCH(weight + (int64_t)idx[pe] * dim + dim - 1);              \
            }                                                                        \
            r = (int64_t)idx[e];                                                     \
            if (FIRST && SE_UNLIKELY((uint64_t)r >= (uint64_t)num_rows)) return -(e + 1);\
            if (r == pad) continue;                                                  \
            if (FIRST) count++;                                                      \
            w = weight + r * dim;                                                    \
            if (psw) {                                                               \
                SE_T s_ = psw[e];                                                    \
                for (k = j0; k < dim; k++) out[k] += s_ * w[k];                      \
            } else {                                                                 \
                for (k = j0; k < dim; k++) out[k] += w[k];                           \
            }                                                                        \
        }                                                                            \
    } while (0)

/* The columns left after a row's wide chunks (fewer than 8 vectors), for the
 * poolings here and in _simd_half.h; CHUNK(NV, ...) sums NV vectors of columns at
 * j0 over the bag and moves j0 past them (SE_CHUNK, SE_HALF_CHUNK), the rest of its
 * arguments given after it. SE_REST_FOUR: a 4-vector chunk first when more than 4
 * and at most 5 vectors are left (one 8-vector chunk there was 5% slower than 4 +
 * a 16-byte one: AVX2, 100 floats). SE_REST_OVERLAP: then all the rest in one pass,
 * the smallest chunk that covers it, moved back to end at the row's last column
 * (never before its first: the first chunk was at least as wide). The columns it
 * covers a second time are summed again in the same entry order, so the same bits
 * go over them. Was a pass per power of two, then 16-byte vectors, then single
 * columns (cached bag sums, AVX-512, one thread, old -> new: 300 floats, four
 * passes, 223 -> 210 us, 50 floats 82 -> 45, 100 floats 88 -> 84; AVX2: 300 floats
 * 256 -> 250, 50 floats 98 -> 66; float16 300 halves 352 -> 142). */
#define SE_REST_FOUR(CHUNK, ...)                                                     \
    do {                                                                             \
        if (dim - j0 > 4 * LANES && dim - j0 <= 5 * LANES) CHUNK(4, __VA_ARGS__);    \
    } while (0)

#define SE_REST_OVERLAP(CHUNK, ...)                                                  \
    do {                                                                             \
        int64_t rest_ = dim - j0;                                                    \
        if (rest_ <= 0) break;                                                       \
        if (rest_ > 4 * LANES) { j0 = dim - 8 * LANES; CHUNK(8, __VA_ARGS__); }      \
        else if (rest_ > 2 * LANES) { j0 = dim - 4 * LANES; CHUNK(4, __VA_ARGS__); } \
        else if (rest_ > LANES) { j0 = dim - 2 * LANES; CHUNK(2, __VA_ARGS__); }     \
        else { j0 = dim - LANES; CHUNK(1, __VA_ARGS__); }                            \
    } while (0)

/* NAME##_bag, one bag: out[0:dim] = sum_e (psw ? psw[e] : 1) * weight[idx[e]] over
 * entries e in [lo, hi) whose id is not `pad`; rows of entries up to `ahead`
 * positions past e (below n) are prefetched. Returns the number of non-padding
 * entries, or -(e + 1) for the first entry e whose id is outside [0, num_rows) (no
 * row is read for it; `out` is then left half-written). dim >= 1.
 * VBYTES is the vector width of the level; columns go in chunks of 8 vectors (16
 * when WIDE: AVX-512 has 32 vector registers, so a 1 KiB row of floats is summed
 * in one pass), the first one as wide as the row allows (8, 4, 2 or 1 vectors), the
 * rest in one chunk that ends at the last column; rows narrower than one vector
 * column by column.
 *
 * NAME, bags b0..b1-1 (bag b is entries starts[b]..starts[b+1]-1; its result goes
 * to out[b * dim:], or to out[dest[b] * dim:] when dest is given, its count or
 * -(e + 1) to counts[b] unless counts is NULL), divided by their counts when
 * flags has SE_MEAN, written with non-temporal stores when it has SE_STREAM: one
 * call per range of bags a thread takes, so no per-bag call. With SE_ZERO_GAPS (a dense gradient: dest
 * is sorted) and staged rows (se_stage_wanted) the rows between dest[b - 1] (or the
 * table's start) and dest[b] are zeroed through the stage just before each bag's
 * row, so that a line shared by zeros and a row goes out whole (rows of 100 floats:
 * dense gradient of 262,144 uniform ids over 400,000 rows 12.1-12.3 -> 7.6-8.7 ms);
 * the caller zeroes the gaps of other rows itself (whole lines already; zeroing
 * them between the rows was 5-10% slower). Returns the number of bags with an id out
 * of range.
 *
 * Streamed rows that are whole vectors on vector boundaries are stored from the
 * registers, others through a stage (se_stage above). */
/* rows of 9 to 16 vectors in one pass: with 32 vector registers only (WIDE) */
#define SE_LAST_WIDE_CASES(WIDE, NTSTORE)                                            \
        case 8: if (WIDE) SE_CHUNK_LAST(9, 1, NTSTORE); break;                       \
        case 9: if (WIDE) SE_CHUNK_LAST(10, 1, NTSTORE); break;                      \
        case 10: if (WIDE) SE_CHUNK_LAST(11, 1, NTSTORE); break;                     \
        case 11: if (WIDE) SE_CHUNK_LAST(12, 1, NTSTORE); break;                     \
        case 12: if (WIDE) SE_CHUNK_LAST(13, 1, NTSTORE); break;                     \
        case 13: if (WIDE) SE_CHUNK_LAST(14, 1, NTSTORE); break;                     \
        case 14: if (WIDE) SE_CHUNK_LAST(15, 1, NTSTORE); break;                     \
        case 15: if (WIDE) SE_CHUNK_LAST(16, 1, NTSTORE); break;

#define SE_DEFINE_POOL_BAG(NAME, T, I, ATTR, VBYTES, WIDE, NTSTORE)                      \
ATTR SE_ALWAYS_INLINE int64_t NAME##_bag(                                            \
    const T* weight, int64_t num_rows, int64_t dim, const I* idx, int64_t lo,        \
    int64_t hi, int64_t n, int64_t pad, const T* psw, int64_t ahead, int stream,     \
    int one_pass, int64_t far, int far_line, T* out)                                 \
{                                                                                    \
    typedef T SE_T;                                                                  \
    typedef T VEC __attribute__((vector_size(VBYTES)));                              \
    enum { LANES = VBYTES / sizeof(T) };                                             \
    int64_t e, j0 = 0, count = 0;                                                    \
    int64_t vectors = dim / LANES;                                                   \
    int haspad = pad >= 0 && pad < num_rows;                                         \
    /* rows that may start off a line boundary span a line past their width, which  \
       the one-per-add prefetches miss (SE_SPANS_EXTRA_LINE): such tables get one    \
       more prefetch per row, of its last byte (a check of each row among the adds   \
       cost 4.5% more instructions in the cached bag sums of aligned tables) */     \
    int skew = SE_ROWS_MAY_SKEW(weight, dim * sizeof(T));                           \
    if (one_pass && dim % LANES && vectors >= 1 && vectors < (WIDE ? 16 : 8)) {      \
        /* a row of 2 to 16 vectors (8 with 16 vector registers), not whole ones:   \
           one pass, the last vector moved back (SE_CHUNK_LAST) */                   \
        switch (vectors) {                                                           \
        case 1: SE_CHUNK_LAST(2, 1, NTSTORE); break;                                 \
        case 2: SE_CHUNK_LAST(3, 1, NTSTORE); break;                                 \
        case 3: SE_CHUNK_LAST(4, 1, NTSTORE); break;                                 \
        case 4: SE_CHUNK_LAST(5, 1, NTSTORE); break;                                 \
        case 5: SE_CHUNK_LAST(6, 1, NTSTORE); break;                                 \
        case 6: SE_CHUNK_LAST(7, 1, NTSTORE); break;                                 \
        case 7: SE_CHUNK_LAST(8, 1, NTSTORE); break;                                 \
        SE_LAST_WIDE_CASES(WIDE, NTSTORE)                                            \
        }                                                                            \
        return count;                                                                \
    }                                                                                \
    if (WIDE && vectors >= 16) SE_CHUNK(16, 1, NTSTORE);                             \
    else if (vectors >= 8) SE_CHUNK(8, 1, NTSTORE);                                  \
    else if (vectors >= 4) SE_CHUNK(4, 1, NTSTORE);                                  \
    else if (vectors >= 2) SE_CHUNK(2, 1, NTSTORE);                                  \
    else if (vectors == 1) SE_CHUNK(1, 1, NTSTORE);                                  \
    else {                                                                           \
        SE_TAIL(1);                                                                  \
        return count;                                                                \
    }                                                                                \
    while (WIDE && dim - j0 >= 16 * LANES) SE_CHUNK(16, 0, NTSTORE);                 \
    while (dim - j0 >= 8 * LANES) SE_CHUNK(8, 0, NTSTORE);                           \
    /* the columns left: one or two 16-byte vectors when that is all there is (a  \
       wide vector ending at the last column would straddle more lines: 20 floats   \
       5% slower), else SE_REST_OVERLAP */                                           \
    SE_REST_FOUR(SE_CHUNK, 0, NTSTORE);                                              \
    if (VBYTES > 16 && ((dim - j0) * (int64_t)sizeof(T) == 16 || (dim - j0) * (int64_t)sizeof(T) == 32)) { \
        typedef T VEC __attribute__((vector_size(16)));                              \
        enum { LANES = 16 / sizeof(T) };                                             \
        if (dim - j0 > LANES) SE_CHUNK(2, 0, NTSTORE);                               \
        else SE_CHUNK(1, 0, NTSTORE);                                                \
    }                                                                                \
    else SE_REST_OVERLAP(SE_CHUNK, 0, NTSTORE);                                      \
    return count;                                                                    \
}

/* One bag of the range below with the row width DIM. The common widths are passed
 * as constants, so that each gets its own copy of the (always inlined) bag sum with
 * the row offsets as shifts, its chunks chosen at compile time and the registers
 * this frees (no bound spilled to the stack): cached bags are bound by
 * instructions, which is where a JIT such as FBGEMM's, built for the width at run
 * time, was ahead (a 512-row table, D = 64, one thread: torch 0.43 ms, ours 0.49).
 * AMD EPYC, 262,144 ids in bags of 32, old/new builds alternated in one process:
 * Zipf ids D = 32 0.31-0.38 -> 0.25 ms on one thread, D = 64 0.46-0.48 -> 0.42-0.44
 * (0.27-0.28 -> 0.24-0.26 on two), D = 128 and 256 level to 5% faster; the 512-row
 * table D = 64 0.33-0.35 -> 0.29-0.30; uniform ids and the row sums of a sparse
 * backward level to 4% faster. Other widths as before. Costs ~0.4 MB of code in
 * each module that builds the poolings. */
#define SE_BAG_AT(NAME, DIM)                                                         \
    NAME##_bag(weight, num_rows, DIM, idx, starts[b], starts[b + 1], n, pad, psw,    \
               ahead, stream && !st.buf, one_pass, far, far_line, sum)

#define SE_DEFINE_POOL_RANGE(NAME, T, I, ATTR)                                      \
ATTR static int64_t NAME(                                                            \
    const T* weight, int64_t num_rows, int64_t dim, const I* idx, int64_t n,         \
    const int64_t* starts, int64_t b0, int64_t b1, int64_t pad, const T* psw,        \
    int64_t ahead, int flags, T* out, const int64_t* dest, int64_t* counts)         \
{                                                                                    \
    int64_t b, k, n_bad = 0;                                                         \
    int mean = flags & SE_MEAN, stream = (flags & SE_STREAM) != 0;                   \
    int one_pass = (flags & SE_ONE_PASS) != 0;                                       \
    size_t row_bytes = (size_t)dim * sizeof(T);                                      \
    int far_line = !(flags & SE_FAR) && (flags & SE_FAR_LINE);                       \
    int64_t far = (flags & SE_FAR) ? sparsembed_far_rows(row_bytes)                  \
                  : (far_line ? sparsembed_far_line_rows(row_bytes) : 0);            \
    se_stage st;                                                                     \
    se_stage_init(&st, se_stage_wanted(out, row_bytes, flags), row_bytes);          \
    for (b = b0; b < b1; b++) {                                                      \
        T* o = out + (dest ? dest[b] : b) * dim;                                     \
        T* sum;                                                                      \
        if ((flags & SE_ZERO_GAPS) && dest && st.buf) {                              \
            T* gap = out + (b > 0 ? dest[b - 1] + 1 : 0) * dim;                      \
            se_stage_zero(&st, (char*)gap, (size_t)(o - gap) * sizeof(T));          \
        }                                                                            \
        sum = st.buf ? (T*)se_stage_row(&st, (char*)o) : o;                          \
        int64_t c;                                                                   \
        switch (dim) {                                                               \
        case 32: c = SE_BAG_AT(NAME, 32); break;                                     \
        case 64: c = SE_BAG_AT(NAME, 64); break;                                     \
        case 128: c = SE_BAG_AT(NAME, 128); break;                                   \
        case 256: c = SE_BAG_AT(NAME, 256); break;                                   \
        default: c = SE_BAG_AT(NAME, dim);                                           \
        }                                                                            \
        if (counts) counts[b] = c;                                                   \
        if (c < 0) {                                                                 \
            n_bad++;                                                                 \
            continue;                                                                \
        }                                                                            \
        if (mean && c > 1) {                                                         \
            T inv = (T)c;                                                            \
            for (k = 0; k < dim; k++) sum[k] = sum[k] / inv;                         \
        }                                                                            \
        if (st.buf) se_stage_store(&st, (char*)o, row_bytes);                        \
    }                                                                                \
    se_stage_done(&st);                                                              \
    if (stream) SE_STREAM_FENCE();                                                   \
    return n_bad;                                                                    \
}

/* Compilers without GCC's vector extensions (MSVC): the same bag sum, one column at
 * a time (also in entry order per column, so the same bits), no prefetch. */
#define SE_DEFINE_POOL_BAG_SCALAR(NAME, T, I)                                        \
static int64_t NAME##_bag(                                                           \
    const T* weight, int64_t num_rows, int64_t dim, const I* idx, int64_t lo,        \
    int64_t hi, int64_t n, int64_t pad, const T* psw, int64_t ahead, int stream,     \
    int one_pass, int64_t far, int far_line, T* out)                                 \
{                                                                                    \
    int64_t e, k, count = 0;                                                         \
    (void)n;                                                                         \
    (void)ahead;                                                                     \
    (void)far;                                                                       \
    (void)far_line;                                                                  \
    (void)stream;                                                                    \
    (void)one_pass;                                                                  \
    for (k = 0; k < dim; k++) out[k] = 0;                                            \
    for (e = lo; e < hi; e++) {                                                      \
        int64_t r = (int64_t)idx[e];                                                 \
        const T* w;                                                                  \
        if ((uint64_t)r >= (uint64_t)num_rows) return -(e + 1);                      \
        if (r == pad) continue;                                                      \
        count++;                                                                     \
        w = weight + r * dim;                                                        \
        if (psw) {                                                                   \
            T s_ = psw[e];                                                           \
            for (k = 0; k < dim; k++) out[k] += s_ * w[k];                           \
        } else {                                                                     \
            for (k = 0; k < dim; k++) out[k] += w[k];                                \
        }                                                                            \
    }                                                                                \
    return count;                                                                    \
}

/* (SE_NO_VECTOR_EXT forces the scalar body, to check it with GCC.) */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(SE_NO_VECTOR_EXT)
    #define SE_DEFINE_POOL(NAME, T, I, ATTR, VBYTES, WIDE, NTSTORE)                  \
        SE_DEFINE_POOL_BAG(NAME, T, I, ATTR, VBYTES, WIDE, NTSTORE)                  \
        SE_DEFINE_POOL_RANGE(NAME, T, I, ATTR)
#else
    #define SE_DEFINE_POOL(NAME, T, I, ATTR, VBYTES, WIDE, NTSTORE)                  \
        SE_DEFINE_POOL_BAG_SCALAR(NAME, T, I)                                        \
        SE_DEFINE_POOL_RANGE(NAME, T, I, ATTR)
#endif

typedef int64_t (*se_pool_f32_i32)(const float*, int64_t, int64_t, const int32_t*, int64_t,
                                   const int64_t*, int64_t, int64_t, int64_t, const float*,
                                   int64_t, int, float*, const int64_t*, int64_t*);
typedef int64_t (*se_pool_f32_i64)(const float*, int64_t, int64_t, const int64_t*, int64_t,
                                   const int64_t*, int64_t, int64_t, int64_t, const float*,
                                   int64_t, int, float*, const int64_t*, int64_t*);
typedef int64_t (*se_pool_f64_i32)(const double*, int64_t, int64_t, const int32_t*, int64_t,
                                   const int64_t*, int64_t, int64_t, int64_t, const double*,
                                   int64_t, int, double*, const int64_t*, int64_t*);
typedef int64_t (*se_pool_f64_i64)(const double*, int64_t, int64_t, const int64_t*, int64_t,
                                   const int64_t*, int64_t, int64_t, int64_t, const double*,
                                   int64_t, int, double*, const int64_t*, int64_t*);


/* -1: not decided yet. Decided under the GIL (sparsembed_pool_level() is called
 * by the Python-facing function before any parallel region). */
static int se_pool_level = -1;

static int se_pool_cpu_level(void) {
#if SE_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return SE_LEVEL_AVX512;
    if (__builtin_cpu_supports("avx2")) return SE_LEVEL_AVX2;
#endif
    return SE_LEVEL_BASELINE;
}

/* The level the CPU and OS support, capped by SPARSEMBED_SIMD when set. */
static int sparsembed_pool_cpu_level(void) {
    int level = se_pool_cpu_level();
    const char* cap = getenv("SPARSEMBED_SIMD");
    if (cap != NULL) {
        int want = level;
        if (strcmp(cap, "baseline") == 0) want = SE_LEVEL_BASELINE;
        else if (strcmp(cap, "avx2") == 0) want = SE_LEVEL_AVX2;
        else if (strcmp(cap, "avx512") == 0) want = SE_LEVEL_AVX512;
        if (want < level) level = want;
    }
    return level;
}

SE_MAYBE_UNUSED static int sparsembed_pool_level(void) {
    if (se_pool_level < 0) se_pool_level = sparsembed_pool_cpu_level();
    return se_pool_level;
}

/* Use `level` (capped at what the CPU supports); returns the level now in use. */
SE_MAYBE_UNUSED static int sparsembed_pool_set_level(int level) {
    int top = se_pool_cpu_level();
    se_pool_level = level < 0 ? 0 : (level > top ? top : level);
    return se_pool_level;
}

#if SE_X86_DISPATCH
    #define SE_PICK(T) (level == SE_LEVEL_AVX512 ? T##_avx512 : \
                        level == SE_LEVEL_AVX2 ? T##_avx2 : T##_base)
#else
    #define SE_PICK(T) ((void)level, T##_base)
#endif

/* The four (dtype, index dtype) variants at one level. */
typedef struct {
    se_pool_f32_i32 f32_i32;
    se_pool_f32_i64 f32_i64;
    se_pool_f64_i32 f64_i32;
    se_pool_f64_i64 f64_i64;
} se_pool_table;

/* The four (dtype, index dtype) bodies of one SIMD level, named se_pool_*_SUFFIX
   (_simd_pool_bodies.h, _simd_pool_bodies_avx512.h) */
#define SE_DEFINE_POOL_LEVEL(SUFFIX, ATTR, VBYTES, WIDE, NTSTORE)                    \
    SE_DEFINE_POOL(se_pool_f32_i32_##SUFFIX, float, int32_t, ATTR, VBYTES, WIDE, NTSTORE) \
    SE_DEFINE_POOL(se_pool_f32_i64_##SUFFIX, float, int64_t, ATTR, VBYTES, WIDE, NTSTORE) \
    SE_DEFINE_POOL(se_pool_f64_i32_##SUFFIX, double, int32_t, ATTR, VBYTES, WIDE, NTSTORE) \
    SE_DEFINE_POOL(se_pool_f64_i64_##SUFFIX, double, int64_t, ATTR, VBYTES, WIDE, NTSTORE)

/* The table of the level whose bodies are named se_pool_*_SUFFIX */
#define SE_POOL_TABLE_AT(SUFFIX)                                                     \
    ((se_pool_table){se_pool_f32_i32_##SUFFIX, se_pool_f32_i64_##SUFFIX,             \
                     se_pool_f64_i32_##SUFFIX, se_pool_f64_i64_##SUFFIX})

#endif
