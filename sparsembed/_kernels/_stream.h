/* Non-temporal ("streaming") stores of rows, for the kernels' large outputs.

   Included by _memory.pxd (the Cython kernels) and _simd_pool.h (the SIMD row
   sums), so that both write rows the same way. Never ISA-specific beyond SSE2,
   which x86-64 always has; AVX-512F whole-line stores are chosen at run time. */
#ifndef SPARSEMBED_STREAM_H
#define SPARSEMBED_STREAM_H

/* Copy a row with non-temporal (streaming) stores where x86-64's baseline SSE2
   has them and dst is 16-byte aligned: a large output that will not be read
   back soon skips the read-for-ownership of each line (half the memory traffic
   of a plain store to a line not in cache) and does not evict the table rows
   from the caches. Elsewhere a plain memcpy. sparsembed_stream_fence() must run
   before another thread reads the rows (end of each thread's share). */
#include <string.h>
#include <stdint.h>
#if defined(__SSE2__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 2)
    #include <emmintrin.h>
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
        /* Whole-line (64-byte) non-temporal stores where the CPU has AVX-512F
           and the destination is line-aligned: measured 10-20% faster than four
           16-byte ones per line (gather of 262,144 rows, D = 64: 2.0 -> 1.8 ms
           on 2 threads; D = 256 uniform: 18.4 -> 15.0 ms). Plain moves: the
           bits are copied as they are. */
        #include <immintrin.h>
        #define SPARSEMBED_WIDE_STREAM 1
        /* the whole 64-byte lines of [0, nbytes) of a line-aligned d; returns
           the bytes written (the rest is left to the 16-byte loop) */
        __attribute__((target("avx512f")))
        static size_t sparsembed_stream_lines_zmm(char* d, const char* s, size_t nbytes) {
            size_t o = 0;
            for (; o + 64 <= nbytes; o += 64)
                _mm512_stream_ps((float*)(d + o), _mm512_loadu_ps((const float*)(s + o)));
            return o;
        }
        __attribute__((target("avx512f")))
        static size_t sparsembed_zero_lines_zmm(char* d, size_t nbytes) {
            size_t o = 0;
            __m512 z = _mm512_setzero_ps();
            for (; o + 64 <= nbytes; o += 64) _mm512_stream_ps((float*)(d + o), z);
            return o;
        }
        static int sparsembed_zmm_streams = -1;
        static inline int sparsembed_has_zmm_streams(void) {
            if (sparsembed_zmm_streams < 0)
                sparsembed_zmm_streams = __builtin_cpu_supports("avx512f") ? 1 : 0;
            return sparsembed_zmm_streams;
        }
    #else
        #define SPARSEMBED_WIDE_STREAM 0
    #endif
    static inline void sparsembed_stream_row(void* dst, const void* src, size_t nbytes) {
        char* d = (char*)dst;
        const char* s = (const char*)src;
        size_t o = 0;
        if (((uintptr_t)d & 15) != 0) {
            memcpy(d, s, nbytes);
            return;
        }
        #if SPARSEMBED_WIDE_STREAM
        if (nbytes >= 64 && sparsembed_has_zmm_streams()) {
            /* a row off a line boundary (300 floats: 3 rows in 4) up to the next
               line in 16-byte pieces, then whole lines: 4x fewer stores than all
               in 16-byte ones (lookup of 262,144 ids, 2 threads, 5 A/B pairs: D =
               300 18.5-21.0 -> 14.9-17.5 ms; D = 100 4.6-4.8 -> 4.3-4.4 ms) */
            for (; ((uintptr_t)(d + o) & 63) != 0 && o + 16 <= nbytes; o += 16)
                _mm_stream_si128((__m128i*)(d + o), _mm_loadu_si128((const __m128i*)(s + o)));
            o += sparsembed_stream_lines_zmm(d + o, s + o, nbytes - o);
        }
        #endif
        for (; o + 16 <= nbytes; o += 16)
            _mm_stream_si128((__m128i*)(d + o), _mm_loadu_si128((const __m128i*)(s + o)));
        if (o < nbytes) memcpy(d + o, s + o, nbytes - o);
    }
    static inline void sparsembed_stream_zero(void* dst, size_t nbytes) {
        char* d = (char*)dst;
        size_t o = 0;
        __m128i z = _mm_setzero_si128();
        #if SPARSEMBED_WIDE_STREAM
        if (nbytes >= 64 && sparsembed_has_zmm_streams()) {
            while (((uintptr_t)(d + o)) & 63) d[o++] = 0;
            o += sparsembed_zero_lines_zmm(d + o, nbytes - o);
        }
        #endif
        while (o < nbytes && (((uintptr_t)(d + o)) & 15) != 0) d[o++] = 0;
        for (; o + 16 <= nbytes; o += 16) _mm_stream_si128((__m128i*)(d + o), z);
        if (o < nbytes) memset(d + o, 0, nbytes - o);
    }
    static inline void sparsembed_stream_fence(void) { _mm_sfence(); }
#else
    static inline void sparsembed_stream_zero(void* dst, size_t nbytes) {
        memset(dst, 0, nbytes);
    }
    static inline void sparsembed_stream_row(void* dst, const void* src, size_t nbytes) {
        memcpy(dst, src, nbytes);
    }
    static inline void sparsembed_stream_fence(void) {}
#endif

#endif
