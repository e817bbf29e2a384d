"""The CUDA backend (CuPy): the functions of ``sparsembed._cpu``, same signatures.

Imported only by :func:`sparsembed._cuda.load_backend`, after CuPy and a device were
found. Weights, gradients and plans are CuPy arrays; sparse gradients are canonical
``cupyx.scipy.sparse.csr_matrix`` (sorted distinct rows, each a full row). Index
arrays may come as numpy (validated on the host, moved once) or CuPy (validated on
the device); every check runs before anything is written.

The logic lives in :class:`sparsembed._cuda._ops.ArrayBackend` (written against an
array module, so it is tested with numpy standing in on machines without a GPU);
the kernels in :mod:`sparsembed._cuda._kernels`.
"""

import cupy
import cupyx.scipy.sparse

from sparsembed._cuda import _kernels, _ops

xp = cupy
name = "cuda"
RowPlan = _ops.RowPlan

_impl = _ops.ArrayBackend(cupy, _kernels.CudaKernels(cupy), cupyx.scipy.sparse.csr_matrix,
                          name=name)

asarray = _impl.asarray
to_numpy = _impl.to_numpy
from_host = _impl.from_host
plan_rows = _impl.plan_rows
gather = _impl.gather
gather_and_plan = _impl.gather_and_plan
renorm_rows_ = _impl.renorm_rows_
dense_grad = _impl.dense_grad
dense_grad_of_ids = _impl.dense_grad_of_ids
dense_grad_plans = _impl.dense_grad_plans
row_grad = _impl.row_grad
sparse_grad = _impl.sparse_grad
add_grad = _impl.add_grad
zero_grad_ = _impl.zero_grad_
as_index_array = _impl.as_index_array
check_index_range = _impl.check_index_range
check_weight = _impl.check_weight
check_writable = _impl.check_writable
as_grad_output = _impl.as_grad_output

# EmbeddingBag
bag_starts = _impl.bag_starts
bag_forward = _impl.bag_forward
bag_counts = _impl.bag_counts
entry_bags = _impl.entry_bags
mean_scale = _impl.mean_scale
per_sample_weights_grad = _impl.per_sample_weights_grad
bag_row_grad = _impl.bag_row_grad
bag_dense_grad = _impl.bag_dense_grad
bag_max_dense_grad = _impl.bag_max_dense_grad
bag_sparse_grad = _impl.bag_sparse_grad

# optimizers
optim_grad = _impl.optim_grad
optim_update_rows = _impl.optim_update_rows
optim_fused_update = _impl.optim_fused_update
