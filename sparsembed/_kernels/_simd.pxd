# The SIMD sum pooling of ``_simd_pool.h`` (one C body per x86 SIMD level, picked at
# run time), shared by the kernels that sum rows picked by an index array: the
# EmbeddingBag forward (rows of the table by id) and the backward row sums (rows of
# grad_output by plan position). Each module that cimports this has its own level
# (``pool_level`` / ``pool_set_level``, both read SPARSEMBED_SIMD on first use); the
# kernels at a level come from ``_sum_pooling.pool_table_at``, compiled once there.

from cython cimport floating
from libc.stdint cimport int32_t, int64_t

from sparsembed._kernels._memory cimport fits_in_cache, past_cache, read_once_far
from sparsembed._kernels._types cimport index_t

cdef extern from "_simd_pool.h":
    enum:
        SE_MEAN
        SE_STREAM
        SE_ZERO_GAPS
        SE_ONE_PASS
        SE_FAR
        SE_FAR_LINE
    ctypedef int64_t (*pool_f32_i32_t)(
        const float*, int64_t, int64_t, const int32_t*, int64_t, const int64_t*, int64_t, int64_t,
        int64_t, const float*, int64_t, int, float*, const int64_t*, int64_t*) noexcept nogil
    ctypedef int64_t (*pool_f32_i64_t)(
        const float*, int64_t, int64_t, const int64_t*, int64_t, const int64_t*, int64_t, int64_t,
        int64_t, const float*, int64_t, int, float*, const int64_t*, int64_t*) noexcept nogil
    ctypedef int64_t (*pool_f64_i32_t)(
        const double*, int64_t, int64_t, const int32_t*, int64_t, const int64_t*, int64_t, int64_t,
        int64_t, const double*, int64_t, int, double*, const int64_t*, int64_t*) noexcept nogil
    ctypedef int64_t (*pool_f64_i64_t)(
        const double*, int64_t, int64_t, const int64_t*, int64_t, const int64_t*, int64_t, int64_t,
        int64_t, const double*, int64_t, int, double*, const int64_t*, int64_t*) noexcept nogil
    ctypedef struct pool_table "se_pool_table":
        pool_f32_i32_t f32_i32
        pool_f32_i64_t f32_i64
        pool_f64_i32_t f64_i32
        pool_f64_i64_t f64_i64
    int pool_level "sparsembed_pool_level"() noexcept nogil
    int pool_set_level "sparsembed_pool_set_level"(int level) noexcept nogil
    # whether the pooling sums rows written with these flags into a stage (and then
    # zeroes SE_ZERO_GAPS's gaps itself)
    bint pool_stages "se_stage_wanted"(const void* out, size_t row_bytes, int flags) noexcept nogil


cdef inline int pool_pass_flags(size_t src_bytes) noexcept nogil:
    # SE_ONE_PASS for rows pooled from a source (table, grad_output) that fits in half
    # the last-level cache: a row of 2 to 16 vectors that are not whole ones in one
    # pass over its bag, the last vector moved back (_simd_pool.h: SE_CHUNK_LAST).
    # Each module that calls this reads llc_bytes() once at import, holding the GIL.
    return SE_ONE_PASS if fits_in_cache(src_bytes) else 0


cdef inline int pool_table_flags(size_t table_bytes, size_t row_bytes) noexcept nogil:
    # pool_pass_flags for the rows of a table, with SE_FAR_LINE for rows of at least
    # 512 bytes past the last-level cache: each row's first line is also prefetched
    # into L2 further ahead (_simd_pool.h). Narrower rows go without: Intel Xeon VM,
    # bag sum forward, V = 1e7, D = 64: uniform ids 11% faster with it, Zipf ones 7%
    # slower (an instruction more per row of the cached, instruction-bound sums);
    # V = 2e6, D = 128: 6-8% and 2-4% faster.
    if row_bytes >= 512 and past_cache(table_bytes):
        return pool_pass_flags(table_bytes) | SE_FAR_LINE
    return pool_pass_flags(table_bytes)


cdef inline int pool_read_once_flags(size_t src_bytes) noexcept nogil:
    # pool_pass_flags for a source whose rows are each read once (the row sums'
    # grad_output), with SE_FAR past half the last-level cache or 32 MiB (_memory.pxd:
    # read_once_far): each row is also prefetched into L2 further ahead
    # (_simd_pool.h: SE_FAR)
    return SE_FAR if read_once_far(src_bytes) else SE_ONE_PASS


cdef inline int64_t pool_sum(
    const pool_table* fns,      # the sum kernels at the SIMD level in use
    const floating* weight,     # (num_rows, dim)
    int64_t num_rows,
    int64_t dim,
    const index_t* idx,
    int64_t n,                  # entries in idx (rows past a bag are prefetched too)
    const int64_t* starts,      # (n_bags + 1,)
    int64_t b0,                 # bags b0..b1-1
    int64_t b1,
    int64_t pad,
    const floating* psw,        # (n,) or NULL
    int64_t ahead,              # prefetch distance in entries
    int flags,                  # SE_MEAN: divide by the counts; SE_STREAM: non-temporal stores
    floating* out,              # (n_bags, dim), or (*, dim) with dest
    const int64_t* dest,        # (n_bags,) output row of each bag, or NULL: bag b -> out[b]
    int64_t* counts,            # (n_bags,) or NULL
) noexcept nogil:
    # the (dtype, index dtype) variant of this specialisation; returns the number of
    # bags holding an id outside [0, num_rows)
    if floating is float:
        if index_t is int32_t:
            return fns.f32_i32(weight, num_rows, dim, idx, n, starts, b0, b1, pad, psw,
                               ahead, flags, out, dest, counts)
        else:
            return fns.f32_i64(weight, num_rows, dim, idx, n, starts, b0, b1, pad, psw,
                               ahead, flags, out, dest, counts)
    else:
        if index_t is int32_t:
            return fns.f64_i32(weight, num_rows, dim, idx, n, starts, b0, b1, pad, psw,
                               ahead, flags, out, dest, counts)
        else:
            return fns.f64_i64(weight, num_rows, dim, idx, n, starts, b0, b1, pad, psw,
                               ahead, flags, out, dest, counts)


# The max pooling of ``_simd_max.h`` (EmbeddingBag mode "max"), at the same level.
cdef extern from "_simd_max.h":
    ctypedef int64_t (*max_f32_i32_t)(
        const float*, int64_t, int64_t, const int32_t*, int64_t, int64_t, int64_t, int64_t,
        int64_t, float*, int64_t*) noexcept nogil
    ctypedef int64_t (*max_f32_i64_t)(
        const float*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int64_t, int64_t,
        int64_t, float*, int64_t*) noexcept nogil
    ctypedef int64_t (*max_f64_i32_t)(
        const double*, int64_t, int64_t, const int32_t*, int64_t, int64_t, int64_t, int64_t,
        int64_t, double*, int64_t*) noexcept nogil
    ctypedef int64_t (*max_f64_i64_t)(
        const double*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int64_t, int64_t,
        int64_t, double*, int64_t*) noexcept nogil
    ctypedef struct max_table "se_max_table":
        max_f32_i32_t f32_i32
        max_f32_i64_t f32_i64
        max_f64_i32_t f64_i32
        max_f64_i64_t f64_i64
    max_table max_table_at "sparsembed_max_table"(int level) noexcept nogil


cdef inline int64_t max_bag(
    const max_table* fns,       # the max kernels at the SIMD level in use
    const floating* weight,     # (num_rows, dim)
    int64_t num_rows,
    int64_t dim,
    const index_t* idx,
    int64_t lo,                 # the bag is entries lo..hi-1
    int64_t hi,
    int64_t n,                  # entries in idx (rows past the bag are prefetched too)
    int64_t pad,
    int64_t ahead,              # prefetch distance in entries
    floating* out,              # (dim,) the columns' maxima (zeros for no entry)
    int64_t* argmax,            # (dim,) the entry each came from (-1 for no entry)
) noexcept nogil:
    # the (dtype, index dtype) variant; returns the count of non-padding entries, or
    # -(e + 1) for the first entry e with an id outside [0, num_rows)
    if floating is float:
        if index_t is int32_t:
            return fns.f32_i32(weight, num_rows, dim, idx, lo, hi, n, pad, ahead, out, argmax)
        else:
            return fns.f32_i64(weight, num_rows, dim, idx, lo, hi, n, pad, ahead, out, argmax)
    else:
        if index_t is int32_t:
            return fns.f64_i32(weight, num_rows, dim, idx, lo, hi, n, pad, ahead, out, argmax)
        else:
            return fns.f64_i64(weight, num_rows, dim, idx, lo, hi, n, pad, ahead, out, argmax)
