/* One optimizer update of a table row, built once per x86 SIMD level (like the
 * pooling of _simd_pool.h, whose level switch it shares) and picked at run time.
 *
 * Why: the wheel's baseline build does the updates 4 floats at a time (SSE2); the
 * square roots and divisions of Adagrad and SparseAdam then cost about as much as
 * moving the rows. The same C loops compiled for AVX2 and AVX-512F (GCC vectorises
 * them; every column is independent) run the updates 15-25% faster.
 *
 * Results are bitwise identical at every level: each column goes through the same
 * IEEE operations in the same order (lanes only run across columns, -ffp-contract=off
 * forbids fused multiply-adds, float sqrt is correctly rounded), and the one
 * reduction (row-wise Adagrad's mean square, in double) stays a sequential loop:
 * GCC does not reorder floating-point sums without -ffast-math.
 *
 * The arithmetic follows torch's optimizers, in their order of operations (see the
 * comments per kind); sparsembed._kernels._optim calls it for every row.
 */
#ifndef SPARSEMBED_SIMD_UPDATE_H
#define SPARSEMBED_SIMD_UPDATE_H

#include <math.h>
#include <stdint.h>

#include "_simd_pool.h"

enum { SE_SGD = 0, SE_ADAGRAD = 1, SE_SPARSE_ADAM = 2, SE_ROWWISE_ADAGRAD = 3 };

typedef struct {
    int kind;
    double lr;            /* SGD, RowWise: lr; Adagrad: clr; SparseAdam: step size */
    double momentum;      /* SGD */
    double weight_decay;  /* SGD, Adagrad, RowWise */
    double eps;           /* Adagrad, SparseAdam, RowWise */
    double c1;            /* SparseAdam: 1 - beta1; SGD: 1 - dampening */
    double c2;            /* SparseAdam: 1 - beta2; SGD: 1 on the table's first step */
    double c3;            /* SGD: 1 for Nesterov momentum */
} se_hyper;

/* NAME(h, w, g, s1, s2, dim): w (dim,) INOUT weight row, g (dim,) IN gradient row,
 * s1 INOUT momentum / sum / exp_avg row ((1,) for row-wise Adagrad) or NULL, s2 INOUT
 * exp_avg_sq row or NULL. SQRT is the square root of T (sqrtf for float: equal to
 * rounding the double square root, as float sqrt is correctly rounded). */
#define SE_DEFINE_UPDATE(NAME, T, SQRT, ATTR)                                        \
ATTR static void NAME(const se_hyper* h, T* w, const T* g, T* s1, T* s2,            \
                      int64_t dim)                                                   \
{                                                                                    \
    int64_t j;                                                                       \
    const T lr = (T)h->lr, wd = (T)h->weight_decay, eps = (T)h->eps;                 \
    if (h->kind == SE_SGD) {                                                         \
        /* torch: d = g + wd * w; buf = d on the first step, else                   \
           buf = mom * buf + (1 - dampening) * d; d = d + mom * buf (Nesterov) or    \
           buf; w += -lr * d */                                                      \
        const T mom = (T)h->momentum, c1 = (T)h->c1;                                 \
        for (j = 0; j < dim; j++) {                                                  \
            T d = g[j];                                                              \
            if (wd != 0) d = d + wd * w[j];                                          \
            if (s1 != NULL) {                                                        \
                if (h->c2 != 0) s1[j] = d;                                           \
                else if (h->c1 == 1.0) s1[j] = mom * s1[j] + d;                      \
                else s1[j] = mom * s1[j] + c1 * d;                                   \
                if (h->c3 != 0) d = d + mom * s1[j];                                 \
                else d = s1[j];                                                      \
            }                                                                        \
            w[j] = w[j] - lr * d;                                                    \
        }                                                                            \
    } else if (h->kind == SE_ADAGRAD) {                                              \
        /* torch: d = g + wd * w; sum += d * d; w += -clr * (d / (sqrt(sum) + eps)) */ \
        if (wd != 0) {                                                               \
            for (j = 0; j < dim; j++) {                                              \
                T d = g[j] + wd * w[j];                                              \
                s1[j] = s1[j] + d * d;                                               \
                w[j] = w[j] - lr * (d / (SQRT(s1[j]) + eps));                        \
            }                                                                        \
        } else {                                                                     \
            for (j = 0; j < dim; j++) {                                              \
                T d = g[j];                                                          \
                s1[j] = s1[j] + d * d;                                               \
                w[j] = w[j] - lr * (d / (SQRT(s1[j]) + eps));                        \
            }                                                                        \
        }                                                                            \
    } else if (h->kind == SE_SPARSE_ADAM) {                                          \
        /* torch's sparse_adam, in its order of operations:                          \
             um = (g - m) * (1 - b1); m += um; uv = (g*g - v) * (1 - b2); v += uv     \
             w += -step_size * ((um + m_old) / (sqrt(uv + v_old) + eps)) */          \
        const T c1 = (T)h->c1, c2 = (T)h->c2;                                        \
        for (j = 0; j < dim; j++) {                                                  \
            T m_old = s1[j], v_old = s2[j];                                          \
            T um = (g[j] - m_old) * c1;                                              \
            T uv = (g[j] * g[j] - v_old) * c2;                                       \
            s1[j] = m_old + um;                                                      \
            s2[j] = v_old + uv;                                                      \
            w[j] = w[j] + (-lr) * ((um + m_old) / (SQRT(uv + v_old) + eps));         \
        }                                                                            \
    } else {                                                                         \
        /* row-wise Adagrad: s += mean((g + wd * w)**2); w -= lr * d / (sqrt(s) + eps) */ \
        double acc = 0.0;                                                            \
        T std_;                                                                      \
        if (dim == 0) return;                                                        \
        for (j = 0; j < dim; j++) {                                                  \
            T d = g[j];                                                              \
            if (wd != 0) d = d + wd * w[j];                                          \
            acc = acc + (double)d * (double)d;                                       \
        }                                                                            \
        s1[0] = s1[0] + (T)(acc / (double)dim);                                      \
        std_ = SQRT(s1[0]) + eps;                                                    \
        for (j = 0; j < dim; j++) {                                                  \
            T d = g[j];                                                              \
            if (wd != 0) d = d + wd * w[j];                                          \
            w[j] = w[j] - lr * (d / std_);                                           \
        }                                                                            \
    }                                                                                \
}

typedef void (*se_update_f32)(const se_hyper*, float*, const float*, float*, float*, int64_t);
typedef void (*se_update_f64)(const se_hyper*, double*, const double*, double*, double*,
                              int64_t);

SE_DEFINE_UPDATE(se_update_f32_base, float, sqrtf, )
SE_DEFINE_UPDATE(se_update_f64_base, double, sqrt, )
#if SE_X86_DISPATCH
SE_DEFINE_UPDATE(se_update_f32_avx2, float, sqrtf, SE_TARGET("avx2"))
SE_DEFINE_UPDATE(se_update_f64_avx2, double, sqrt, SE_TARGET("avx2"))
SE_DEFINE_UPDATE(se_update_f32_avx512, float, sqrtf,
                 SE_TARGET("avx512f,prefer-vector-width=512"))
SE_DEFINE_UPDATE(se_update_f64_avx512, double, sqrt,
                 SE_TARGET("avx512f,prefer-vector-width=512"))
#endif

typedef struct {
    se_update_f32 f32;
    se_update_f64 f64;
} se_update_table;

/* The update functions at `level` (as returned by sparsembed_pool_level()). */
static se_update_table sparsembed_update_table(int level) {
    se_update_table t;
    t.f32 = SE_PICK(se_update_f32);
    t.f64 = SE_PICK(se_update_f64);
    return t;
}

#endif
