/* The sum pooling's bodies (SE_DEFINE_POOL, _simd_pool.h) at the AVX-512F level:
 * included by _sum_pooling_avx512.pyx only, whose table _sum_pooling's
 * pool_table_at hands out for that level. Their own module so that the build
 * compiles them beside the other levels (_simd_pool_bodies.h: why and how long).
 * Without x86 dispatch there is nothing to compile here; the table is then empty
 * and never asked for (the level is capped at the baseline).
 */
#ifndef SPARSEMBED_SIMD_POOL_BODIES_AVX512_H
#define SPARSEMBED_SIMD_POOL_BODIES_AVX512_H

#include "_simd_pool.h"

#if SE_X86_DISPATCH
SE_DEFINE_POOL_LEVEL(avx512, SE_TARGET("avx512f"), 64, 1, SE_NT_AVX512)
#endif

static inline se_pool_table sparsembed_pool_table_avx512(void) {
#if SE_X86_DISPATCH
    return SE_POOL_TABLE_AT(avx512);
#else
    se_pool_table none = {0};
    return none;
#endif
}

#endif
