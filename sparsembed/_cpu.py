"""The CPU backend: each operation on already-validated arrays, calling the kernels.

The CuPy backend (``sparsembed._cuda``) offers the same functions with the same
signatures; :func:`sparsembed._backend.get_backend` picks one from the device.
"""

import numpy as np

from sparsembed import _aligned, _half, _rowsparse
from sparsembed._rowsparse import ROW_SUMS_STREAM_BYTES, STREAM_BYTES
from sparsembed._rowplan import RowPlan
from sparsembed._kernels import _backward, _bag, _lookup, _plan, _pool
from sparsembed._threads import (  # noqa: F401
    PARALLEL_GRAIN,
    ROW_GATHER_GRAIN,
    ROW_MOVE_GRAIN,
    get_num_threads,
    threads_for,
    threads_for_rows_read,
    workers_spin,
)
from sparsembed._validation import (  # noqa: F401 - part of the backend interface
    as_grad_output,
    as_index_array,
    check_index_range,
    check_weight,
    check_writable,
)
from sparsembed._validation import index_error as _index_error

xp = np
name = "cpu"


def asarray(a, dtype=None):
    return np.asarray(a, dtype=dtype)


def to_numpy(a):
    return np.asarray(a)


PLAN_GRAIN = 1 << 16
# With workers that spin (see workers_spin) and more rows than ids -- the radix
# plan on any number of threads -- a second thread pays from 65,536 ids on (V =
# 1e6, 1 vs 2 threads, back to back / with 20 ms of other work between calls:
# 65,536 ids 164 vs 104 / 172 vs 155 us; 32,768 ids 84 vs 57 but 107 vs 139,
# 16,384 ids 46 vs 46). With fewer rows than ids one thread counts instead of
# sorting, and two pay only from 2**17 ids (below).
PLAN_RADIX_GRAIN = 1 << 15 if workers_spin() else PLAN_GRAIN


def plan_rows(flat, num_rows, skip_row=None, check_range=False):
    """Sort the ids ``flat`` into a :class:`RowPlan`.

    ``check_range``: ``flat`` has not been range-checked yet. The plan of ids and
    positions that fit in 32 bits checks each id while it counts them (one pass over
    the ids instead of two) and IndexError names the first bad one; such ids are
    checked even when the caller says they need not be.
    """
    n = flat.shape[0]
    upper = int(num_rows)
    num_rows = max(upper, 1)
    fits_32_bits = num_rows <= 1 << 32 and n < 1 << 32
    # the 32-bit plan checks the ids as it counts them, but not against 0 rows (it
    # sorts for 1); the 64-bit one does not check them
    if check_range and (upper == 0 or not fits_32_bits):
        check_index_range(flat, upper)
    skip = -1 if skip_row is None else int(skip_row)
    # a second thread pays for its wake-up only from about 2**17 ids on (passive
    # waiting; measured, V = 1e6, radix path, one parallel region: 65,536 ids
    # 0.38-0.59 ms on 1 thread vs 0.45-0.57 on 2, 131,072 ids 0.9-1.3 vs 0.7-0.9,
    # 262,144 ids 1.9-2.6 vs 1.2-1.7)
    T = threads_for(n, PLAN_RADIX_GRAIN if num_rows > n else PLAN_GRAIN)
    if fits_32_bits:
        perm = _pool.empty((n,), np.int64)
        rows = _pool.empty((n,), np.int64)
        starts = _pool.empty((n + 1,), np.int64)
        scratch = None
        if num_rows > 4096:
            scratch = _pool.empty((_plan.plan_scratch_size(n, num_rows, T),), np.uint64)
        m, n_rows = _plan.build_plan(flat, skip, num_rows, perm, rows, starts, T, scratch)
        del scratch
        if m < 0:
            raise _index_error(flat, _lookup.first_out_of_range(flat, num_rows, T), num_rows)
        return RowPlan(perm[:m], rows[:n_rows], starts[: n_rows + 1], m < n, n)
    keys = np.empty(n, dtype=np.int64)
    perm = np.empty(n, dtype=np.int64)
    m = _plan.argsort_rows(flat, skip, num_rows, keys, perm, T)
    rows = np.empty(m, dtype=np.int64)
    starts = np.empty(m + 1, dtype=np.int64)
    n_rows = _plan.segments(keys[:m], rows, starts)
    return RowPlan(perm[:m], rows[:n_rows], starts[: n_rows + 1], m < n, n)


def gather(weight, flat, check_range=False, ids_out=None):
    """``weight[flat]`` as a new (n, dim) array.

    ``check_range``: ``flat`` has not been range-checked yet; the copy kernel checks
    each id before reading its row (no separate pass) and IndexError names the first
    bad one. Only the new output (and ``ids_out``) can have been written by then.
    ``ids_out``: an array like ``flat`` that also receives a copy of it.
    """
    half = _half.is_half(weight)
    if half and not (weight.flags.c_contiguous and weight.shape[1] % 2 == 0):
        if check_range:
            check_index_range(flat, weight.shape[0])
        if ids_out is not None:
            np.copyto(ids_out, flat)
        return _half.gather(weight, flat)
    out = _pool.empty((flat.shape[0], weight.shape[1]), weight.dtype)
    # the copy only moves bytes: an even row of float16 is a row of float32 pairs
    src, dst = (weight.view(np.float32), out.view(np.float32)) if half else (weight, out)
    bad = _lookup.gather(src, flat, dst, threads_for_rows_read(dst.nbytes, writes_rows=True),
                         out.nbytes >= STREAM_BYTES, ids_out)
    if bad >= 0:
        raise _index_error(flat, bad, weight.shape[0])
    return out


# The lookup plans its ids on the side (gather_and_plan) from this many ids on: below
# it a plan and a lookup each take a few tens of microseconds, the span of a worker's
# wake-up on a virtual machine, and nothing is left to hide one behind the other.
PLAN_AHEAD_MIN_IDS = 1 << 16


def gather_and_plan(weight, flat, num_rows, skip_row=None, ids_out=None):
    """``(weight[flat], plan)``, the ids range-checked, with the plan (as
    :func:`plan_rows` of ``flat``, ``num_rows`` and ``skip_row``) made on the side by
    one thread of the lookup's team (``_plan.gather_and_plan``), or None where that
    would not pay: one thread, a small batch, fewer rows than ids (the counting plan,
    cheap after the lookup), the float16 layouts that cannot be copied as float32.
    Then the caller plans later, when it needs the plan."""
    n = flat.shape[0]
    half = _half.is_half(weight)
    dim = weight.shape[1]
    T = threads_for_rows_read(n * dim * weight.itemsize, writes_rows=True)
    if (T < 2 or n < PLAN_AHEAD_MIN_IDS or dim == 0 or num_rows <= max(n, 4096)
            or num_rows > 1 << 32 or n >= 1 << 32
            or (half and not (weight.flags.c_contiguous and dim % 2 == 0))):
        return gather(weight, flat, check_range=True, ids_out=ids_out), None
    out = _pool.empty((n, dim), weight.dtype)
    src, dst = (weight.view(np.float32), out.view(np.float32)) if half else (weight, out)
    perm = _pool.empty((n,), np.int64)
    rows = _pool.empty((n,), np.int64)
    starts = _pool.empty((n + 1,), np.int64)
    scratch = _pool.empty((_plan.plan_scratch_size(n, num_rows, 1),), np.uint64)
    skip = -1 if skip_row is None else int(skip_row)
    bad, m, n_rows = _plan.gather_and_plan(src, flat, dst, out.nbytes >= STREAM_BYTES,
                                           ids_out, skip, perm, rows, starts, scratch, T)
    del scratch
    if bad >= 0:
        raise _index_error(flat, bad, weight.shape[0])
    if m < 0:  # the plan saw an id out of range that the lookup did not: never so
        return out, plan_rows(flat, num_rows, skip_row, check_range=True)
    return out, RowPlan(perm[:m], rows[:n_rows], starts[: n_rows + 1], m < n, n)


def renorm_rows_(weight, rows, max_norm, norm_type):
    """Rescale, in place, the distinct ``rows`` whose norm exceeds ``max_norm``."""
    if _half.is_half(weight):
        return _half.renorm_rows_(weight, rows, max_norm, norm_type)
    _lookup.renorm_rows(weight, rows, max_norm, norm_type,
                        threads_for(rows.shape[0] * weight.shape[1]))


def dense_grad(grad2d, plan, num_rows, scale_grad_by_freq):
    """Dense (num_rows, dim) gradient: each planned row gets its sum of grad rows."""
    # every row is written (zeros where no id points), so reused memory needs no
    # zero-fill first and a fresh block is faulted in by the threads in parallel
    out = _pool.empty((num_rows, grad2d.shape[1]), grad2d.dtype)
    _backward.dense_backward_fill(grad2d, plan.perm, plan.rows, plan.starts,
                                  scale_grad_by_freq, out,
                                  threads_for(grad2d.size + out.size // 8),
                                  out.nbytes >= STREAM_BYTES)
    return out


# The dense backward without a plan (_backward.dense_backward_scatter), where it
# pays: a streamed output of whole-line rows up to SCATTER_MAX_ROW_BYTES, on up to
# SCATTER_MAX_THREADS threads (each thread reads every id; measured on 2). Intel
# Xeon VM, V = 1e6, 262,144 ids, 2 threads, the planned kernel alongside in one
# process: 256-byte rows (D = 64) uniform 13.0 -> 11.5 ms, Zipf 12.0 -> 11.7; 1 KiB
# rows (D = 256) uniform 40.0 -> 38.3 but Zipf 41.6 -> 44.4 (a row a few ids share
# is read back right after its first row was streamed out): such rows keep the plan.
SCATTER_MAX_THREADS = 2
SCATTER_MAX_ROW_BYTES = 256


def _scatter_threads(grad2d, num_rows, scale_grad_by_freq):
    """The threads :func:`dense_grad_of_ids` runs the scatter kernel on, or 0 where it
    plans instead."""
    dim = grad2d.shape[1]
    row_bytes = dim * grad2d.dtype.itemsize
    T = threads_for(grad2d.size + num_rows * dim // 8)
    if (not scale_grad_by_freq and T <= SCATTER_MAX_THREADS and row_bytes % 64 == 0
            and 0 < row_bytes <= SCATTER_MAX_ROW_BYTES and num_rows * row_bytes >= STREAM_BYTES):
        return T
    return 0


def dense_grad_plans(grad2d, num_rows, scale_grad_by_freq):
    """Whether :func:`dense_grad_of_ids` of ``grad2d`` makes a row plan (then a caller
    that holds one had better call :func:`dense_grad` with it)."""
    return _scatter_threads(grad2d, num_rows, scale_grad_by_freq) == 0


def dense_grad_of_ids(grad2d, flat, num_rows, skip_row, scale_grad_by_freq):
    """Dense (num_rows, dim) gradient of the ids ``flat`` (not range-checked yet), the
    row ``skip_row`` (or None) left at zero: :func:`dense_grad` of their plan, or
    without one where the scatter kernel pays (rows of one to four whole lines, a
    streamed output, a few threads, no scaling by counts). The same bits either way."""
    T = _scatter_threads(grad2d, num_rows, scale_grad_by_freq)
    if T:
        dim = grad2d.shape[1]
        out = _pool.empty((num_rows, dim), grad2d.dtype)
        if out.ctypes.data % 64:  # the pool's blocks are line-aligned, numpy's need not be
            out = _aligned.empty((num_rows, dim), grad2d.dtype)
        bad = _backward.dense_backward_scatter(grad2d, flat, -1 if skip_row is None else skip_row,
                                               out, T)
        if bad >= 0:
            raise _index_error(flat, bad, num_rows)
        return out
    plan = plan_rows(flat, num_rows, skip_row, check_range=True)
    return dense_grad(grad2d, plan, num_rows, scale_grad_by_freq)


def row_grad(grad2d, plan, scale_grad_by_freq):
    """(n_rows, dim) per-row sums, one per distinct planned id, in ``plan.rows`` order."""
    out = _pool.empty((plan.rows.shape[0], grad2d.shape[1]), grad2d.dtype)
    # summing is moving rows (one add each): a second thread only from 2^20 elements
    # (measured, D = 64: 4,096 ids 0.15 -> 0.06 ms on one thread, 8,192 level,
    # 16,384 0.40 vs 0.28 ms on two)
    _backward.row_sums(grad2d, plan.perm, plan.starts, scale_grad_by_freq, out,
                       threads_for(grad2d.size, ROW_MOVE_GRAIN),
                       out.nbytes >= ROW_SUMS_STREAM_BYTES)
    return out


# grad_output of at most this size stays in cache while its rows are summed (an
# EmbeddingBag's: one row per bag), so each entry costs a cached read and a second
# thread pays only from 4x ROW_MOVE_GRAIN. Measured, V = 1e6, D = 64, bags of 32,
# sparse backward, a new batch each call, 1 vs 2 threads (us): passive waiting
# 16,384 ids 454 vs 751, 32,768 762 vs 931, 65,536 1,478 vs 1,415; spinning workers
# 4,096 ids 101 vs 132, 16,384 413 vs 339 (the Embedding's own 4 MB grad_output,
# passive, 16,384 ids: 592 vs 418, as ROW_MOVE_GRAIN has it).
CACHED_GRAD_BYTES = 1 << 20


def _row_sums_threads(grad2d, n_entries):
    """Threads for summing ``n_entries`` rows of ``grad2d`` into row sums."""
    grain = ROW_MOVE_GRAIN * (4 if grad2d.nbytes <= CACHED_GRAD_BYTES else 1)
    return threads_for(n_entries * grad2d.shape[1], grain)


def sparse_grad(grad2d, plan, num_rows, scale_grad_by_freq):
    """Canonical row-sparse csr_array gradient of shape (num_rows, dim)."""
    return _sparse_grad_of(grad2d, plan.perm, None, plan, num_rows, scale_grad_by_freq)


def _sparse_grad_of(grad2d, grad_rows, weights, plan, num_rows, scale_grad_by_freq):
    """:func:`sparse_grad` where plan entry ``k`` reads grad row ``grad_rows[k]``, times
    ``weights[k]`` unless None (a bag batch: see :func:`_plan_in_bags`)."""
    n_rows, dim = plan.rows.shape[0], grad2d.shape[1]
    out = _pool.empty((n_rows, dim), grad2d.dtype)
    T = _row_sums_threads(grad2d, grad_rows.shape[0])
    indices = _rowsparse.deferrable_indices(n_rows, dim, num_rows)
    if indices is not None:  # the O(num_rows) row pointer waits for a reader
        _backward.row_sums(grad2d, grad_rows, plan.starts, scale_grad_by_freq, out, T,
                           out.nbytes >= ROW_SUMS_STREAM_BYTES, weights=weights)
        return _rowsparse.with_deferred_pointer(plan.rows, out, indices, num_rows)
    indptr, indices, to_fill = _rowsparse.structure_arrays(n_rows, dim, num_rows)
    # the row sums and the csr structure in one parallel region: one wake-up of the
    # second thread, not two
    T = max(T, threads_for(_rowsparse.csr_work(num_rows, to_fill), _rowsparse.CSR_FILL_GRAIN))
    _backward.sparse_row_grad(grad2d, grad_rows, plan.starts, plan.rows, scale_grad_by_freq,
                              out, num_rows, indptr, to_fill, T,
                              out.nbytes >= ROW_SUMS_STREAM_BYTES,
                              _rowsparse.stream_indices(to_fill), weights=weights)
    return _rowsparse.wrap_rows(plan.rows, out, indptr, indices, num_rows)


def add_grad(a, b):
    """``a + b`` for two gradients of the same kind (dense ndarray or row-sparse csr)."""
    if isinstance(a, np.ndarray):
        if isinstance(b, np.ndarray):
            if (a.dtype == b.dtype and a.dtype in (np.float32, np.float64)
                    and a.shape == b.shape and a.flags.c_contiguous and b.flags.c_contiguous):
                # on every thread, into the output cache: numpy's a + b of two (1e6, 64)
                # float32 gradients, one thread and a new array's page faults, took
                # 80 ms (a layer's forward and dense backward: 20), this 23-26
                out = _pool.empty(a.shape, a.dtype)
                _backward.add_dense(a.reshape(-1), b.reshape(-1), out.reshape(-1),
                                    threads_for(3 * a.size), out.nbytes >= STREAM_BYTES)
                return out
            return a + b
        a = a.copy()
        rows, vals = _rowsparse.row_values(b)
        a[rows] += vals
        return a
    if isinstance(b, np.ndarray):
        return add_grad(b, a)
    return _rowsparse.add(a, b)


def zero_grad_(grad):
    """Zero the dense gradient ``grad`` in place; on every thread where it is a
    contiguous float array (numpy's fill of a (1e6, 64) float32 one: 35 ms on one
    thread, torch's zero_() 17; this, streamed, ~6)."""
    if grad.dtype in (np.float32, np.float64) and grad.flags.c_contiguous:
        _backward.zero_fill(grad.reshape(-1), threads_for(grad.size),
                            grad.nbytes >= STREAM_BYTES)
    else:
        grad[...] = 0


# ---------------------------------------------------------------- EmbeddingBag

_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


def _no_scale(dtype):
    return np.empty(0, dtype=dtype)


_NO_ARGMAX = np.empty((0, 0), dtype=np.int64)


def bag_forward(weight, flat, starts, mode, padding_idx, per_sample_weights=None, plan=None,
                check_range=False):
    """Pool the validated bags; returns (out, argmax or None, counts).

    ``starts`` (n_bags + 1, int64) bounds the bags in ``flat``; ``argmax`` (max mode)
    holds, per bag and column, the position in ``flat`` of the winning entry (-1 for
    an empty bag); ``counts`` the non-padding entries per bag. A float16 table is
    pooled in float32 (``plan``: the plan of ``flat[:starts[-1]]``, padding skipped,
    reused when given; see ``sparsembed._half``).

    ``check_range``: ``flat`` has not been range-checked yet; the pooling kernel
    checks each id before reading its row (one pass over the ids instead of two, and
    one parallel region instead of two), and IndexError names the first bad one.
    Only the freshly allocated outputs can have been written by then.
    """
    num_rows = weight.shape[0]
    end = int(starts[-1])
    n_bags = starts.shape[0] - 1
    dim = weight.shape[1]
    half = _half.is_half(weight)
    if check_range and (dim == 0 or (half and not _half.pools_rows(weight, mode))):
        check_index_range(flat, num_rows)  # these paths read no row through a kernel
        check_range = False
    # sum and mean move rows (ROW_GATHER_GRAIN counts their bytes); max mode and the
    # float16 kernels compare or convert every element: their work counts elements
    if half or mode == "max":
        T = threads_for(flat.shape[0] * dim, ROW_MOVE_GRAIN)
    else:
        T = threads_for_rows_read(flat.shape[0] * dim * weight.itemsize)
    if half:
        out, argmax, counts = _half.bag_forward(weight, flat, starts, mode, padding_idx,
                                                per_sample_weights, plan, T)
        n_bad = check_range and n_bags > 0 and counts.min() < 0
    else:
        out = _pool.empty((n_bags, dim), weight.dtype)
        counts = np.empty(n_bags, dtype=np.int64)
        argmax = np.empty((n_bags, dim), dtype=np.int64) if mode == "max" else _NO_ARGMAX
        psw = _no_scale(weight.dtype) if per_sample_weights is None else per_sample_weights
        pad = -1 if padding_idx is None else int(padding_idx)
        if n_bags > 0 and dim == 0:
            counts[:] = 0
        n_bad = _bag.bag_forward(weight, flat, starts, pad, _BAG_MODES[mode], psw, out, argmax,
                                 counts, T, out.nbytes >= STREAM_BYTES)
        argmax = argmax if mode == "max" else None
    if n_bad:
        bag = int(np.flatnonzero(counts < 0)[0])
        raise _index_error(flat, int(-counts[bag] - 1), num_rows)
    if check_range and end < flat.shape[0]:  # entries past the last bag, never read
        pos = _lookup.first_out_of_range(flat[end:], num_rows, threads_for(flat.shape[0] - end))
        if pos >= 0:
            raise _index_error(flat, end + pos, num_rows)
    return out, argmax, counts


def bag_starts(offsets, n, include_last_offset):
    """Bag starts from ``offsets`` (1-D int32/int64, at least one entry) over an input
    of ``n`` entries, unchecked: ``(starts, pos, first, last)``. ``starts`` (int64)
    holds the offsets, then ``n`` unless ``include_last_offset``; ``pos`` is the first
    position where the offsets decrease (-1: never); ``first`` and ``last`` are the
    first and last offsets (the caller checks them)."""
    k = offsets.shape[0]
    starts = np.empty(k if include_last_offset else k + 1, dtype=np.int64)
    if not include_last_offset:
        starts[k] = n
    pos = _bag.offsets_to_starts(offsets, starts)
    return starts, pos, int(offsets[0]), int(offsets[k - 1])


def bag_counts(flat, starts, padding_idx):
    """Non-padding entries of each bag, (n_bags,) int64."""
    counts = np.empty(starts.shape[0] - 1, dtype=np.int64)
    _bag.bag_counts(flat, starts, -1 if padding_idx is None else int(padding_idx), counts,
                    threads_for(flat.shape[0]))
    return counts


def entry_bags(starts):
    """Bag of each entry ``0 .. starts[-1] - 1``, (starts[-1],) int64."""
    out = np.empty(int(starts[-1]), dtype=np.int64)
    _bag.fill_entry_bag(starts, out, threads_for(out.shape[0]))
    return out


def mean_scale(counts, entry_bag, dtype):
    """Per-entry factor ``1 / count`` of the entry's bag (mean mode)."""
    inv = 1.0 / np.maximum(counts, 1)
    return np.ascontiguousarray(inv[entry_bag], dtype=dtype)


def per_sample_weights_grad(grad2d, weight, flat, entry_bag, padding_idx, plan=None):
    """(n,) ``dot(grad2d[bag], weight[id])`` per entry; 0 for padding and unbagged entries.
    ``plan`` only serves a float16 table, as for :func:`bag_forward`."""
    if _half.is_half(weight):
        return _half.per_sample_weights_grad(grad2d, weight, flat, entry_bag, padding_idx, plan)
    out = np.zeros(flat.shape[0], dtype=grad2d.dtype)
    _bag.per_sample_weights_grad(grad2d, weight, flat, entry_bag,
                                 -1 if padding_idx is None else int(padding_idx), out,
                                 threads_for(flat.shape[0] * grad2d.shape[1]))
    return out


def _plan_in_bags(plan, entry_bag, scale, dtype):
    """(bag of each plan entry, its factor or None): sum and mean bags then sum through
    the backward's SIMD row sums (``_backward``), whose ids are grad rows."""
    m = plan.perm.shape[0]
    bag_of = _pool.empty((m,), np.int64)
    scale_of = _pool.empty((m,), dtype) if scale is not None else _no_scale(dtype)
    _bag.entry_grad_rows(plan.perm, entry_bag, _no_scale(dtype) if scale is None else scale,
                         bag_of, scale_of, threads_for(m))
    return bag_of, (scale_of if scale is not None else None)


def bag_row_grad(grad2d, plan, entry_bag, scale, argmax, scale_grad_by_freq):
    """(n_rows, dim) per-row sums of ``grad2d[entry_bag[e]] * scale[e]`` over each planned
    row's entries (in max mode only the columns the entry won), in ``plan.rows`` order."""
    out = _pool.empty((plan.rows.shape[0], grad2d.shape[1]), grad2d.dtype)
    T = threads_for(plan.perm.shape[0] * grad2d.shape[1])
    if argmax is None:
        bag_of, scale_of = _plan_in_bags(plan, entry_bag, scale, grad2d.dtype)
        _backward.row_sums(grad2d, bag_of, plan.starts, scale_grad_by_freq, out, T,
                           out.nbytes >= ROW_SUMS_STREAM_BYTES, weights=scale_of)
        return out
    _bag.bag_row_sums(grad2d, plan.perm, plan.starts, entry_bag,
                      _no_scale(grad2d.dtype) if scale is None else scale,
                      _won_masks(argmax, entry_bag), scale_grad_by_freq, out, T)
    return out


def bag_dense_grad(grad2d, plan, entry_bag, scale, argmax, num_rows, scale_grad_by_freq):
    """Dense (num_rows, dim) gradient of a bag forward."""
    # every row is written (zeros where no id points), as for dense_grad
    out = _pool.empty((num_rows, grad2d.shape[1]), grad2d.dtype)
    T = threads_for(plan.perm.shape[0] * grad2d.shape[1] + out.size // 8)
    stream = out.nbytes >= STREAM_BYTES
    if argmax is None:
        bag_of, scale_of = _plan_in_bags(plan, entry_bag, scale, grad2d.dtype)
        _backward.dense_backward_fill(grad2d, bag_of, plan.rows, plan.starts,
                                      scale_grad_by_freq, out, T, stream, weights=scale_of)
        return out
    _bag.bag_dense_backward(grad2d, plan.perm, plan.rows, plan.starts, entry_bag,
                            _no_scale(grad2d.dtype) if scale is None else scale,
                            _won_masks(argmax, entry_bag), scale_grad_by_freq, out, T, stream)
    return out


def bag_max_dense_grad(grad2d, argmax, flat, plan, entry_bag, num_rows):
    """Max mode's dense (num_rows, dim) gradient straight from the winners, without
    a plan of the entries (``_bag.bag_max_dense_backward``: the bits of
    :func:`bag_dense_grad`'s planned sums). ``plan`` and ``entry_bag`` serve the CUDA
    backend, which sums the planned rows; here they are not read (None will do)."""
    out = _pool.empty((num_rows, grad2d.shape[1]), grad2d.dtype)
    T = threads_for(argmax.size + out.size // 8)
    n_bad = _bag.bag_max_dense_backward(grad2d, argmax, flat, out, T,
                                        out.nbytes >= STREAM_BYTES)
    if n_bad:  # the forward's winners always name bagged, checked entries
        raise RuntimeError(f"{n_bad} max-mode winners lie outside the bags or the table")
    return out


def bag_sparse_grad(grad2d, plan, entry_bag, scale, argmax, num_rows, scale_grad_by_freq):
    """Canonical row-sparse csr_array gradient of a bag forward."""
    if argmax is not None:
        values = bag_row_grad(grad2d, plan, entry_bag, scale, argmax, scale_grad_by_freq)
        return _rowsparse.from_rows(plan.rows, values, num_rows)
    bag_of, scale_of = _plan_in_bags(plan, entry_bag, scale, grad2d.dtype)
    return _sparse_grad_of(grad2d, bag_of, scale_of, plan, num_rows, scale_grad_by_freq)


_NO_WON = np.empty((0, 0), dtype=np.uint64)


def _won_masks(argmax, entry_bag):
    """Max mode's (n, (dim + 63) // 64) uint64 masks of the columns each entry won
    (``_bag.won_masks``), or an empty (0, 0) array without ``argmax``."""
    if argmax is None or argmax.size == 0:
        return _NO_WON
    won = _pool.empty((entry_bag.shape[0], (argmax.shape[1] + 63) // 64), np.uint64)
    _bag.won_masks(argmax, entry_bag, won, threads_for(argmax.size))
    return won


# ---------------------------------------------------------------- optimizers
# (se.optim's kernel calls; the CUDA backend has the same three functions)

def optim_grad(grad, weight):
    """A layer's gradient as (rows or None, values) in the table's compute dtype: a
    row-sparse matrix gives its stored rows and their values, a dense array (None, the
    array)."""
    from sparsembed.optim import Optimizer

    return Optimizer._prepare_host_grad(grad, weight)


def _state(s, weight):
    return np.empty((0, 1), dtype=_half.compute_dtype(weight.dtype)) if s is None else s


def optim_update_rows(kind, hyper, weight, rows, values, s1, s2):
    """One optimizer update (``_optim.update_rows``, through ``_half`` for float16
    tables) of the rows of a built gradient (``rows`` None: every row); ``hyper`` the
    kernel's doubles; s1/s2 None or (0, *) when absent."""
    all_rows = rows is None
    s1, s2 = _state(s1, weight), _state(s2, weight)
    _half.update_rows(kind, *hyper, weight, np.empty(0, np.int64) if all_rows else rows,
                      all_rows, values, s1, s2,
                      threads_for(_update_work(values.shape[0], weight.shape[1], s1, s2),
                                  OPTIM_GRAIN))


def _update_work(n_rows, dim, s1, s2):
    """Elements an update of ``n_rows`` rows reads and writes: the weight and grad
    rows, and the state rows (none, one per element, or one per row for the row-wise
    kinds)."""
    return n_rows * (2 * dim + sum(s.shape[1] for s in (s1, s2) if s.shape[0]))


# Each optimizer update runs its own parallel region. A sleeping worker (passive
# waiting, see workers_spin) takes ~0.1 ms to join on a virtual machine, which the
# update of a few thousand rows does not pay back. Measured, V = 1e6, D = 64,
# uniform rows, a new batch each step, update alone, 1 vs 2 threads (us): passive:
# SGD 1,024 rows 53 vs 135, 4,096 217 vs 271, 16,384 840 vs 580; Adagrad 93 vs
# 174, 362 vs 362, 1,402 vs 870; SparseAdam 145 vs 206, 538 vs 436, 1,997 vs
# 1,196 -- crossings at ~8,192 / 4,096 / 3,000 rows, where the work counted above
# (2, 3 and 4 elements per value) is 0.8-1 M: two threads from 786,432. Spinning
# workers: SGD 1,024 rows 42 vs 50, 4,096 200 vs 119; Adagrad 1,024 83 vs 65;
# SparseAdam 1,024 120 vs 84; 256 rows 21 / 32 / 44 us on either. The fused
# backward + update (its grad reads counted too), passive: 1,024 rows 83 vs 133
# (SGD), 132 vs 165 (Adagrad), 176 vs 204 (SparseAdam); 4,096 rows 311 vs 287, 456
# vs 400, 631 vs 467.
OPTIM_GRAIN = PARALLEL_GRAIN if workers_spin() else 3 << 17


def optim_fused_update(kind, hyper, weight, grad, plan, src, scale, scale_grad_by_freq, s1, s2,
                       argmax=None):
    """Fused backward + update of the planned rows (``_optim.fused_update``, through
    ``_half`` for float16 tables)."""
    dtype = _half.compute_dtype(weight.dtype)
    s1, s2 = _state(s1, weight), _state(s2, weight)
    perm, weights = plan.perm, None
    if src is not None and argmax is None:
        # sum and mean bags sum through the SIMD pooling, as their backward does
        perm, weights = _plan_in_bags(plan, src, scale, dtype)
        src = scale = None
    _half.fused_update(kind, *hyper, weight, grad, perm, plan.rows, plan.starts,
                       np.empty(0, np.int64) if src is None else src,
                       np.empty(0, dtype) if scale is None else scale,
                       _NO_WON if src is None else _won_masks(argmax, src),
                       bool(scale_grad_by_freq), s1, s2,
                       threads_for(plan.perm.shape[0] * grad.shape[1]
                                   + _update_work(plan.rows.shape[0], weight.shape[1], s1, s2),
                                   OPTIM_GRAIN),
                       weights=weights)
