/* Row operations of the dense backward without a plan (_backward.pyx,
 * dense_backward_scatter): a row's first grad row streamed out as 0 + g, and the
 * later ones added in place. Whole 64-byte lines on line boundaries only (the
 * caller checks). AVX-512F where the CPU has it (as _stream.h's whole-line
 * stores), else SSE2, else plain C: the same bits at every level (one add per
 * element, in the same order).
 *
 * Why not the module's own loops (SSE2: the wheel's baseline) and a copy through a
 * buffer to sparsembed_stream_row: a quarter slower than these (Intel Xeon VM, V =
 * 1e6, 262,144 uniform ids, D = 256, 2 threads: 47.7 ms vs 38.3). */
#ifndef SPARSEMBED_SCATTER_ROWS_H
#define SPARSEMBED_SCATTER_ROWS_H

#include <stddef.h>
#include "_stream.h"

#if defined(__SSE2__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 2)
    #if SPARSEMBED_WIDE_STREAM
        __attribute__((target("avx512f")))
        static void sparsembed_first_row_zmm_f32(float* d, const float* s, size_t n) {
            size_t j;
            __m512 z = _mm512_setzero_ps();
            for (j = 0; j < n; j += 16) _mm512_stream_ps(d + j, _mm512_add_ps(z, _mm512_loadu_ps(s + j)));
        }
        __attribute__((target("avx512f")))
        static void sparsembed_first_row_zmm_f64(double* d, const double* s, size_t n) {
            size_t j;
            __m512d z = _mm512_setzero_pd();
            for (j = 0; j < n; j += 8) _mm512_stream_pd(d + j, _mm512_add_pd(z, _mm512_loadu_pd(s + j)));
        }
        __attribute__((target("avx512f")))
        static void sparsembed_add_row_zmm_f32(float* d, const float* s, size_t n) {
            size_t j;
            for (j = 0; j < n; j += 16)
                _mm512_store_ps(d + j, _mm512_add_ps(_mm512_load_ps(d + j), _mm512_loadu_ps(s + j)));
        }
        __attribute__((target("avx512f")))
        static void sparsembed_add_row_zmm_f64(double* d, const double* s, size_t n) {
            size_t j;
            for (j = 0; j < n; j += 8)
                _mm512_store_pd(d + j, _mm512_add_pd(_mm512_load_pd(d + j), _mm512_loadu_pd(s + j)));
        }
    #endif
    /* d[0:n] = 0 + s[0:n], streamed; d line-aligned, n of whole lines */
    static inline void sparsembed_first_row_f32(float* d, const float* s, size_t n) {
        size_t j;
        __m128 z = _mm_setzero_ps();
        #if SPARSEMBED_WIDE_STREAM
        if (sparsembed_has_zmm_streams()) { sparsembed_first_row_zmm_f32(d, s, n); return; }
        #endif
        for (j = 0; j < n; j += 4) _mm_stream_ps(d + j, _mm_add_ps(z, _mm_loadu_ps(s + j)));
    }
    static inline void sparsembed_first_row_f64(double* d, const double* s, size_t n) {
        size_t j;
        __m128d z = _mm_setzero_pd();
        #if SPARSEMBED_WIDE_STREAM
        if (sparsembed_has_zmm_streams()) { sparsembed_first_row_zmm_f64(d, s, n); return; }
        #endif
        for (j = 0; j < n; j += 2) _mm_stream_pd(d + j, _mm_add_pd(z, _mm_loadu_pd(s + j)));
    }
#else
    static inline void sparsembed_first_row_f32(float* d, const float* s, size_t n) {
        size_t j; float z = 0;
        for (j = 0; j < n; j++) d[j] = z + s[j];
    }
    static inline void sparsembed_first_row_f64(double* d, const double* s, size_t n) {
        size_t j; double z = 0;
        for (j = 0; j < n; j++) d[j] = z + s[j];
    }
#endif

/* d[0:n] += s[0:n]; d line-aligned. Plain loops (GCC vectorises them at the
   baseline), AVX-512F where the CPU streams whole lines with it */
static inline void sparsembed_add_row_f32(float* d, const float* s, size_t n) {
    size_t j;
#if defined(SPARSEMBED_WIDE_STREAM) && SPARSEMBED_WIDE_STREAM
    if (sparsembed_has_zmm_streams()) { sparsembed_add_row_zmm_f32(d, s, n); return; }
#endif
    for (j = 0; j < n; j++) d[j] = d[j] + s[j];
}
static inline void sparsembed_add_row_f64(double* d, const double* s, size_t n) {
    size_t j;
#if defined(SPARSEMBED_WIDE_STREAM) && SPARSEMBED_WIDE_STREAM
    if (sparsembed_has_zmm_streams()) { sparsembed_add_row_zmm_f64(d, s, n); return; }
#endif
    for (j = 0; j < n; j++) d[j] = d[j] + s[j];
}

#endif
