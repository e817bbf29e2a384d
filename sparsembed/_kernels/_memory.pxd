# Memory helpers for the hot loops: software prefetch of a row that will be read
# soon. Inline C, so it costs nothing where the compiler has no prefetch builtin
# (the fallback is a no-op); never ISA-specific beyond SSE, which x86-64 always has.
cdef extern from *:
    """
    #include <stddef.h>
    #if defined(__GNUC__) || defined(__clang__)
        #define SPARSEMBED_PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)
        /* GCC treats a function that only prefetches as const and deletes calls to
           it once it is not inlined early; an empty volatile asm keeps them */
        #define SPARSEMBED_KEEP() __asm__ __volatile__("")
    #elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
        #include <xmmintrin.h>
        #define SPARSEMBED_PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
        #define SPARSEMBED_KEEP() ((void)0)
    #else
        #define SPARSEMBED_PREFETCH(p) ((void)0)
        #define SPARSEMBED_KEEP() ((void)0)
    #endif
    /* prefetch every 64-byte line of [p, p + nbytes) for reading */
    static inline void sparsembed_prefetch_row(const void* p, size_t nbytes) {
        const char* c = (const char*)p;
        size_t o;
        for (o = 0; o < nbytes; o += 64) SPARSEMBED_PREFETCH(c + o);
        SPARSEMBED_KEEP();
    }
    /* how many rows ahead to prefetch: about 6 KiB in flight, 4 to 32 rows */
    static inline ptrdiff_t sparsembed_prefetch_distance(size_t row_bytes) {
        size_t d = row_bytes ? (size_t)4096 / row_bytes : 32;
        return (ptrdiff_t)(d < 4 ? 4 : (d > 32 ? 32 : d));
    }
    """
    void prefetch_row "sparsembed_prefetch_row"(const void* p, size_t nbytes) noexcept nogil
    Py_ssize_t prefetch_distance "sparsembed_prefetch_distance"(size_t row_bytes) noexcept nogil


# Streamed (non-temporal) row stores: see _stream.h.
cdef extern from "_stream.h":
    void stream_row "sparsembed_stream_row"(void* dst, const void* src, size_t nbytes) noexcept nogil
    void stream_zero "sparsembed_stream_zero"(void* dst, size_t nbytes) noexcept nogil
    void stream_fence "sparsembed_stream_fence"() noexcept nogil
