/* Max pooling of rows picked by an index array (EmbeddingBag mode "max"), built
 * once per x86 SIMD level like the sum pooling of _simd_pool.h (whose level
 * machinery it shares) and picked at run time.
 *
 * Why: the plain loop kept a branch per element ("is this row's value larger?"),
 * which a bag's random rows mispredict a few times per column: ~5 cycles an
 * element, 9x the sum pooling's time on the same bags. Here a bag's running maxima
 * and their winners stay in vector registers and each entry updates them with a
 * compare and two blends, no branch per element.
 *
 * The result is the plain loop's, bit for bit, at every level: each column keeps
 * the first entry whose value is strictly larger than every earlier one (so the
 * first occurrence wins ties, torch's rule, and a NaN only wins as the first
 * entry), and the maxima are the rows' own values (blends, no arithmetic). The
 * winners are tracked as offsets from the bag's first non-padding entry in lanes
 * as wide as the values (int32 for float), so that one compare mask selects both;
 * a bag of 2^31 entries or more takes the one-column-at-a-time loop below.
 */
#ifndef SPARSEMBED_SIMD_MAX_H
#define SPARSEMBED_SIMD_MAX_H

#include "_simd_pool.h"

/* Columns j0..j1-1 of one bag one at a time (the tail narrower than a vector, and
 * every column of a very long bag); entries first..hi-1, `first` a non-padding one. */
#define SE_MAX_COLUMNS(T)                                                            \
    do {                                                                             \
        int64_t j_, e_;                                                              \
        for (j_ = j0; j_ < j1; j_++) {                                               \
            T m_ = weight[(int64_t)idx[first] * dim + j_];                           \
            int64_t w_ = first;                                                      \
            for (e_ = first + 1; e_ < hi; e_++) {                                    \
                int64_t r_ = (int64_t)idx[e_];                                       \
                T x_;                                                                \
                if (r_ == pad) continue;                                             \
                x_ = weight[r_ * dim + j_];                                          \
                if (x_ > m_) {                                                       \
                    m_ = x_;                                                         \
                    w_ = e_;                                                         \
                }                                                                    \
            }                                                                        \
            out[j_] = m_;                                                            \
            argmax[j_] = w_;                                                         \
        }                                                                            \
    } while (0)

/* The bag's ids, before any row is read: each range-checked (return -(e + 1) for
 * the first bad entry e), `first` the first non-padding entry, `count` their
 * number; the rows `ahead` entries on (below n) prefetched. A bag of padding only
 * gets zeros and winners -1 (return 0). */
#define SE_MAX_SCAN(T)                                                               \
    do {                                                                             \
        for (e = lo; e < hi; e++) {                                                  \
            int64_t r;                                                               \
            if (e + ahead < n)                                                       \
                sparsembed_prefetch_row(weight + (int64_t)idx[e + ahead] * dim,    \
                                          (size_t)dim * sizeof(T));                  \
            r = (int64_t)idx[e];                                                     \
            if (SE_UNLIKELY((uint64_t)r >= (uint64_t)num_rows)) return -(e + 1);     \
            if (r == pad) continue;                                                  \
            if (first < 0) first = e;                                                \
            count++;                                                                 \
        }                                                                            \
        if (count == 0) {                                                            \
            for (j1 = 0; j1 < dim; j1++) {                                           \
                out[j1] = 0;                                                         \
                argmax[j1] = -1;                                                     \
            }                                                                        \
            return 0;                                                                \
        }                                                                            \
    } while (0)

/* NV vectors of columns at j0 over the bag's non-padding entries after `first`:
 * maxima in acc, winners (offsets from first) in won, both in registers. */
#define SE_MAX_CHUNK(NV)                                                             \
    do {                                                                             \
        VEC acc[NV];                                                                 \
        MVEC won[NV];                                                                \
        MLANE off_[LANES];                                                           \
        int v_, l_;                                                                  \
        const SE_T* w = weight + (int64_t)idx[first] * dim + j0;                     \
        for (v_ = 0; v_ < NV; v_++) {                                                \
            memcpy(&acc[v_], w + v_ * LANES, sizeof(VEC));                           \
            won[v_] = (MVEC){0};                                                     \
        }                                                                            \
        for (e = first + 1; e < hi; e++) {                                           \
            int64_t r = (int64_t)idx[e];                                             \
            MVEC at;                                                                 \
            if (r == pad) continue;                                                  \
            at = (MVEC){0} + (MLANE)(e - first);                                     \
            w = weight + r * dim + j0;                                               \
            for (v_ = 0; v_ < NV; v_++) {                                            \
                VEC x_;                                                              \
                MVEC gt_;                                                            \
                memcpy(&x_, w + v_ * LANES, sizeof(VEC));                            \
                gt_ = (MVEC)(x_ > acc[v_]);                                          \
                acc[v_] = (VEC)(((MVEC)x_ & gt_) | ((MVEC)acc[v_] & ~gt_));          \
                won[v_] = (at & gt_) | (won[v_] & ~gt_);                             \
            }                                                                        \
        }                                                                            \
        for (v_ = 0; v_ < NV; v_++) {                                                \
            memcpy(out + j0 + v_ * LANES, &acc[v_], sizeof(VEC));                    \
            memcpy(off_, &won[v_], sizeof(MVEC));                                    \
            for (l_ = 0; l_ < LANES; l_++)                                           \
                argmax[j0 + v_ * LANES + l_] = first + (int64_t)off_[l_];            \
        }                                                                            \
        j0 += NV * LANES;                                                            \
    } while (0)

/* NAME: one bag, entries lo..hi-1 of idx: out[0:dim] = the columns' maxima over the
 * entries whose id is not `pad`, argmax[0:dim] = the entry each came from (see
 * SE_MAX_SCAN for the ids). Returns the number of non-padding entries, or -(e + 1)
 * for the first entry e whose id is outside [0, num_rows). MLANE: a signed integer
 * as wide as T.
 * NVMAX: the most vectors a chunk keeps (maxima and winners: 2 NVMAX registers). */
#define SE_DEFINE_MAX(NAME, T, I, MLANE_T, ATTR, VBYTES, NVMAX)                      \
ATTR static int64_t NAME(                                                            \
    const T* weight, int64_t num_rows, int64_t dim, const I* idx, int64_t lo,        \
    int64_t hi, int64_t n, int64_t pad, int64_t ahead, T* out, int64_t* argmax)      \
{                                                                                    \
    typedef T SE_T;                                                                  \
    typedef MLANE_T MLANE;                                                           \
    typedef T VEC __attribute__((vector_size(VBYTES)));                              \
    typedef MLANE_T MVEC __attribute__((vector_size(VBYTES)));                       \
    enum { LANES = VBYTES / sizeof(T) };                                             \
    int64_t e, first = -1, count = 0, j0 = 0, j1;                                    \
    SE_MAX_SCAN(T);                                                                  \
    if (hi - first <= (int64_t)((((uint64_t)1) << (8 * sizeof(MLANE_T) - 1)) - 1)) { \
        while (NVMAX >= 8 && dim - j0 >= 8 * LANES) SE_MAX_CHUNK(8);                 \
        while (dim - j0 >= 4 * LANES) SE_MAX_CHUNK(4);                               \
        if (dim - j0 >= 2 * LANES) SE_MAX_CHUNK(2);                                  \
        if (dim - j0 >= LANES) SE_MAX_CHUNK(1);                                      \
        /* the columns past the last whole vector: one more vector, placed to end at \
           the last column (the columns it takes again get the same maxima and      \
           winners), not a branchy loop per column (cached bags of 32, one thread,  \
           AVX-512: D = 300 495 -> 389 us, D = 20 77 -> 57, D = 100 174 -> 159) */   \
        if (j0 < dim && dim >= LANES) {                                              \
            j0 = dim - LANES;                                                        \
            SE_MAX_CHUNK(1);                                                         \
        }                                                                            \
    }                                                                                \
    j1 = dim;                                                                        \
    SE_MAX_COLUMNS(T);                                                               \
    return count;                                                                    \
}

/* Compilers without GCC's vector extensions (MSVC): every column one at a time. */
#define SE_DEFINE_MAX_SCALAR(NAME, T, I)                                             \
static int64_t NAME(                                                                 \
    const T* weight, int64_t num_rows, int64_t dim, const I* idx, int64_t lo,        \
    int64_t hi, int64_t n, int64_t pad, int64_t ahead, T* out, int64_t* argmax)      \
{                                                                                    \
    int64_t e, first = -1, count = 0, j0 = 0, j1;                                    \
    SE_MAX_SCAN(T);                                                                  \
    j1 = dim;                                                                        \
    SE_MAX_COLUMNS(T);                                                               \
    return count;                                                                    \
}

#if (defined(__GNUC__) || defined(__clang__)) && !defined(SE_NO_VECTOR_EXT)
    #define SE_DEFINE_MAX_AT(NAME, T, I, M, ATTR, VBYTES, NVMAX) \
        SE_DEFINE_MAX(NAME, T, I, M, ATTR, VBYTES, NVMAX)
#else
    #define SE_DEFINE_MAX_AT(NAME, T, I, M, ATTR, VBYTES, NVMAX) \
        SE_DEFINE_MAX_SCALAR(NAME, T, I)
#endif

/* 16 vector registers below AVX-512: chunks of at most 4 vectors (8 registers of
 * maxima and winners, the rest for the row and the masks); 32 with it: 8. */
SE_DEFINE_MAX_AT(se_max_f32_i32_base, float, int32_t, int32_t, , 16, 4)
SE_DEFINE_MAX_AT(se_max_f32_i64_base, float, int64_t, int32_t, , 16, 4)
SE_DEFINE_MAX_AT(se_max_f64_i32_base, double, int32_t, int64_t, , 16, 4)
SE_DEFINE_MAX_AT(se_max_f64_i64_base, double, int64_t, int64_t, , 16, 4)
#if SE_X86_DISPATCH
SE_DEFINE_MAX_AT(se_max_f32_i32_avx2, float, int32_t, int32_t, SE_TARGET("avx2"), 32, 4)
SE_DEFINE_MAX_AT(se_max_f32_i64_avx2, float, int64_t, int32_t, SE_TARGET("avx2"), 32, 4)
SE_DEFINE_MAX_AT(se_max_f64_i32_avx2, double, int32_t, int64_t, SE_TARGET("avx2"), 32, 4)
SE_DEFINE_MAX_AT(se_max_f64_i64_avx2, double, int64_t, int64_t, SE_TARGET("avx2"), 32, 4)
SE_DEFINE_MAX_AT(se_max_f32_i32_avx512, float, int32_t, int32_t, SE_TARGET("avx512f"), 64, 8)
SE_DEFINE_MAX_AT(se_max_f32_i64_avx512, float, int64_t, int32_t, SE_TARGET("avx512f"), 64, 8)
SE_DEFINE_MAX_AT(se_max_f64_i32_avx512, double, int32_t, int64_t, SE_TARGET("avx512f"), 64, 8)
SE_DEFINE_MAX_AT(se_max_f64_i64_avx512, double, int64_t, int64_t, SE_TARGET("avx512f"), 64, 8)
#endif

typedef int64_t (*se_max_f32_i32)(const float*, int64_t, int64_t, const int32_t*, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, float*, int64_t*);
typedef int64_t (*se_max_f32_i64)(const float*, int64_t, int64_t, const int64_t*, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, float*, int64_t*);
typedef int64_t (*se_max_f64_i32)(const double*, int64_t, int64_t, const int32_t*, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, double*, int64_t*);
typedef int64_t (*se_max_f64_i64)(const double*, int64_t, int64_t, const int64_t*, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, double*, int64_t*);

/* The four (dtype, index dtype) variants at one level. */
typedef struct {
    se_max_f32_i32 f32_i32;
    se_max_f32_i64 f32_i64;
    se_max_f64_i32 f64_i32;
    se_max_f64_i64 f64_i64;
} se_max_table;

static inline se_max_table sparsembed_max_table(int level) {
    se_max_table t;
    t.f32_i32 = SE_PICK(se_max_f32_i32);
    t.f32_i64 = SE_PICK(se_max_f32_i64);
    t.f64_i32 = SE_PICK(se_max_f64_i32);
    t.f64_i64 = SE_PICK(se_max_f64_i64);
    return t;
}

#endif
