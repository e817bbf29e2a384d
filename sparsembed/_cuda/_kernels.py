"""CUDA kernels of the GPU backend (CuPy ``RawModule``) and their launchers.

One source, compiled (lazily, once per table dtype ``T`` and id dtype ``I``) by NVRTC
through CuPy; CuPy caches the binaries on disk. Every kernel gives one warp (32
lanes striding over the columns) to one item (a looked-up row, a table row, a
segment of the row plan) and loops grid-stride over the items, so any size fits the
grid limits. Launch shape: :func:`sparsembed._cuda._ops.launch_shape`.

Determinism: no atomics. Reductions over a table row's occurrences go through the
row plan (ids sorted once, one segment per distinct row); each lane sums its column
over the segment in input order, exactly as the CPU kernels do, so the gradients are
bitwise equal to the CPU backend's. The renorm's norm is a fixed-shape warp
reduction (deterministic; equal to the CPU's up to rounding).

Scalar arguments are passed as numpy scalars of the exact C type (``np.int64`` for
``i64``, ``np.float64`` for ``double``, ``np.int32`` for ``int``).
"""

import numpy as np

from sparsembed._cuda._ops import launch_shape

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

__device__ __forceinline__ double se_warp_max(double v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double se_warp_min(double v) {
    for (int o = 16; o > 0; o >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// out[i, :] = weight[idx[i], :]
extern "C" __global__ void se_gather(const T* __restrict__ weight,
                                     const I* __restrict__ idx,
                                     T* __restrict__ out,
                                     const i64 n,
                                     const i64 dim) {
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 i = (i64)blockIdx.x * blockDim.y + threadIdx.y; i < n; i += step) {
        const T* src = weight + (i64)idx[i] * dim;
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
                case 2: acc = fmax(acc, fabs(a)); break;
                case 3: acc = fmin(acc, fabs(a)); break;
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
extern "C" __global__ void se_segment_sum(const T* __restrict__ grad,
                                          const i64* __restrict__ perm,
                                          const i64* __restrict__ starts,
                                          const i64* __restrict__ rows,
                                          const int dense,
                                          const i64 n_rows,
                                          const i64 dim,
                                          const int scale_by_count,
                                          T* __restrict__ out) {
    const i64 step = (i64)gridDim.x * blockDim.y;
    for (i64 u = (i64)blockIdx.x * blockDim.y + threadIdx.y; u < n_rows; u += step) {
        const i64 lo = starts[u];
        const i64 hi = starts[u + 1];
        T* dst = out + (dense ? rows[u] : u) * dim;
        for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {
            T acc = grad[perm[lo] * dim + j];
            for (i64 k = lo + 1; k < hi; ++k) acc += grad[perm[k] * dim + j];
            if (scale_by_count && hi - lo > 1) acc /= (T)(hi - lo);
            dst[j] = acc;
        }
    }
}
"""


def module_source(t_dtype, i_dtype):
    """The source compiled for table dtype ``t_dtype`` and id dtype ``i_dtype``."""
    return (f"typedef {C_TYPES[np.dtype(t_dtype)]} T;\n"
            f"typedef {C_TYPES[np.dtype(i_dtype)]} I;\n" + SOURCE)


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

    def _function(self, name, t_dtype, i_dtype=np.int64):
        key = (np.dtype(t_dtype), np.dtype(i_dtype))
        module = self._modules.get(key)
        if module is None:
            module = self._modules[key] = self._cp.RawModule(code=module_source(*key))
        return module.get_function(name)

    def gather(self, weight, idx, out):
        n, dim = out.shape
        grid, block = launch_shape(n)
        self._function("se_gather", weight.dtype, idx.dtype)(
            grid, block, (weight, idx, out, np.int64(n), np.int64(dim)))

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
