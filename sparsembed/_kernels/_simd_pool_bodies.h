/* The sum pooling's bodies (SE_DEFINE_POOL, _simd_pool.h) at the baseline and AVX2
 * levels and the table that picks them: included by _sum_pooling.pyx only, which the
 * other modules take the table from (_sum_pooling.pxd: pool_table_at). The AVX-512
 * bodies are _simd_pool_bodies_avx512.h's, in the module _sum_pooling_avx512: two
 * modules, so that two compilers build them at the same time.
 *
 * Why: _bag, _backward and _optim each compiled the bodies of every level once:
 * 376, 166 and 289 s of GCC -O3 (Intel Xeon VM, two compiles at a time). All of
 * them in _sum_pooling took 199 s on their own (the same VM, one compile at a time,
 * with the -g of Python's flags; 145 s at -g0), the build's longest step. Apart, at
 * -g0: baseline 37 s, AVX2 43 s, AVX-512 69 s (twice the vector registers: the
 * chunks of 9 to 16 vectors, SE_LAST_WIDE_CASES). A clean 2-core build: 272 -> 154 s
 * with setup.py's order (SLOWEST_FIRST) and -g0.
 */
#ifndef SPARSEMBED_SIMD_POOL_BODIES_H
#define SPARSEMBED_SIMD_POOL_BODIES_H

#include "_simd_pool.h"

SE_DEFINE_POOL_LEVEL(base, , 16, 0, SE_NT_SSE)
#if SE_X86_DISPATCH
SE_DEFINE_POOL_LEVEL(avx2, SE_TARGET("avx2"), 32, 0, SE_NT_AVX)
#endif

/* the kernels at the baseline level, or at AVX2 for level >= SE_LEVEL_AVX2 (the
   caller asks _sum_pooling_avx512 for the AVX-512 ones) */
static inline se_pool_table sparsembed_pool_table_below_avx512(int level) {
#if SE_X86_DISPATCH
    if (level >= SE_LEVEL_AVX2) return SE_POOL_TABLE_AT(avx2);
#endif
    (void)level;
    return SE_POOL_TABLE_AT(base);
}

#endif
