/* Sum/mean pooling of float16 table rows, summed in float32 and rounded once to
 * float16 (EmbeddingBag on a float16 table), built per x86 SIMD level like
 * _simd_pool.h and picked at run time: AVX-512F and AVX2 + F16C convert 16 or 8
 * values per instruction; the baseline level (and the columns past the last whole
 * vector) converts them one at a time in portable C (_half.h).
 *
 * Why: the float16 bag forward otherwise sorted the batch, gathered the touched
 * rows into a compact float32 copy (converting one value at a time) and pooled
 * that: 27 ms for 8,192 bags of 32 ids at D = 64, where torch reads the float16
 * rows directly in 1.3 ms.
 *
 * Same bits as pooling the rows converted to float32 (the compact path, and the
 * float32 pooling): the conversion is exact, each column is summed from zero in
 * entry order (w * x, then +; -ffp-contract=off), the mean divides once. Hardware
 * conversion quiets a signalling NaN where the portable one keeps it, but every
 * converted value is then added to (or multiplied into) a float32 sum, which quiets
 * it either way; the rounding to float16 gives sparsembed_f2h's bits (see the row
 * conversions below).
 */
#ifndef SPARSEMBED_SIMD_HALF_H
#define SPARSEMBED_SIMD_HALF_H

#include "_simd_pool.h"
#include "_half.h"

#if SE_X86_DISPATCH
    #include <immintrin.h>
#endif

static inline void se_float_to_half_soft(const float* src, uint16_t* dst, int64_t n)
{
    int64_t j;
    for (j = 0; j < n; j++) dst[j] = sparsembed_f2h(src[j]);
}

/* LANES float16 values at p as a vector of floats (exact), one per level */
#define SE_HALF_LOAD_SOFT(p, out)                                                    \
    do {                                                                             \
        float t_[4];                                                                 \
        int l_;                                                                      \
        for (l_ = 0; l_ < 4; l_++) t_[l_] = sparsembed_h2f((p)[l_]);                 \
        memcpy(&(out), t_, sizeof(t_));                                              \
    } while (0)
#if SE_X86_DISPATCH
    #define SE_HALF_LOAD_F16C(p, out) \
        ((out) = (VEC)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p))))
    #define SE_HALF_LOAD_AVX512(p, out) \
        ((out) = (VEC)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p))))
#endif

/* Store the float sums of vector v at p (VEC's lanes) as float16, one per level.
 * A sum is the result of float arithmetic (0 + x, w * x, / count), which is never
 * a signalling NaN, so the hardware conversion gives sparsembed_f2h's bits here
 * without the check the row conversions below need. */
#define SE_HALF_STORE_SOFT(p, v)                                                     \
    do {                                                                             \
        float t_[4];                                                                 \
        int l_;                                                                      \
        memcpy(t_, &(v), sizeof(t_));                                                \
        for (l_ = 0; l_ < 4; l_++) (p)[l_] = sparsembed_f2h(t_[l_]);                 \
    } while (0)
#if SE_X86_DISPATCH
    #define SE_HALF_STORE_F16C(p, v)                                                 \
        _mm_storeu_si128((__m128i*)(p), _mm256_cvtps_ph((__m256)(v),                 \
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
    #define SE_HALF_STORE_AVX512(p, v)                                               \
        _mm256_storeu_si256((__m256i*)(p), _mm512_cvtps_ph((__m512)(v),              \
                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#endif

/* Row conversions for the float16 tables' compact float32 copies (_f16.pyx): n
 * values, float16 -> float32 exactly, float32 -> float16 rounded to nearest even,
 * bit for bit sparsembed_h2f / sparsembed_f2h. The hardware conversions differ from
 * those only on signalling NaNs (they quiet them; checked over every input), which
 * a row copied back unchanged may hold: a vector holding one is converted in
 * portable C instead. */
static inline void se_half_to_float_soft(const uint16_t* src, float* dst, int64_t n)
{
    int64_t j;
    for (j = 0; j < n; j++) dst[j] = sparsembed_h2f(src[j]);
}

#if SE_X86_DISPATCH
SE_TARGET("avx512f")
static void se_half_to_float_avx512(const uint16_t* src, float* dst, int64_t n)
{
    int64_t j = 0;
    const __m256i exp_quiet = _mm256_set1_epi16(0x7e00), exp_only = _mm256_set1_epi16(0x7c00);
    const __m256i payload = _mm256_set1_epi16(0x01ff), zero = _mm256_setzero_si256();
    for (; j + 16 <= n; j += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i*)(src + j));
        __m256i quiet_clear = _mm256_cmpeq_epi16(_mm256_and_si256(h, exp_quiet), exp_only);
        __m256i no_payload = _mm256_cmpeq_epi16(_mm256_and_si256(h, payload), zero);
        if (_mm256_testc_si256(no_payload, quiet_clear))  /* no signalling NaN */
            _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(h));
        else
            se_half_to_float_soft(src + j, dst + j, 16);
    }
    se_half_to_float_soft(src + j, dst + j, n - j);
}

SE_TARGET("avx512f")
static void se_float_to_half_avx512(const float* src, uint16_t* dst, int64_t n)
{
    int64_t j = 0;
    const __m512i exp_quiet = _mm512_set1_epi32(0x7fc00000), exp_only = _mm512_set1_epi32(0x7f800000);
    const __m512i payload = _mm512_set1_epi32(0x003fffff);
    for (; j + 16 <= n; j += 16) {
        __m512 x = _mm512_loadu_ps(src + j);
        __m512i b = _mm512_castps_si512(x);
        __mmask16 sig = _mm512_cmpeq_epi32_mask(_mm512_and_si512(b, exp_quiet), exp_only)
                        & _mm512_test_epi32_mask(b, payload);
        if (sig == 0)
            _mm256_storeu_si256((__m256i*)(dst + j),
                                _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        else
            se_float_to_half_soft(src + j, dst + j, 16);
    }
    se_float_to_half_soft(src + j, dst + j, n - j);
}

SE_TARGET("avx2,f16c")
static void se_half_to_float_f16c(const uint16_t* src, float* dst, int64_t n)
{
    int64_t j = 0;
    const __m128i exp_quiet = _mm_set1_epi16(0x7e00), exp_only = _mm_set1_epi16(0x7c00);
    const __m128i payload = _mm_set1_epi16(0x01ff), zero = _mm_setzero_si128();
    for (; j + 8 <= n; j += 8) {
        __m128i h = _mm_loadu_si128((const __m128i*)(src + j));
        __m128i quiet_clear = _mm_cmpeq_epi16(_mm_and_si128(h, exp_quiet), exp_only);
        __m128i no_payload = _mm_cmpeq_epi16(_mm_and_si128(h, payload), zero);
        if (_mm_testc_si128(no_payload, quiet_clear))
            _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
        else
            se_half_to_float_soft(src + j, dst + j, 8);
    }
    se_half_to_float_soft(src + j, dst + j, n - j);
}

SE_TARGET("avx2,f16c")
static void se_float_to_half_f16c(const float* src, uint16_t* dst, int64_t n)
{
    int64_t j = 0;
    const __m256i exp_quiet = _mm256_set1_epi32(0x7fc00000), exp_only = _mm256_set1_epi32(0x7f800000);
    const __m256i payload = _mm256_set1_epi32(0x003fffff), zero = _mm256_setzero_si256();
    for (; j + 8 <= n; j += 8) {
        __m256 x = _mm256_loadu_ps(src + j);
        __m256i b = _mm256_castps_si256(x);
        __m256i quiet_clear = _mm256_cmpeq_epi32(_mm256_and_si256(b, exp_quiet), exp_only);
        __m256i no_payload = _mm256_cmpeq_epi32(_mm256_and_si256(b, payload), zero);
        if (_mm256_testc_si256(no_payload, quiet_clear))
            _mm_storeu_si128((__m128i*)(dst + j),
                             _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        else
            se_float_to_half_soft(src + j, dst + j, 8);
    }
    se_float_to_half_soft(src + j, dst + j, n - j);
}
#endif

typedef void (*se_half_to_float_f)(const uint16_t*, float*, int64_t);
typedef void (*se_float_to_half_f)(const float*, uint16_t*, int64_t);

typedef struct {
    se_half_to_float_f to_float;
    se_float_to_half_f to_half;
} se_half_rows_table;

/* The level the float16 code runs at for the pooling's `level`: the AVX2 level
 * converts with F16C, which CPUs with AVX2 have had since both came (2013), but is
 * asked for anyway; without it, the portable code. */
static inline int se_half_level(int level)
{
#if SE_X86_DISPATCH
    if (level == SE_LEVEL_AVX2 && !__builtin_cpu_supports("f16c")) return SE_LEVEL_BASELINE;
#endif
    return level;
}

/* The row conversions at `level`. */
static inline se_half_rows_table sparsembed_half_rows_table(int level)
{
    se_half_rows_table t;
    t.to_float = se_half_to_float_soft;
    t.to_half = se_float_to_half_soft;
#if SE_X86_DISPATCH
    level = se_half_level(level);
    if (level == SE_LEVEL_AVX512) {
        t.to_float = se_half_to_float_avx512;
        t.to_half = se_float_to_half_avx512;
    } else if (level == SE_LEVEL_AVX2) {
        t.to_float = se_half_to_float_f16c;
        t.to_half = se_float_to_half_f16c;
    }
#endif
    return t;
}

/* Rows wider than this many bytes are prefetched one line per add, `ahead` entries
 * on (as _simd_pool.h does); narrower ones a row's lines at once as its id is
 * checked, in the bag's first pass. Measured when narrow rows went a bag at a time
 * in a pass of their own (before that pass was folded into the first chunk's),
 * on an AMD EPYC (float16 bag sum forward, 2 threads, V = 1e6, bags of 32,
 * alternating A/B): D = 256 uniform 5.8-6.9 -> 3.9-4.1 ms and Zipf 1.47-1.74 ->
 * 1.27-1.50 spread 64 rows ahead, against all of a bag's 256 lines in a burst 8
 * rows ahead; but D = 64 uniform took 2.35-2.44 ms spread (8 to 64 rows ahead)
 * against 1.9-2.0 in a burst. */
#define SE_HALF_SPREAD 256

/* One entry e of SE_HALF_ROWS; CLAMP (a constant): the entry `ahead` on may be
 * past the end (the last `ahead` entries of the batch, a loop of their own). */
#define SE_HALF_ENTRY(NV, LOAD, SPREAD, FIRST, WEIGHTED, CLAMP)                      \
    {                                                                                \
        int64_t r;                                                                   \
        const uint16_t* w;                                                           \
        const char* p_ = NULL;                                                       \
        if (SPREAD || FIRST) {                                                       \
            /* (a prefetch never faults, even for an id still to be checked) */      \
            int64_t pe_ = CLAMP ? (e + ahead < n ? e + ahead : n - 1) : e + ahead;   \
            p_ = (const char*)(weight + (int64_t)idx[pe_] * dim + j0);               \
            if (FIRST && !SPREAD) {                                                  \
                /* the chunk's lines by a count known when compiling; the row        \
                   past the chunk and a skewed row's last line by tests that         \
                   are the same for every row (sparsembed_prefetch_row's loop      \
                   of a run-time length per row cost 20% of a D = 64 bag sum         \
                   in cache: a C loop of the same sums 0.28 -> 0.35 ms) */           \
                int l_;                                                              \
                for (l_ = 0; l_ < (int)((NV * LANES * 2 + 63) / 64); l_++)           \
                    SE_PREFETCH(p_ + 64 * l_);                                       \
                if (row_bytes > NV * LANES * 2)                                      \
                    sparsembed_prefetch_row(p_ + NV * LANES * 2,                   \
                                              row_bytes - NV * LANES * 2);           \
                if (skew) SE_PREFETCH(p_ + row_bytes - 1);                           \
            }                                                                        \
        }                                                                            \
        r = (int64_t)idx[e];                                                         \
        if (FIRST && SE_UNLIKELY((uint64_t)r >= (uint64_t)num_rows)) {               \
            count = -(e + 1);                                                        \
            goto bad_bag;                                                            \
        }                                                                            \
        if (r == pad) {                                                              \
            if (FIRST) npad_++;                                                      \
            continue;                                                                \
        }                                                                            \
        w = weight + r * dim + j0;                                                   \
        for (v_ = 0; v_ < NV; v_++) {                                                \
            VEC x_;                                                                  \
            if (SPREAD && ((v_ * LANES * 2) & 63) == 0)                              \
                SE_PREFETCH(p_ + v_ * LANES * 2);                                    \
            LOAD(w + (v_ == NV - 1 ? last_ : v_ * LANES), x_);                       \
            if (WEIGHTED) x_ = psw[e] * x_;                                          \
            acc[v_] += x_;                                                           \
        }                                                                            \
        if (SPREAD == 2) SE_PREFETCH(p_ + NV * LANES * 2 - 1);                       \
    }

/* The entries of a bag for SE_HALF_CHUNK (its arguments, and WEIGHTED: psw is
 * given; a constant, so that the common unweighted loop carries no test of it),
 * those whose entry `ahead` on is inside the batch first, without the clamp.
 * (Variants without the per-entry tests of the padding id and the skew, as
 * _simd_pool.h's SE_ROW_STEP has, were 0-8% faster in cache but 15-30% slower
 * at D = 100 over V = 1e6, AMD EPYC: GCC spilled the row's width and general
 * registers to vector ones.) */
#define SE_HALF_ROWS(NV, LOAD, SPREAD, FIRST, WEIGHTED)                              \
    do {                                                                             \
        int64_t split_ = se_clamp_from(lo, hi, n, ahead);                            \
        for (e = lo; e < split_; e++)                                                \
            SE_HALF_ENTRY(NV, LOAD, SPREAD, FIRST, WEIGHTED, 0)                      \
        for (; e < hi; e++) SE_HALF_ENTRY(NV, LOAD, SPREAD, FIRST, WEIGHTED, 1)      \
    } while (0)

/* NV vectors of columns at j0, summed over the bag's entries in registers (the
 * sums of _simd_pool.h's SE_CHUNK, on converted float16 rows), rounded to float16
 * into out_row[j0:] by STORE.
 * FIRST (a constant): the bag's first pass, which also range-checks each id (goto
 * bad_bag with count = -(e + 1) at the first bad one: nothing is written then),
 * counts the non-padding entries and, for rows of up to SE_HALF_SPREAD bytes,
 * prefetches the whole row `ahead` entries on; later passes find the rows in cache.
 * One pass over the ids instead of a pass of their own before the sums, as the
 * float32 pooling does. SPREAD: wider rows, whose prefetches go one line per add,
 * in every pass for its own columns; 2: rows that may start off a line boundary,
 * whose last byte is prefetched too (see _simd_pool.h's SKEW). */
#define SE_HALF_CHUNK(NV, LOAD, STORE, SPREAD, FIRST)                                \
    SE_HALF_CHUNK_AT(NV, LOAD, STORE, SPREAD, FIRST, (NV - 1) * LANES)

/* The columns from j0 to the row's end in one pass of NV vectors, the last one
 * moved back to end at the row's last column, as _simd_pool.h's SE_CHUNK_LAST
 * (there for why and when); rows of up to SE_HALF_SPREAD bytes only (their
 * prefetches go out in a burst, NV vectors' worth, which covers the row). With
 * the common widths as constants (SE_HALF_CHUNKS_AT), AMD EPYC, V = 1e4, 262,144
 * ids in bags of 32, 2 threads, ratio to torch, old and new builds alternated: D
 * = 50 1.29-1.44 -> 1.19-1.20, D = 100 1.27-1.36 -> 1.11-1.15, D = 32 1.15-1.21 ->
 * 0.96-1.03, D = 64 1.17-1.18 -> 1.05-1.12. The float16 pooling asks for one
 * pass at every table size (see _bag.pyx: half_bag_forward). */
#define SE_HALF_CHUNK_LAST(NV, LOAD, STORE, SPREAD, FIRST)                           \
    SE_HALF_CHUNK_AT(NV, LOAD, STORE, SPREAD, FIRST, dim - LANES - j0)

/* NV vectors of columns at j0, the last one at j0 + LAST */
#define SE_HALF_CHUNK_AT(NV, LOAD, STORE, SPREAD, FIRST, LAST)                       \
    do {                                                                             \
        VEC acc[NV];                                                                 \
        const int64_t last_ = (LAST);                                                \
        int v_;                                                                      \
        int64_t npad_ = 0;                                                           \
        for (v_ = 0; v_ < NV; v_++) acc[v_] = (VEC){0};                              \
        if (psw) SE_HALF_ROWS(NV, LOAD, SPREAD, FIRST, 1);                           \
        else SE_HALF_ROWS(NV, LOAD, SPREAD, FIRST, 0);                               \
        if (FIRST) count = hi - lo - npad_;                                          \
        if (mean && count > 1)                                                       \
            for (v_ = 0; v_ < NV; v_++) acc[v_] = acc[v_] / (float)count;            \
        /* rounded to float16 from the registers (no bag reaches here with a bad id: \
           the first chunk leaves before any store) */                             \
        for (v_ = 0; v_ < NV; v_++)                                                  \
            STORE(out_row + j0 + (v_ == NV - 1 ? last_ : v_ * LANES), acc[v_]);      \
        j0 += last_ + LANES;                                                         \
    } while (0)

/* every column (dim >= LANES) in chunks of vectors: the first chunk, the widest
 * that fits (NVMAX, 8, 4, 2 or 1 vectors), with FIRST, then NVMAX and 8 vectors
 * while they fit, then the rest as _simd_pool.h's SE_REST_FOUR and SE_REST_OVERLAP
 * take it (columns summed twice get the same float sums, so the same float16 bits;
 * the last dim % LANES columns were summed one by one in float) */
#define SE_HALF_CHUNKS(NVMAX, LOAD, STORE, SPREAD)                                   \
    do {                                                                             \
        j0 = 0;                                                                      \
        if (!SPREAD && one_pass && dim % LANES && dim / LANES < 8) {                  \
            /* 2 to 8 vectors, not whole ones: one pass (SE_HALF_CHUNK_LAST) */      \
            switch (dim / LANES) {                                                   \
            case 1: SE_HALF_CHUNK_LAST(2, LOAD, STORE, SPREAD, 1); break;            \
            case 2: SE_HALF_CHUNK_LAST(3, LOAD, STORE, SPREAD, 1); break;            \
            case 3: SE_HALF_CHUNK_LAST(4, LOAD, STORE, SPREAD, 1); break;            \
            case 4: SE_HALF_CHUNK_LAST(5, LOAD, STORE, SPREAD, 1); break;            \
            case 5: SE_HALF_CHUNK_LAST(6, LOAD, STORE, SPREAD, 1); break;            \
            case 6: SE_HALF_CHUNK_LAST(7, LOAD, STORE, SPREAD, 1); break;            \
            case 7: SE_HALF_CHUNK_LAST(8, LOAD, STORE, SPREAD, 1); break;            \
            }                                                                        \
            break;                                                                   \
        }                                                                            \
        if (dim >= NVMAX * LANES) SE_HALF_CHUNK(NVMAX, LOAD, STORE, SPREAD, 1);      \
        else if (NVMAX > 8 && dim >= 8 * LANES) SE_HALF_CHUNK(8, LOAD, STORE, SPREAD, 1); \
        else if (dim >= 4 * LANES) SE_HALF_CHUNK(4, LOAD, STORE, SPREAD, 1);         \
        else if (dim >= 2 * LANES) SE_HALF_CHUNK(2, LOAD, STORE, SPREAD, 1);         \
        else SE_HALF_CHUNK(1, LOAD, STORE, SPREAD, 1);                               \
        while (dim - j0 >= NVMAX * LANES) SE_HALF_CHUNK(NVMAX, LOAD, STORE, SPREAD, 0); \
        if (NVMAX > 8 && dim - j0 >= 8 * LANES) SE_HALF_CHUNK(8, LOAD, STORE, SPREAD, 0); \
        SE_REST_FOUR(SE_HALF_CHUNK, LOAD, STORE, SPREAD, 0);                         \
        SE_REST_OVERLAP(SE_HALF_CHUNK, LOAD, STORE, SPREAD, 0);                      \
    } while (0)

/* A bag's chunks for rows of `dim` columns, by their kind of prefetch */
#define SE_HALF_CHUNKS_ANY(NVMAX, LOAD, STORE)                                       \
    do {                                                                             \
        if (spread && skew) SE_HALF_CHUNKS(NVMAX, LOAD, STORE, 2);                   \
        else if (spread) SE_HALF_CHUNKS(NVMAX, LOAD, STORE, 1);                      \
        else SE_HALF_CHUNKS(NVMAX, LOAD, STORE, 0);                                  \
    } while (0)

/* The same with dim (and so spread) a constant DIM in a block of its own: the
 * common widths get their own copy of the chunks, with the row offsets as shifts
 * and the chunks chosen when compiling, as _simd_pool.h's SE_BAG_AT does */
#define SE_HALF_CHUNKS_AT(DIM, NVMAX, LOAD, STORE)                                   \
    {                                                                                \
        const int64_t dim = DIM;                                                     \
        const size_t row_bytes = DIM * 2;                                            \
        const int spread = DIM * 2 > SE_HALF_SPREAD;                                 \
        SE_HALF_CHUNKS_ANY(NVMAX, LOAD, STORE);                                      \
    }

/* NAME: bags b0..b1-1 (bag b is entries starts[b]..starts[b+1]-1 of idx) of the
 * float16 table `weight` (its bits): out[b * dim:] = float16(sum_e (psw ? psw[e] :
 * 1) * float(weight[idx[e]])) over entries whose id is not `pad`, the float32 sum
 * divided by the count when flags has SE_MEAN and rounded once (SE_ONE_PASS: as
 * for _simd_pool.h's range functions); counts[b] = that count, or
 * -(e + 1) for the first entry e whose id is outside [0, num_rows) (no row is read
 * for it or after it; out[b] is left as it was). Rows `ahead` entries on are
 * prefetched as the ids are checked, or with the adds for rows wider than
 * SE_HALF_SPREAD bytes. `o`: room for dim floats (the sums of the columns past the
 * last whole vector, rounded from there). Returns the number of bad bags. */
#define SE_DEFINE_HALF_POOL(NAME, I, ATTR, VBYTES, NVMAX, LOAD, STORE, CVT_OUT)      \
ATTR static int64_t NAME(                                                            \
    const uint16_t* weight, int64_t num_rows, int64_t dim, const I* idx, int64_t n,  \
    const int64_t* starts, int64_t b0, int64_t b1, int64_t pad, const float* psw,    \
    int64_t ahead, int flags, uint16_t* out, int64_t* counts, float* o)              \
{                                                                                    \
    typedef float VEC __attribute__((vector_size(VBYTES)));                          \
    int mean = (flags & SE_MEAN) != 0, one_pass = (flags & SE_ONE_PASS) != 0;        \
    enum { LANES = VBYTES / sizeof(float) };                                         \
    size_t row_bytes = (size_t)dim * sizeof(uint16_t);                               \
    /* rows of up to 4 lines: a row's prefetches in a burst as its id is checked;  \
       wider ones: one per line among the adds (see SE_HALF_SPREAD) */             \
    int spread = row_bytes > SE_HALF_SPREAD;                                         \
    int skew = SE_ROWS_MAY_SKEW(weight, row_bytes);                                  \
    int64_t b, e, j, j0 = 0, n_bad = 0;                                              \
    for (b = b0; b < b1; b++) {                                                      \
        int64_t count = 0, lo = starts[b], hi = starts[b + 1];                       \
        uint16_t* out_row = out + b * dim;                                           \
        if (dim < LANES) {                                                           \
            /* no whole vector to check the ids with: a pass of their own */        \
            for (e = lo; e < hi; e++) {                                              \
                int64_t r;                                                           \
                if (e + ahead < n)                                                   \
                    sparsembed_prefetch_row(weight + (int64_t)idx[e + ahead] * dim, \
                                              row_bytes);                            \
                r = (int64_t)idx[e];                                                 \
                if (SE_UNLIKELY((uint64_t)r >= (uint64_t)num_rows)) {                \
                    count = -(e + 1);                                                \
                    goto bad_bag;                                                    \
                }                                                                    \
                count += r != pad;                                                   \
            }                                                                        \
            j0 = 0;                                                                  \
        }                                                                            \
        else switch (dim) {                                                          \
        case 32: SE_HALF_CHUNKS_AT(32, NVMAX, LOAD, STORE) break;                    \
        case 64: SE_HALF_CHUNKS_AT(64, NVMAX, LOAD, STORE) break;                    \
        case 128: SE_HALF_CHUNKS_AT(128, NVMAX, LOAD, STORE) break;                  \
        case 256: SE_HALF_CHUNKS_AT(256, NVMAX, LOAD, STORE) break;                  \
        default: SE_HALF_CHUNKS_ANY(NVMAX, LOAD, STORE);                             \
        }                                                                            \
        if (j0 < dim) {                                                              \
            /* a row narrower than one vector: its columns one at a time, in one    \
               pass over the entries (each column's adds in entry order, as       \
               before; a pass per column cost D = 4 2.8x torch) */                 \
            for (j = j0; j < dim; j++) o[j] = 0;                                     \
            for (e = lo; e < hi; e++) {                                              \
                int64_t r = (int64_t)idx[e];                                         \
                const uint16_t* row_;                                                \
                if (r == pad) continue;                                              \
                row_ = weight + r * dim;                                             \
                if (psw) {                                                           \
                    const float s_ = psw[e];                                         \
                    for (j = j0; j < dim; j++) o[j] += s_ * sparsembed_h2f(row_[j]);  \
                } else {                                                             \
                    for (j = j0; j < dim; j++) o[j] += sparsembed_h2f(row_[j]);       \
                }                                                                    \
            }                                                                        \
            if (mean && count > 1)                                                   \
                for (j = j0; j < dim; j++) o[j] = o[j] / (float)count;               \
        }                                                                            \
        if (j0 < dim) CVT_OUT(o + j0, out_row + j0, dim - j0);                       \
        counts[b] = count;                                                           \
        continue;                                                                    \
    bad_bag:                                                                         \
        counts[b] = count;                                                           \
        n_bad++;                                                                     \
    }                                                                                \
    return n_bad;                                                                    \
}

SE_DEFINE_HALF_POOL(se_half_pool_i32_base, int32_t, , 16, 8, SE_HALF_LOAD_SOFT,
                    SE_HALF_STORE_SOFT, se_float_to_half_soft)
SE_DEFINE_HALF_POOL(se_half_pool_i64_base, int64_t, , 16, 8, SE_HALF_LOAD_SOFT,
                    SE_HALF_STORE_SOFT, se_float_to_half_soft)
#if SE_X86_DISPATCH
SE_DEFINE_HALF_POOL(se_half_pool_i32_avx2, int32_t, SE_TARGET("avx2,f16c"), 32, 8,
                    SE_HALF_LOAD_F16C, SE_HALF_STORE_F16C, se_float_to_half_f16c)
SE_DEFINE_HALF_POOL(se_half_pool_i64_avx2, int64_t, SE_TARGET("avx2,f16c"), 32, 8,
                    SE_HALF_LOAD_F16C, SE_HALF_STORE_F16C, se_float_to_half_f16c)
SE_DEFINE_HALF_POOL(se_half_pool_i32_avx512, int32_t, SE_TARGET("avx512f"), 64, 16,
                    SE_HALF_LOAD_AVX512, SE_HALF_STORE_AVX512, se_float_to_half_avx512)
SE_DEFINE_HALF_POOL(se_half_pool_i64_avx512, int64_t, SE_TARGET("avx512f"), 64, 16,
                    SE_HALF_LOAD_AVX512, SE_HALF_STORE_AVX512, se_float_to_half_avx512)
#endif

typedef int64_t (*se_half_pool_i32)(const uint16_t*, int64_t, int64_t, const int32_t*, int64_t,
                                    const int64_t*, int64_t, int64_t, int64_t, const float*,
                                    int64_t, int, uint16_t*, int64_t*, float*);
typedef int64_t (*se_half_pool_i64)(const uint16_t*, int64_t, int64_t, const int64_t*, int64_t,
                                    const int64_t*, int64_t, int64_t, int64_t, const float*,
                                    int64_t, int, uint16_t*, int64_t*, float*);

typedef struct {
    se_half_pool_i32 i32;
    se_half_pool_i64 i64;
} se_half_pool_table;

/* The variants at `level` (see se_half_level). */
static inline se_half_pool_table sparsembed_half_pool_table(int level)
{
    se_half_pool_table t;
    level = se_half_level(level);
    t.i32 = SE_PICK(se_half_pool_i32);
    t.i64 = SE_PICK(se_half_pool_i64);
    return t;
}

#endif
