"""CUDA kernels of the GPU backend (CuPy ``RawModule``) and their launchers.

One source, compiled (lazily, once per table dtype ``T`` and id dtype ``I``) by NVRTC
through CuPy; CuPy caches the binaries on disk. The row kernels give one warp (32
lanes striding over the columns, in 16-byte vectors where the rows allow) to one item
(a table row, a segment of the row plan, a bag, a CSR row) and loop grid-stride over
the items, so any size fits the grid limits; the lookup runs flat over the output's
vectors, and the id and offset checks flat over their arrays. Launch shape:
:func:`sparsembed._cuda._ops.launch_shape`.

Determinism: no atomics on values (the only atomic is a max over the positions of
out-of-range ids, the same whatever order the threads run in). Reductions over a
table row's occurrences go through the row plan (ids sorted once, one segment per
distinct row); each lane sums its column over the segment in input order, exactly as
the CPU kernels do, so the gradients are bitwise equal to the CPU backend's (the
backend cuts segments longer than ``_ops.SEGMENT_CHUNK`` into chunks first: those
rows are equal up to rounding). The renorm's norm is a fixed-shape warp reduction
(deterministic; equal to the CPU's up to rounding).

Scalar arguments are passed as numpy scalars of the exact C type (``np.int64`` for
``i64``, ``np.float64`` for ``double``, ``np.int32`` for ``int``).
"""

import numpy as np

from sparsembed._cuda._ops import WARP, launch_shape

C_TYPES = {
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
    np.dtype(np.int32): "int",
    np.dtype(np.int64): "long long",
}

SOURCE = r"""
typedef long long i64;

__device__ __forceinline__ double se_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// max and min that keep a NaN (fmax / fmin drop it), as torch's reductions and
// the CPU kernel do: a row holding a NaN has a NaN norm and is not renormed
__device__ __forceinline__ double se_nan_max(double a, double b) {
    return (a > b || a != a) ? a : b;
}

__device__ __forceinline__ double se_nan_min(double a, double b) {
    return (a < b || a != a) ? a : b;
}

__device__ __forceinline__ double se_warp_max(double v) {
    for (int o = 16; o > 0; o >>= 1) v = se_nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double se_warp_min(double v) {
    for (int o = 16; o > 0; o >>= 1) v = se_nan_min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ i64 se_warp_max_i64(i64 v) {
    for (int o = 16; o > 0; o >>= 1) {
        const i64 u = __shfl_xor_sync(0xffffffffu, v, o);
        v = u > v ? u : v;
    }
    return v;
}

// ---------------------------------------------------------------- id checks
// Kernels that read rows by id check each id first and skip the rows of bad ones, so
// the host needs no separate pass and one read: *bad (zeroed before the launch)
// becomes the largest n - i over the bad positions i, 0 when there is none. A max is
// the same whatever order the threads run in, and gives the first bad position, the
// one the CPU's error names. Only error paths reach the atomics.
__device__ __forceinline__ bool se_in_range(const i64 r, const i64 num_rows) {
    return (unsigned long long)r < (unsigned long long)num_rows;  // r < 0 wraps high
}

__device__ __forceinline__ void se_flag_bad(i64* bad, const i64 mark) {
    atomicMax(bad, mark);
}

// se_flag_bad with the largest of the warp's marks (0: none), one atomic per warp at
// most; every lane must call it
__device__ __forceinline__ void se_flag_bad_of_warp(i64* bad, const i64 mark) {
    const i64 top = se_warp_max_i64(mark);
    if (threadIdx.x == 0 && top > 0) se_flag_bad(bad, top);
}

__device__ __forceinline__ i64 se_global_thread() {
    return ((i64)blockIdx.x * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ i64 se_global_threads() {
    return (i64)gridDim.x * blockDim.y * blockDim.x;
}

// *bad = max(n - i) over the i in [lo, n) with idx[i] outside [0, num_rows)
// (unchanged when all are in range)
__device__ __forceinline__ void se_check_range(const I* __restrict__ idx, const i64 lo,
                                               const i64 n, const i64 num_rows,
                                               i64* __restrict__ bad) {
    i64 mark = 0;
    for (i64 i = lo + se_global_thread(); i < n; i += se_global_threads()) {
        if (!se_in_range((i64)idx[i], num_rows)) {
            mark = n - i;  // this thread's first: i only grows
            break;
        }
    }
    se_flag_bad_of_warp(bad, mark);
}

// the id range check on its own (ids not read by a row kernel: plans, renorm)
extern "C" __global__ void se_check_ids(const I* __restrict__ idx,
                                        const i64 n,
                                        const i64 num_rows,
                                        i64* __restrict__ bad) {
    se_check_range(idx, 0, n, num_rows, bad);
}

// the column indices of a canonical row-sparse CSR matrix: each of the n_rows rows of
// dim values gets the columns 0 .. dim - 1. One warp per row, lanes over the columns,
// so no index is divided (the flat form's 64-bit t % dim per element held it to a
// quarter of the copy rate on an H200: 0.54 ms for 512 MB)
extern "C" __global__ void se_fill_columns(I* __restrict__ cols,
                                           const i64 n_rows,
                                           const i64 dim) {
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 u = (i64)blockIdx.x * blockDim.y + threadIdx.y; u < n_rows; u += step) {
        I* row = cols + u * dim;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x) row[j] = (I)j;
    }
}

// The row pointer of a canonical row-sparse CSR matrix whose stored rows are the
// sorted distinct rows[0 .. n_rows): indptr[r] = dim * #(rows < r) for r in
// [0, num_rows]. One pass writing indptr, each entry's count found by a binary search
// of rows (the zero-fill, scatter and scan this replaces made three passes over it and
// a multi-kernel scan: 0.21 ms for 10^7 rows on an H200). The lanes of a warp search
// for consecutive r, so their loads mostly hit the same entries; a thread's next r is
// larger, so its last answer bounds the next search from below.
extern "C" __global__ void se_row_pointer(const i64* __restrict__ rows,
                                          const i64 n_rows,
                                          const i64 num_rows,
                                          const i64 dim,
                                          I* __restrict__ indptr) {
    i64 lo = 0;
    for (i64 r = se_global_thread(); r <= num_rows; r += se_global_threads()) {
        i64 hi = n_rows;  // the first u >= lo with rows[u] >= r (n_rows: none)
        while (lo < hi) {
            const i64 mid = lo + ((hi - lo) >> 1);
            if (rows[mid] < r) lo = mid + 1; else hi = mid;
        }
        indptr[r] = (I)(lo * dim);
    }
}

// The row plan after its sort: sorted_ids[i] = ids[order[i]] for i in [0, m), and head[i]
// = 1 where a row's segment starts (i == 0 or a new id), else 0. The id before is
// read again through order (a neighbour's: in cache) rather than shuffled in.
extern "C" __global__ void se_plan_heads(const i64* __restrict__ ids,
                                         const i64* __restrict__ order,
                                         const i64 m,
                                         i64* __restrict__ sorted_ids,
                                         int* __restrict__ head) {
    for (i64 i = se_global_thread(); i < m; i += se_global_threads()) {
        const i64 v = ids[order[i]];
        sorted_ids[i] = v;
        head[i] = (i == 0 || v != ids[order[i - 1]]) ? 1 : 0;
    }
}

// ... then, with pos the inclusive prefix sum of head (m >= 1): segment u = pos[i] - 1
// starts at each head i, starts[u] = i and rows[u] = sorted_ids[i], and starts[n_rows] = m
// (n_rows = pos[m - 1]).
extern "C" __global__ void se_plan_segments(const int* __restrict__ head,
                                            const i64* __restrict__ pos,
                                            const i64* __restrict__ sorted_ids,
                                            const i64 m,
                                            i64* __restrict__ starts,
                                            i64* __restrict__ rows) {
    for (i64 i = se_global_thread(); i < m; i += se_global_threads()) {
        if (head[i]) {
            const i64 u = pos[i] - 1;
            starts[u] = i;
            rows[u] = sorted_ids[i];
        }
    }
    if (se_global_thread() == 0) starts[pos[m - 1]] = m;
}

// Bag starts from k >= 1 offsets: starts[i] = offsets[i], and starts[k] = n unless
// include_last (then starts holds k entries). result (zeroed before the launch):
// [0] max(k - i) over the i >= 1 with offsets[i] < offsets[i - 1] (0: never
// decreasing), [1] offsets[0], [2] offsets[k - 1], so one read gives the host every
// check it makes.
extern "C" __global__ void se_bag_starts(const i64* __restrict__ offsets,
                                         const i64 k,
                                         const i64 n,
                                         const int include_last,
                                         i64* __restrict__ starts,
                                         i64* __restrict__ result) {
    i64 mark = 0;
    for (i64 i = se_global_thread(); i < k; i += se_global_threads()) {
        const i64 o = offsets[i];
        starts[i] = o;
        if (mark == 0 && i > 0 && o < offsets[i - 1]) mark = k - i;
    }
    se_flag_bad_of_warp(result, mark);
    if (se_global_thread() == 0) {
        result[1] = offsets[0];
        result[2] = offsets[k - 1];
        if (!include_last) starts[k] = n;
    }
}

// ---------------------------------------------------------------- 16-byte vectors
// Where a row's length is a multiple of 16 bytes and the arrays are 16-byte aligned,
// the kernels move float4 / double2 vectors: one load brings 16 bytes per lane. The
// arithmetic stays per element (each component is its own column), so results are
// the scalar loops' bit for bit. Loops over a row's entries load SE_BATCH rows before
// adding them, in order: the loads are independent, only the adds chain, so a long
// segment keeps SE_BATCH reads in flight instead of one (8: on an H200 bags pool
// 1.5x faster than with 16, which costs occupancy; 4 to 32 time alike in row sums).
template <typename S> struct se_vec_of;
template <> struct se_vec_of<float> { typedef float4 type; };
template <> struct se_vec_of<double> { typedef double2 type; };
typedef se_vec_of<T>::type TV;
#define SE_VW ((i64)(sizeof(TV) / sizeof(T)))
#define SE_BATCH 8

__device__ __forceinline__ bool se_aligned(const void* p) {
    return ((unsigned long long)p & 15ULL) == 0;
}

__device__ __forceinline__ float se_vadd(float a, float b) { return a + b; }
__device__ __forceinline__ double se_vadd(double a, double b) { return a + b; }
__device__ __forceinline__ float4 se_vadd(float4 a, float4 b) {
    a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
    return a;
}
__device__ __forceinline__ double2 se_vadd(double2 a, double2 b) {
    a.x += b.x; a.y += b.y;
    return a;
}
// s * v per element (rounded products, as the scalar code's s * v)
__device__ __forceinline__ float se_vmul(float s, float v) { return s * v; }
__device__ __forceinline__ double se_vmul(double s, double v) { return s * v; }
__device__ __forceinline__ float4 se_vmul(float s, float4 v) {
    v.x = s * v.x; v.y = s * v.y; v.z = s * v.z; v.w = s * v.w;
    return v;
}
__device__ __forceinline__ double2 se_vmul(double s, double2 v) {
    v.x = s * v.x; v.y = s * v.y;
    return v;
}
__device__ __forceinline__ float se_vdiv(float v, float s) { return v / s; }
__device__ __forceinline__ double se_vdiv(double v, double s) { return v / s; }
__device__ __forceinline__ float4 se_vdiv(float4 v, float s) {
    v.x /= s; v.y /= s; v.z /= s; v.w /= s;
    return v;
}
__device__ __forceinline__ double2 se_vdiv(double2 v, double s) {
    v.x /= s; v.y /= s;
    return v;
}
template <typename U> __device__ __forceinline__ U se_vzero() {
    U z;
    T* e = (T*)&z;
    for (int q = 0; q < (int)(sizeof(U) / sizeof(T)); ++q) e[q] = (T)0;
    return z;
}

// acc plus, in order k = k0 .. hi - 1, the term of entry e = perm[k]: the row
// g[src, c] of src = entry_bag[e] (or e when entry_bag is null), times scale[e] when
// scale is not null.
template <typename U>
__device__ __forceinline__ U se_rows_sum(U acc, const U* __restrict__ g,
                                         const i64* __restrict__ perm,
                                         const i64* __restrict__ entry_bag,
                                         const T* __restrict__ scale,
                                         i64 k, const i64 hi, const i64 nv, const i64 c) {
    for (; k + SE_BATCH <= hi; k += SE_BATCH) {
        U v[SE_BATCH];
#pragma unroll
        for (int q = 0; q < SE_BATCH; ++q) {
            const i64 e = perm[k + q];
            v[q] = g[(entry_bag ? entry_bag[e] : e) * nv + c];
            if (scale) v[q] = se_vmul(scale[e], v[q]);
        }
#pragma unroll
        for (int q = 0; q < SE_BATCH; ++q) acc = se_vadd(acc, v[q]);
    }
    for (; k < hi; ++k) {
        const i64 e = perm[k];
        U v = g[(entry_bag ? entry_bag[e] : e) * nv + c];
        if (scale) v = se_vmul(scale[e], v);
        acc = se_vadd(acc, v);
    }
    return acc;
}

// the flat lookup: vector t of the output is vector t % nv of row idx[t / nv];
// SE_GATHER_UNROLL (GATHER_UNROLL, set by module_source) vectors per thread, all
// loaded before any is stored. J: the index type (32-bit when the output has fewer
// than 2**31 vectors: a cheaper division)
template <typename J>
__device__ __forceinline__ void se_gather_vec(const TV* __restrict__ w,
                                              const I* __restrict__ idx,
                                              TV* __restrict__ o,
                                              const J total, const J nv,
                                              const i64 n, const i64 num_rows,
                                              i64* __restrict__ bad) {
    const J nthreads = (J)gridDim.x * blockDim.y * blockDim.x;
    const J tid = ((J)blockIdx.x * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    for (J base = tid; base < total; base += (J)SE_GATHER_UNROLL * nthreads) {
        TV v[SE_GATHER_UNROLL];
#pragma unroll
        for (int q = 0; q < SE_GATHER_UNROLL; ++q) {
            const J t = base + (J)q * nthreads;
            if (t < total) {
                const J i = t / nv;
                const i64 r = (i64)idx[i];
                if (se_in_range(r, num_rows)) {
                    v[q] = w[r * (i64)nv + (i64)(t - i * nv)];
                } else {
                    v[q] = se_vzero<TV>();
                    if (t == i * nv) se_flag_bad(bad, n - (i64)i);  // once per row
                }
            }
        }
#pragma unroll
        for (int q = 0; q < SE_GATHER_UNROLL; ++q) {
            const J t = base + (J)q * nthreads;
            if (t < total) o[t] = v[q];
        }
    }
}

// out[i, :] = weight[idx[i], :] for the ids in [0, num_rows); a row of a bad id is
// not read, and flagged in *bad (see se_flag_bad)
extern "C" __global__ void se_gather(const T* __restrict__ weight,
                                     const I* __restrict__ idx,
                                     T* __restrict__ out,
                                     const i64 n,
                                     const i64 dim,
                                     const i64 num_rows,
                                     i64* __restrict__ bad) {
    if (dim % SE_VW == 0 && se_aligned(weight) && se_aligned(out)) {
        const i64 total = n * (dim / SE_VW);
        // a step adds SE_GATHER_UNROLL (<= 4) * at most 2**28 threads: no wrap below 2**31
        if (total < 0x80000000LL)
            se_gather_vec<unsigned>((const TV*)weight, idx, (TV*)out, (unsigned)total,
                                    (unsigned)(dim / SE_VW), n, num_rows, bad);
        else
            se_gather_vec<i64>((const TV*)weight, idx, (TV*)out, total, dim / SE_VW, n,
                               num_rows, bad);
        return;
    }
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 i = (i64)blockIdx.x * blockDim.y + threadIdx.y; i < n; i += step) {
        const i64 r = (i64)idx[i];
        if (!se_in_range(r, num_rows)) {
            if (threadIdx.x == 0) se_flag_bad(bad, n - i);
            continue;
        }
        const T* src = weight + r * dim;
        T* dst = out + i * dim;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = src[j];
    }
}

// torch's embedding_renorm_ on distinct rows: a row whose norm exceeds max_norm is
// scaled by max_norm / (norm + 1e-7), in T. kind: 0 p=2, 1 p=1, 2 inf, 3 -inf,
// 4 p=0 (count of non-zeros), 5 any other p. The whole warp handles one row, so
// the loop over k is warp-uniform and the shuffles see all 32 lanes.
extern "C" __global__ void se_renorm(T* __restrict__ weight,
                                     const i64* __restrict__ rows,
                                     const i64 n_rows,
                                     const i64 dim,
                                     const double max_norm,
                                     const double p,
                                     const int kind) {
    const double inf = __longlong_as_double(0x7ff0000000000000LL);
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 k = (i64)blockIdx.x * blockDim.y + threadIdx.y; k < n_rows; k += step) {
        T* row = weight + rows[k] * dim;
        double acc = (kind == 3) ? inf : 0.0;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {
            const double a = (double)row[j];
            switch (kind) {
                case 0: acc += a * a; break;
                case 1: acc += fabs(a); break;
                case 2: acc = se_nan_max(fabs(a), acc); break;
                case 3: acc = se_nan_min(fabs(a), acc); break;
                case 4: acc += (a != 0.0) ? 1.0 : 0.0; break;
                default: acc += pow(fabs(a), p);
            }
        }
        double norm;
        if (kind == 2) norm = se_warp_max(acc);
        else if (kind == 3) norm = se_warp_min(acc);
        else norm = se_warp_sum(acc);
        if (kind == 0) norm = sqrt(norm);
        else if (kind == 5) norm = pow(norm, 1.0 / p);
        if (norm > max_norm) {
            const T scale = (T)(max_norm / (norm + 1e-7));
            for (i64 j = threadIdx.x; j < dim; j += blockDim.x) row[j] = row[j] * scale;
        }
    }
}

// Segment u of the row plan: acc = sum of grad[perm[k], :] for k in
// [starts[u], starts[u+1]), in that order (the first term copied, not added to 0,
// as on the CPU), divided by the count when scale_by_count and count > 1; written
// to out[rows[u], :] (dense) or out[u, :].
template <typename U>
__device__ __forceinline__ void se_segment_sum_rows(const U* __restrict__ g,
                                                    const i64* __restrict__ perm,
                                                    const i64* __restrict__ starts,
                                                    const i64* __restrict__ rows,
                                                    const int dense,
                                                    const i64 n_rows,
                                                    const i64 nv,
                                                    const int scale_by_count,
                                                    U* __restrict__ out) {
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 u = (i64)blockIdx.x * blockDim.y + threadIdx.y; u < n_rows; u += step) {
        const i64 lo = starts[u];
        const i64 hi = starts[u + 1];
        U* dst = out + (dense ? rows[u] : u) * nv;
        for (i64 c = threadIdx.x; c < nv; c += blockDim.x) {
            U acc = g[perm[lo] * nv + c];
            acc = se_rows_sum<U>(acc, g, perm, (const i64*)0, (const T*)0, lo + 1, hi, nv, c);
            if (scale_by_count && hi - lo > 1) acc = se_vdiv(acc, (T)(hi - lo));
            dst[c] = acc;
        }
    }
}

extern "C" __global__ void se_segment_sum(const T* __restrict__ grad,
                                          const i64* __restrict__ perm,
                                          const i64* __restrict__ starts,
                                          const i64* __restrict__ rows,
                                          const int dense,
                                          const i64 n_rows,
                                          const i64 dim,
                                          const int scale_by_count,
                                          T* __restrict__ out) {
    if (dim % SE_VW == 0 && se_aligned(grad) && se_aligned(out))
        se_segment_sum_rows<TV>((const TV*)grad, perm, starts, rows, dense, n_rows,
                                dim / SE_VW, scale_by_count, (TV*)out);
    else
        se_segment_sum_rows<T>(grad, perm, starts, rows, dense, n_rows, dim,
                               scale_by_count, out);
}

// The sum of two row-sparse gradients on their union of rows: out[u, :] = (0 + a[ia, :])
// + b[ib, :], ia = src_a[u], ib = src_b[u], a term left out where its index is -1 (the
// same operations, in the same order, as adding each into a zero-filled array).
template <typename U>
__device__ __forceinline__ void se_add_rows_of(const U* __restrict__ a,
                                               const i64* __restrict__ src_a,
                                               const U* __restrict__ b,
                                               const i64* __restrict__ src_b,
                                               const i64 n_rows, const i64 nv,
                                               U* __restrict__ out) {
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 u = (i64)blockIdx.x * blockDim.y + threadIdx.y; u < n_rows; u += step) {
        const i64 ia = src_a[u];
        const i64 ib = src_b[u];
        for (i64 c = threadIdx.x; c < nv; c += blockDim.x) {
            U acc = se_vzero<U>();
            if (ia >= 0) acc = se_vadd(acc, a[ia * nv + c]);
            if (ib >= 0) acc = se_vadd(acc, b[ib * nv + c]);
            out[u * nv + c] = acc;
        }
    }
}

extern "C" __global__ void se_add_rows(const T* __restrict__ a,
                                       const i64* __restrict__ src_a,
                                       const T* __restrict__ b,
                                       const i64* __restrict__ src_b,
                                       const i64 n_rows,
                                       const i64 dim,
                                       T* __restrict__ out) {
    if (dim % SE_VW == 0 && se_aligned(a) && se_aligned(b) && se_aligned(out))
        se_add_rows_of<TV>((const TV*)a, src_a, (const TV*)b, src_b, n_rows, dim / SE_VW,
                           (TV*)out);
    else
        se_add_rows_of<T>(a, src_a, b, src_b, n_rows, dim, out);
}

// ---------------------------------------------------------------- EmbeddingBag

// One entry of a bag as the pooling reads it: counted when not padding; its row taken
// when in range and not padding; the first out-of-range entry remembered (the caller
// flags it). Every lane reads the same ids, so all that ran agree on count and bad.
__device__ __forceinline__ bool se_bag_take(const i64 r, const i64 e, const i64 pad,
                                            const i64 num_rows, i64& count, i64& first_bad) {
    count += (r != pad);  // ids in range are >= 0: pad = -1 (none) matches none of them
    if (!se_in_range(r, num_rows)) {
        if (first_bad < 0) first_bad = e;
        return false;
    }
    return r != pad;
}

// the sum of one bag's (entries lo .. hi - 1) column c, in vectors of U: the entries'
// rows loaded SE_BATCH at a time (a padding or out-of-range entry's row is never
// read), then added in entry order (times psw[e] when has_psw); count and first_bad
// as se_bag_take leaves them
template <typename U>
__device__ __forceinline__ U se_bag_pool(const U* __restrict__ w,
                                         const I* __restrict__ idx,
                                         const i64 lo, const i64 hi, const i64 pad,
                                         const i64 num_rows,
                                         const T* __restrict__ psw, const int has_psw,
                                         const i64 nv, const i64 c,
                                         i64& count, i64& first_bad) {
    U acc = se_vzero<U>();
    count = 0;
    first_bad = -1;
    i64 e = lo;
    for (; e + SE_BATCH <= hi; e += SE_BATCH) {
        U v[SE_BATCH];
        bool take[SE_BATCH];
#pragma unroll
        for (int q = 0; q < SE_BATCH; ++q) {
            const i64 r = (i64)idx[e + q];
            take[q] = se_bag_take(r, e + q, pad, num_rows, count, first_bad);
            if (take[q]) v[q] = w[r * nv + c];
        }
#pragma unroll
        for (int q = 0; q < SE_BATCH; ++q) {
            if (take[q]) acc = se_vadd(acc, has_psw ? se_vmul(psw[e + q], v[q]) : v[q]);
        }
    }
    for (; e < hi; ++e) {
        const i64 r = (i64)idx[e];
        if (!se_bag_take(r, e, pad, num_rows, count, first_bad)) continue;
        const U v = w[r * nv + c];
        acc = se_vadd(acc, has_psw ? se_vmul(psw[e], v) : v);
    }
    return acc;
}

// sum (mode 0) and mean (mode 1: divided by the count of non-padding entries when
// more than 1) pooling of one bag into dst, a row of nv vectors of U (each lane its
// columns); count and first_bad from the lane's pass (lane 0 always makes one)
template <typename U>
__device__ __forceinline__ void se_bag_pool_row(const U* __restrict__ w,
                                                const I* __restrict__ idx,
                                                const i64 lo, const i64 hi, const i64 pad,
                                                const i64 num_rows,
                                                const T* __restrict__ psw, const int has_psw,
                                                const int mode, const i64 nv,
                                                U* __restrict__ dst,
                                                i64& count, i64& first_bad) {
    for (i64 c = threadIdx.x; c < nv; c += blockDim.x) {
        U acc = se_bag_pool<U>(w, idx, lo, hi, pad, num_rows, psw, has_psw, nv, c, count,
                               first_bad);
        if (mode == 1 && count > 1) acc = se_vdiv(acc, (T)count);
        dst[c] = acc;
    }
}

// Bag b pools weight rows of entries [starts[b], starts[b+1]) in entry order,
// skipping pad: mode 0 sum (times psw[e] when has_psw), 1 mean (sum / count when
// count > 1), 2 max (strict >: the first occurrence wins ties; argmax[b, j] = the
// winning entry, -1 for an empty bag). counts[b] = non-padding entries. Empty bags
// give zeros. Same arithmetic, in the same order, as the CPU kernel. Every id of
// idx[0 .. n_ids) is checked against [0, num_rows), those past the last bag too (as
// the CPU does): a bad id's row is not read, and *bad is flagged (see se_flag_bad;
// the host raises and drops the outputs).
extern "C" __global__ void se_bag_forward(const T* __restrict__ weight,
                                          const I* __restrict__ idx,
                                          const i64* __restrict__ starts,
                                          const i64 pad,
                                          const int mode,
                                          const T* __restrict__ psw,
                                          const int has_psw,
                                          const i64 n_bags,
                                          const i64 dim,
                                          T* __restrict__ out,
                                          i64* __restrict__ argmax,
                                          i64* __restrict__ counts,
                                          const i64 n_ids,
                                          const i64 num_rows,
                                          i64* __restrict__ bad) {
    const bool vec = dim % SE_VW == 0 && se_aligned(weight) && se_aligned(out);
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 b = (i64)blockIdx.x * blockDim.y + threadIdx.y; b < n_bags; b += step) {
        const i64 lo = starts[b];
        const i64 hi = starts[b + 1];
        // the pooling checks each id as it reads it (no pass of its own over the bag):
        // a bad one's row is not read, and lane 0, which always pools, flags the first
        i64 c = 0;
        i64 first_bad = -1;
        if (mode != 2) {
            if (vec)
                se_bag_pool_row<TV>((const TV*)weight, idx, lo, hi, pad, num_rows, psw,
                                    has_psw, mode, dim / SE_VW,
                                    (TV*)out + b * (dim / SE_VW), c, first_bad);
            else
                se_bag_pool_row<T>(weight, idx, lo, hi, pad, num_rows, psw, has_psw, mode,
                                   dim, out + b * dim, c, first_bad);
        } else {
            for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {  // max
                T acc = (T)0;
                i64 won = -1;
                i64 seen = 0;
                c = 0;
                first_bad = -1;
                for (i64 e = lo; e < hi; ++e) {
                    const i64 r = (i64)idx[e];
                    if (!se_bag_take(r, e, pad, num_rows, c, first_bad)) continue;
                    const T w = weight[r * dim + j];
                    if (seen == 0 || w > acc) { acc = w; won = e; }
                    ++seen;
                }
                out[b * dim + j] = acc;
                argmax[b * dim + j] = won;
            }
        }
        if (threadIdx.x == 0) {
            counts[b] = c;
            if (first_bad >= 0) se_flag_bad(bad, n_ids - first_bad);
        }
    }
    se_check_range(idx, starts[n_bags], n_ids, num_rows, bad);  // past the last bag
}

// out[e] = dot(grad[entry_bag[e]], weight[idx[e]]) for e < m, in double (a warp
// reduction); 0 for padding entries.
extern "C" __global__ void se_psw_grad(const T* __restrict__ grad,
                                       const T* __restrict__ weight,
                                       const I* __restrict__ idx,
                                       const i64* __restrict__ entry_bag,
                                       const i64 pad,
                                       const i64 m,
                                       const i64 dim,
                                       T* __restrict__ out) {
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 e = (i64)blockIdx.x * blockDim.y + threadIdx.y; e < m; e += step) {
        const i64 r = (i64)idx[e];
        if (r == pad) {  // warp-uniform
            if (threadIdx.x == 0) out[e] = (T)0;
            continue;
        }
        const T* g = grad + entry_bag[e] * dim;
        const T* w = weight + r * dim;
        double acc = 0.0;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x) acc += (double)g[j] * (double)w[j];
        acc = se_warp_sum(acc);
        if (threadIdx.x == 0) out[e] = (T)acc;
    }
}

// One bag-plan segment's sum (entries perm[lo .. hi - 1], starting from 0) into dst, a
// row of nv vectors of U: each lane's columns, through se_rows_sum
template <typename U>
__device__ __forceinline__ void se_bag_row_sum(const U* __restrict__ g,
                                               const i64* __restrict__ perm,
                                               const i64* __restrict__ entry_bag,
                                               const T* __restrict__ scale,
                                               const i64 lo, const i64 hi,
                                               const int scale_by_count,
                                               const i64 nv, U* __restrict__ dst) {
    for (i64 c = threadIdx.x; c < nv; c += blockDim.x) {
        U acc = se_rows_sum<U>(se_vzero<U>(), g, perm, entry_bag, scale, lo, hi, nv, c);
        if (scale_by_count && hi - lo > 1) acc = se_vdiv(acc, (T)(hi - lo));
        dst[c] = acc;
    }
}

// Segment u of the bag row plan (entries of row rows[u], in input order): acc =
// sum over its entries e of grad[entry_bag[e], :] * scale[e] (has_scale), or only
// the columns e won (has_argmax, max mode), or plain; divided by the count when
// scale_by_count and count > 1; written to out[rows[u], :] (dense) or out[u, :].
extern "C" __global__ void se_bag_segment_sum(const T* __restrict__ grad,
                                              const i64* __restrict__ perm,
                                              const i64* __restrict__ starts,
                                              const i64* __restrict__ rows,
                                              const int dense,
                                              const i64* __restrict__ entry_bag,
                                              const T* __restrict__ scale,
                                              const int has_scale,
                                              const i64* __restrict__ argmax,
                                              const int has_argmax,
                                              const i64 n_rows,
                                              const i64 dim,
                                              const int scale_by_count,
                                              T* __restrict__ out) {
    const bool vec = dim % SE_VW == 0 && se_aligned(grad) && se_aligned(out);
    const T* sc = has_scale ? scale : (const T*)0;
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 u = (i64)blockIdx.x * blockDim.y + threadIdx.y; u < n_rows; u += step) {
        const i64 lo = starts[u];
        const i64 hi = starts[u + 1];
        const i64 r = dense ? rows[u] : u;
        if (!has_argmax) {
            if (vec)
                se_bag_row_sum<TV>((const TV*)grad, perm, entry_bag, sc, lo, hi, scale_by_count,
                                   dim / SE_VW, (TV*)out + r * (dim / SE_VW));
            else
                se_bag_row_sum<T>(grad, perm, entry_bag, sc, lo, hi, scale_by_count, dim,
                                  out + r * dim);
            continue;
        }
        T* dst = out + r * dim;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {  // max: the columns e won
            T acc = (T)0;
            for (i64 k = lo; k < hi; ++k) {
                const i64 e = perm[k];
                const i64 b = entry_bag[e];
                if (argmax[b * dim + j] == e) acc += grad[b * dim + j];
            }
            if (scale_by_count && hi - lo > 1) acc /= (T)(hi - lo);
            dst[j] = acc;
        }
    }
}

// ---------------------------------------------------------------- optimizers

// One optimizer update of the rows of a built gradient: row r = rows[u] (or u when
// all_rows) gets values[u, :]. Hyper-parameters as in the CPU kernel's Hyper struct,
// and the same per-element arithmetic (hyper-parameters rounded to T first; sqrt in
// double, rounded to T). kind: 0 SGD,
// 1 Adagrad, 2 SparseAdam, 3 row-wise Adagrad (s1 holds one value per row; the mean
// of squares is a warp reduction in double).
extern "C" __global__ void se_update_rows(const int kind,
                                          const double h_lr,
                                          const double h_momentum,
                                          const double h_weight_decay,
                                          const double h_eps,
                                          const double h_c1,
                                          const double h_c2,
                                          const double h_c3,
                                          T* __restrict__ weight,
                                          const i64* __restrict__ rows,
                                          const int all_rows,
                                          const T* __restrict__ values,
                                          T* __restrict__ s1,
                                          const int has_s1,
                                          T* __restrict__ s2,
                                          const i64 n_rows,
                                          const i64 dim) {
    const T lr = (T)h_lr;
    const T mom = (T)h_momentum;
    const T wd = (T)h_weight_decay;
    const T eps = (T)h_eps;
    const T c1 = (T)h_c1;
    const T c2 = (T)h_c2;
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 u = (i64)blockIdx.x * blockDim.y + threadIdx.y; u < n_rows; u += step) {
        const i64 r = all_rows ? u : rows[u];
        T* w = weight + r * dim;
        const T* g = values + u * dim;
        if (kind == 3) {
            double acc = 0.0;
            for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {
                T d = g[j];
                if (wd != (T)0) d = d + wd * w[j];
                acc += (double)d * (double)d;
            }
            acc = se_warp_sum(acc);
            const T s_old = s1[r];
            __syncwarp();
            const T s_new = s_old + (T)(acc / (double)dim);
            if (threadIdx.x == 0) s1[r] = s_new;
            const T denom = (T)sqrt((double)s_new) + eps;
            for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {
                T d = g[j];
                if (wd != (T)0) d = d + wd * w[j];
                w[j] = w[j] - lr * (d / denom);
            }
            continue;
        }
        T* m = has_s1 ? s1 + r * dim : 0;
        T* v = s2 + r * dim;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {
            if (kind == 0) {
                // c1 = 1 - dampening, c2 != 0 on the table's first step (buf = d),
                // c3 != 0 for Nesterov momentum
                T d = g[j];
                if (wd != (T)0) d = d + wd * w[j];
                if (has_s1) {
                    if (h_c2 != 0.0) m[j] = d;
                    else if (h_c1 == 1.0) m[j] = mom * m[j] + d;
                    else m[j] = mom * m[j] + c1 * d;
                    if (h_c3 != 0.0) d = d + mom * m[j];
                    else d = m[j];
                }
                w[j] = w[j] - lr * d;
            } else if (kind == 1) {
                T d = g[j];
                if (wd != (T)0) d = d + wd * w[j];
                m[j] = m[j] + d * d;
                const T denom = (T)sqrt((double)m[j]) + eps;
                w[j] = w[j] - lr * (d / denom);
            } else {
                const T m_old = m[j];
                const T v_old = v[j];
                const T um = (g[j] - m_old) * c1;
                const T uv = (g[j] * g[j] - v_old) * c2;
                m[j] = m_old + um;
                v[j] = v_old + uv;
                const T denom = (T)sqrt((double)(uv + v_old)) + eps;
                w[j] = w[j] + (-lr) * ((um + m_old) / denom);
            }
        }
    }
}
"""

# no fused multiply-add: products and sums rounded as on the CPU, so results match
# the CPU kernels bit for bit where the summation order is the same
COMPILE_OPTIONS = ("--fmad=false",)

# vectors each thread of se_gather's flat loop moves per step (SE_GATHER_UNROLL, at
# most 4). On an H200 (V=1e7, D=128, 2**20 ids) 1 and 4 time alike for uniform ids
# (0.30 ms), 1 is 8% faster for Zipf ids, 2 and 8 slower.
GATHER_UNROLL = 1

# se_update_rows' doubles: lr, momentum, weight_decay, eps, c1, c2, c3 (shorter tuples
# are padded with zeros)
N_HYPER = 7


def module_source(t_dtype, i_dtype):
    """The source compiled for table dtype ``t_dtype`` and id dtype ``i_dtype``."""
    return (f"typedef {C_TYPES[np.dtype(t_dtype)]} T;\n"
            f"typedef {C_TYPES[np.dtype(i_dtype)]} I;\n"
            f"#define SE_GATHER_UNROLL {GATHER_UNROLL}\n" + SOURCE)


class CudaKernels:
    """Launchers of the kernels in :data:`SOURCE`.

    Parameters
    ----------
    cupy : module
        CuPy (only ``cupy.RawModule`` is used here).
    """

    def __init__(self, cupy):
        self._cp = cupy
        self._modules = {}
        self._dummies = {}

    def _function(self, name, t_dtype, i_dtype=np.int64):
        key = (np.dtype(t_dtype), np.dtype(i_dtype))
        module = self._modules.get(key)
        if module is None:
            module = self._modules[key] = self._cp.RawModule(code=module_source(*key),
                                                             options=COMPILE_OPTIONS)
        return module.get_function(name)

    def _untyped_function(self, name, i_dtype=None):
        """A kernel that does not use the table dtype ``T`` (nor ``I`` when ``i_dtype``
        is None): taken from a module already compiled, when one fits, rather than
        compiling another."""
        for (_, module_i), module in self._modules.items():
            if i_dtype is None or module_i == np.dtype(i_dtype):
                return module.get_function(name)
        return self._function(name, np.float32, np.int64 if i_dtype is None else i_dtype)

    def gather(self, weight, idx, out, bad):
        """``bad``: (1,) int64, zeroed; flagged for ids outside the table (se_flag_bad)."""
        n, dim = out.shape
        vw = 16 // weight.itemsize  # the kernel's vector width (float4 / double2)
        if dim % vw == 0:  # flat over the output's vectors, GATHER_UNROLL per thread
            grid, block = launch_shape(-(-(n * dim // vw) // (WARP * GATHER_UNROLL)))
        else:  # one warp per row
            grid, block = launch_shape(n)
        self._function("se_gather", weight.dtype, idx.dtype)(
            grid, block, (weight, idx, out, np.int64(n), np.int64(dim),
                          np.int64(weight.shape[0]), bad))

    def check_ids(self, idx, num_rows, bad):
        """Flag ``bad`` ((1,) int64, zeroed) when an id is outside [0, num_rows)."""
        n = idx.shape[0]
        grid, block = launch_shape(-(-n // WARP))
        self._untyped_function("se_check_ids", idx.dtype)(
            grid, block, (idx, np.int64(n), np.int64(num_rows), bad))

    def fill_columns(self, cols, dim):
        """``cols`` (int32 or int64, C-contiguous, a multiple of ``dim`` long) =
        0 .. dim - 1 repeated."""
        n_rows = cols.shape[0] // dim
        grid, block = launch_shape(n_rows)
        self._untyped_function("se_fill_columns", cols.dtype)(
            grid, block, (cols, np.int64(n_rows), np.int64(dim)))

    def plan_heads(self, ids, order, sorted_ids, head):
        """``sorted_ids`` = ``ids[order]`` and ``head`` (int32) its segment starts (1/0);
        all int64 but ``head``, of one length m >= 1."""
        m = order.shape[0]
        grid, block = launch_shape(-(-m // WARP))
        self._untyped_function("se_plan_heads")(
            grid, block, (ids, order, np.int64(m), sorted_ids, head))

    def plan_segments(self, head, pos, sorted_ids, starts, rows):
        """``starts`` / ``rows`` of the segments that ``head`` marks; ``pos`` (int64) is
        head's inclusive prefix sum (m >= 1)."""
        m = head.shape[0]
        grid, block = launch_shape(-(-m // WARP))
        self._untyped_function("se_plan_segments")(
            grid, block, (head, pos, sorted_ids, np.int64(m), starts, rows))

    def row_pointer(self, rows, num_rows, dim, indptr):
        """``indptr`` ((num_rows + 1,), int32 or int64) = ``dim`` x the number of the
        sorted distinct int64 ``rows`` below each row."""
        grid, block = launch_shape(-(-(int(num_rows) + 1) // WARP))
        self._untyped_function("se_row_pointer", indptr.dtype)(
            grid, block, (rows, np.int64(rows.shape[0]), np.int64(num_rows), np.int64(dim),
                          indptr))

    def bag_starts(self, offsets, n, include_last, starts, result):
        """``starts`` from int64 ``offsets`` (k >= 1); ``result`` (3,) int64, zeroed."""
        k = offsets.shape[0]
        grid, block = launch_shape(-(-k // WARP))
        self._untyped_function("se_bag_starts")(
            grid, block, (offsets, np.int64(k), np.int64(n), np.int32(include_last), starts,
                          result))

    def renorm(self, weight, rows, max_norm, p, kind):
        n_rows = rows.shape[0]
        grid, block = launch_shape(n_rows)
        self._function("se_renorm", weight.dtype)(
            grid, block, (weight, rows, np.int64(n_rows), np.int64(weight.shape[1]),
                          np.float64(max_norm), np.float64(p), np.int32(kind)))

    def segment_sum(self, grad, perm, starts, rows, dense, scale_by_count, out):
        n_rows = rows.shape[0]
        grid, block = launch_shape(n_rows)
        self._function("se_segment_sum", grad.dtype)(
            grid, block, (grad, perm, starts, rows, np.int32(dense), np.int64(n_rows),
                          np.int64(grad.shape[1]), np.int32(scale_by_count), out))

    def add_rows(self, a, src_a, b, src_b, out):
        """``out`` (n_rows, dim) = rows ``src_a`` of ``a`` plus rows ``src_b`` of ``b``
        (-1: no term), one dtype."""
        n_rows = out.shape[0]
        grid, block = launch_shape(n_rows)
        self._function("se_add_rows", out.dtype)(
            grid, block, (a, src_a, b, src_b, np.int64(n_rows), np.int64(out.shape[1]), out))

    def bag_forward(self, weight, idx, starts, pad, mode, psw, out, argmax, counts, bad):
        """``bad``: (1,) int64, zeroed; flagged for ids outside the table (se_flag_bad)."""
        n_bags = starts.shape[0] - 1
        grid, block = launch_shape(n_bags)
        has_psw = psw is not None
        psw = psw if has_psw else self._dummy(weight.dtype)
        argmax = argmax if argmax is not None else self._dummy(np.int64)
        self._function("se_bag_forward", weight.dtype, idx.dtype)(
            grid, block, (weight, idx, starts, np.int64(pad), np.int32(mode), psw,
                          np.int32(has_psw), np.int64(n_bags), np.int64(weight.shape[1]),
                          out, argmax, counts, np.int64(idx.shape[0]), np.int64(weight.shape[0]),
                          bad))

    def psw_grad(self, grad, weight, idx, entry_bag, pad, out):
        m = entry_bag.shape[0]
        grid, block = launch_shape(m)
        self._function("se_psw_grad", weight.dtype, idx.dtype)(
            grid, block, (grad, weight, idx, entry_bag, np.int64(pad), np.int64(m),
                          np.int64(weight.shape[1]), out))

    def bag_segment_sum(self, grad, perm, starts, rows, dense, entry_bag, scale, argmax,
                        scale_by_count, out):
        n_rows = rows.shape[0]
        grid, block = launch_shape(n_rows)
        has_scale, has_argmax = scale is not None, argmax is not None
        self._function("se_bag_segment_sum", grad.dtype)(
            grid, block, (grad, perm, starts, rows, np.int32(dense), entry_bag,
                          scale if has_scale else self._dummy(grad.dtype), np.int32(has_scale),
                          argmax if has_argmax else self._dummy(np.int64), np.int32(has_argmax),
                          np.int64(n_rows), np.int64(grad.shape[1]), np.int32(scale_by_count),
                          out))

    def _dummy(self, dtype):
        """A one-element array standing for an absent optional pointer argument."""
        dtype = np.dtype(dtype)
        if dtype not in self._dummies:
            self._dummies[dtype] = self._cp.zeros(1, dtype=dtype)
        return self._dummies[dtype]

    def update_rows(self, kind, hyper, weight, rows, values, s1, s2):
        """``rows`` None: every row (values has the table's shape); s1/s2 None: absent."""
        n_rows = values.shape[0]
        grid, block = launch_shape(n_rows)
        all_rows = rows is None
        hyper = tuple(hyper) + (0.0,) * (N_HYPER - len(hyper))
        self._function("se_update_rows", weight.dtype)(
            grid, block,
            (np.int32(kind), *(np.float64(h) for h in hyper), weight,
             self._dummy(np.int64) if all_rows else rows, np.int32(all_rows), values,
             self._dummy(weight.dtype) if s1 is None else s1, np.int32(s1 is not None),
             self._dummy(weight.dtype) if s2 is None else s2,
             np.int64(n_rows), np.int64(weight.shape[1])))
