/* The sum pooling's bodies (SE_DEFINE_POOL, _simd_pool.h) at every SIMD level and
 * the table that picks them: included by _sum_pooling.pyx only, which the other
 * modules take the table from (_sum_pooling.pxd: pool_table_at). _bag, _backward
 * and _optim each compiled their own before: 376, 166 and 289 s of GCC -O3 (Intel
 * Xeon VM, two compiles at a time), the bodies alone 278 s (3.5 MB of code); a
 * serial build of the whole package now takes 6.2 min.
 */
#ifndef SPARSEMBED_SIMD_POOL_BODIES_H
#define SPARSEMBED_SIMD_POOL_BODIES_H

#include "_simd_pool.h"

SE_DEFINE_POOL(se_pool_f32_i32_base, float, int32_t, , 16, 0, SE_NT_SSE)
SE_DEFINE_POOL(se_pool_f32_i64_base, float, int64_t, , 16, 0, SE_NT_SSE)
SE_DEFINE_POOL(se_pool_f64_i32_base, double, int32_t, , 16, 0, SE_NT_SSE)
SE_DEFINE_POOL(se_pool_f64_i64_base, double, int64_t, , 16, 0, SE_NT_SSE)
#if SE_X86_DISPATCH
SE_DEFINE_POOL(se_pool_f32_i32_avx2, float, int32_t, SE_TARGET("avx2"), 32, 0, SE_NT_AVX)
SE_DEFINE_POOL(se_pool_f32_i64_avx2, float, int64_t, SE_TARGET("avx2"), 32, 0, SE_NT_AVX)
SE_DEFINE_POOL(se_pool_f64_i32_avx2, double, int32_t, SE_TARGET("avx2"), 32, 0, SE_NT_AVX)
SE_DEFINE_POOL(se_pool_f64_i64_avx2, double, int64_t, SE_TARGET("avx2"), 32, 0, SE_NT_AVX)
SE_DEFINE_POOL(se_pool_f32_i32_avx512, float, int32_t, SE_TARGET("avx512f"), 64, 1, SE_NT_AVX512)
SE_DEFINE_POOL(se_pool_f32_i64_avx512, float, int64_t, SE_TARGET("avx512f"), 64, 1, SE_NT_AVX512)
SE_DEFINE_POOL(se_pool_f64_i32_avx512, double, int32_t, SE_TARGET("avx512f"), 64, 1, SE_NT_AVX512)
SE_DEFINE_POOL(se_pool_f64_i64_avx512, double, int64_t, SE_TARGET("avx512f"), 64, 1, SE_NT_AVX512)
#endif

static inline se_pool_table sparsembed_pool_table(int level) {
    se_pool_table t;
    t.f32_i32 = SE_PICK(se_pool_f32_i32);
    t.f32_i64 = SE_PICK(se_pool_f32_i64);
    t.f64_i32 = SE_PICK(se_pool_f64_i32);
    t.f64_i64 = SE_PICK(se_pool_f64_i64);
    return t;
}

#endif
