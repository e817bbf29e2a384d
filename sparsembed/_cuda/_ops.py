"""The GPU backend's logic, written once against an array module ``xp``.

:class:`ArrayBackend` holds every backend operation (the functions of
``sparsembed._cpu``, same names and signatures) as methods over ``xp`` plus a kernel
launcher. ``sparsembed._cuda.backend`` instantiates it with ``xp = cupy`` and the
CUDA kernels of :mod:`sparsembed._cuda._kernels`; the CPU-side tests instantiate it
with ``xp = numpy`` (and numpy stand-ins for the kernels), so the sorting, segment
bookkeeping, CSR assembly, validation and gradient accumulation run and are checked
against the CPU backend on a machine without a GPU.

Nothing here imports CuPy.

Determinism: the backward never scatter-adds with atomics. :meth:`plan_rows` sorts
the ids stably (equal ids keep their input order), cuts the sorted ids into one
segment per distinct row, and the segment kernel sums each row's gradient rows in
input order.
The result is bitwise reproducible, and the same as the CPU backend's (which sums in
the same order), except for rows with more than :data:`SEGMENT_CHUNK` entries in the
batch: those are summed in chunks, then the chunk sums in order (equal up to
rounding).
"""

import numpy as np
import scipy.sparse as sp

from sparsembed import _rowsparse
from sparsembed import _validation as V
from sparsembed._rowplan import RowPlan

_INT64_MAX = np.iinfo(np.int64).max
_INT32_MAX = np.iinfo(np.int32).max
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))

# kernel launch shape: one warp (32 lanes over the columns) per row / segment,
# 8 warps per block
WARP = 32
WARPS_PER_BLOCK = 8
MAX_BLOCKS = 1 << 20  # the kernels loop (grid-stride) beyond this


# A row's entries are summed by one warp, at ~0.2 us per entry on an H200 whatever
# the loads in flight (measured: batches of 4 to 32 rows time the same), so a hot id
# (187,000 of 2**20 Zipf(1.2) ids) alone took 35 ms. Segments longer than this are cut
# into chunks of this many entries, summed in parallel, and the chunks' partial sums
# then added in chunk order: still deterministic, but for those rows equal to the
# CPU's sums only up to rounding (shorter segments: bit for bit).
SEGMENT_CHUNK = 512


def launch_shape(n_items):
    """(grid, block) for ``n_items`` warp-sized work items (rows, segments, bags)."""
    blocks = (int(n_items) + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
    return (max(1, min(blocks, MAX_BLOCKS)),), (WARP, WARPS_PER_BLOCK)


def device_index_array(xp, arr, name="input", num_rows=None):
    """An integer device array as a C-contiguous int32/int64 array (same shape).

    The device-side twin of ``sparsembed._validation.as_index_array``: int32 and int64
    pass through (copied only when not C-contiguous), other integer dtypes are
    converted once; bool, float, complex raise TypeError; uint64 values above the
    int64 range raise IndexError naming the first one.
    """
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "iu":
        raise TypeError(
            f"{name} must be an array of integers, got dtype {dtype}"
            + (" (bool is not an index type)" if dtype.kind == "b" else "")
        )
    if dtype in _INDEX_DTYPES:
        return xp.asarray(arr, order="C")
    if dtype.kind == "u" and dtype.itemsize == 8 and arr.size:
        too_big = arr.reshape(-1) > np.uint64(_INT64_MAX)
        pos = int(xp.argmax(too_big.view(xp.uint8)))
        if bool(too_big[pos]):
            value = int(arr.reshape(-1)[pos])
            raise V.past_int64_error(name, value, pos, num_rows)
    return xp.asarray(arr, dtype=np.int64, order="C")


def first_flagged(bad, n):
    """The position a kernel's ``bad`` flag names (``se_flag_bad``: the largest
    ``n - i`` over the bad positions ``i``, 0 for none), or -1: one scalar read."""
    mark = int(bad[0])
    return n - mark if mark else -1


def split_segments(xp, starts, chunk):
    """Cut the segments of ``starts`` longer than ``chunk`` entries into chunks.

    Returns None when no segment is longer, else ``(sub_starts, chunk_starts)``:
    ``sub_starts`` bounds every chunk (each segment cut at ``lo + chunk * j``) and
    ``chunk_starts[u]`` is the first chunk of segment ``u`` (the last entry the number of
    chunks), so summing the chunks' sums over ``chunk_starts`` gives each segment's sum.
    Segments are non-empty (a plan's are).
    """
    lengths = starts[1:] - starts[:-1]
    if lengths.shape[0] == 0 or int(lengths.max()) <= chunk:
        return None
    n_chunks = (lengths + (chunk - 1)) // chunk
    chunk_end = xp.cumsum(n_chunks)
    total = int(chunk_end[-1])
    chunk_id = xp.arange(total, dtype=np.int64)
    seg = xp.searchsorted(chunk_end, chunk_id, side="right")
    first = chunk_end - n_chunks
    sub_starts = xp.empty(total + 1, dtype=np.int64)
    sub_starts[:-1] = starts[:-1][seg] + chunk * (chunk_id - first[seg])
    sub_starts[-1] = starts[-1]
    chunk_starts = xp.empty(lengths.shape[0] + 1, dtype=np.int64)
    chunk_starts[:-1] = first
    chunk_starts[-1] = total
    return sub_starts, chunk_starts


def norm_kind(norm_type):
    """The renorm kernel's norm code: 0 (p=2), 1 (p=1), 2 (inf), 3 (-inf), 4 (p=0), 5 (other p)."""
    p = float(norm_type)
    if p == 2.0:
        return 0
    if p == 1.0:
        return 1
    if p == np.inf:
        return 2
    if p == -np.inf:
        return 3
    if p == 0.0:
        return 4
    return 5


class ArrayBackend:
    """Every backend operation, over the array module ``xp``.

    Parameters
    ----------
    xp : module
        ``cupy`` (or ``numpy`` in the CPU-side tests).
    kernels : object
        The kernel launcher: ``gather``, ``renorm``, ``segment_sum`` (see
        :class:`sparsembed._cuda._kernels.CudaKernels`).
    csr_type : type
        The CSR class sparse gradients are built as (``cupyx.scipy.sparse.csr_matrix``).
    name : str
        The backend's name ("cuda").
    """

    def __init__(self, xp, kernels, csr_type, name="cuda"):
        self.xp = xp
        self.kernels = kernels
        self.csr_type = csr_type
        self.name = name
        self.segment_chunk = SEGMENT_CHUNK

    # ------------------------------------------------------------- host <-> device

    def is_device_array(self, a):
        return isinstance(a, self.xp.ndarray)

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        """A numpy array (or scipy csr_array for a sparse gradient) on the host."""
        if self.is_sparse(a):
            import scipy.sparse as sp

            host = a.get() if hasattr(a, "get") else a
            return sp.csr_array(host)
        if hasattr(a, "__cuda_array_interface__") and hasattr(a, "get"):
            return a.get()
        return np.asarray(a)

    def from_host(self, a):
        """Move a numpy array (or a scipy sparse gradient) to the device, once;
        device arrays are made C-contiguous (no copy when they are)."""
        xp = self.xp
        if self.is_sparse(a) or _is_scipy_sparse(a):
            if self.is_sparse(a) and not _is_scipy_sparse(a):
                return a
            return self._csr_from_host(a)
        if np.dtype(a.dtype) == np.float16:
            raise TypeError(
                "float16 tables are CPU-only for now: device='cuda' takes float32 and "
                "float64 tables (cast with .astype(numpy.float32))"
            )
        return xp.ascontiguousarray(xp.asarray(a))

    def _csr_from_host(self, a):
        a = _rowsparse.checked_csr(a)  # scipy's own conversions read it unchecked
        out = self.csr_type((self.xp.asarray(a.data), self.xp.asarray(a.indices),
                             self.xp.asarray(a.indptr)), shape=a.shape)
        if a.has_canonical_format:
            out.has_canonical_format = True
        return out

    def is_sparse(self, a):
        return isinstance(a, self.csr_type)

    # ------------------------------------------------------------- validation

    def as_index_array(self, input, name="input", num_rows=None):
        """``input`` (numpy, device array or list) as a C-contiguous int32/int64 device
        array of the same shape; a host array is validated on the host, then moved once."""
        if self.is_device_array(input) and self.xp is not np:
            return device_index_array(self.xp, input, name, num_rows)
        return self.xp.asarray(V.as_index_array(input, name, num_rows))

    def check_index_range(self, flat, num_embeddings, name="input"):
        """IndexError naming the first id outside ``[0, num_embeddings)``; checked on the
        device before anything is written."""
        pos = self.first_out_of_range(flat, num_embeddings)
        if pos >= 0:
            raise V.index_error(flat, pos, num_embeddings, name)

    def _raise_if_flagged(self, bad, flat, num_rows):
        """IndexError naming the id a row kernel flagged in ``bad`` (one scalar read)."""
        pos = first_flagged(bad, flat.shape[0])
        if pos >= 0:
            raise V.index_error(flat, pos, num_rows)

    def first_out_of_range(self, flat, upper):
        """Position of the first id of ``flat`` (1-D, C-contiguous) outside
        ``[0, upper)``, or -1: one kernel and one scalar read."""
        n = int(flat.shape[0])
        if n == 0:
            return -1
        bad = self.xp.zeros(1, dtype=np.int64)
        self.kernels.check_ids(self.xp.ascontiguousarray(flat), upper, bad)
        return first_flagged(bad, n)

    def check_weight(self, weight, name="weight"):
        """A 2-D float32/float64 device array."""
        if not isinstance(weight, self.xp.ndarray):
            raise TypeError(
                f"{name} must be a {self.xp.__name__} ndarray on device {self.name!r}, "
                f"got {type(weight).__module__}.{type(weight).__name__}"
            )
        if weight.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D (num_embeddings, embedding_dim), got shape {weight.shape}"
            )
        if np.dtype(weight.dtype) not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got dtype {weight.dtype}")
        return weight

    def check_writable(self, weight, name="weight"):
        # CuPy arrays are always writable; a numpy stand-in keeps its flag
        if not getattr(weight.flags, "writeable", True):
            raise ValueError(f"{name} is read-only, but max_norm renormalises it in place")

    def as_grad_output(self, grad_output, expected_shape, dtype):
        """``grad_output`` (numpy or device) as a C-contiguous device array of ``dtype``
        with the expected shape; checked before it is moved."""
        g = grad_output if self.is_device_array(grad_output) else np.asarray(grad_output)
        if np.dtype(g.dtype).kind not in "fiu":
            raise TypeError(f"grad_output must be a real array, got dtype {g.dtype}")
        if tuple(g.shape) != tuple(expected_shape):
            raise ValueError(
                f"grad_output has shape {tuple(g.shape)}, expected {tuple(expected_shape)} "
                "(the shape of the forward's output)"
            )
        return self.xp.asarray(g, dtype=dtype, order="C")

    # ------------------------------------------------------------- plan

    def plan_rows(self, flat, num_rows, skip_row=None, check_range=False):
        """Sort the ids ``flat`` into a :class:`RowPlan` (``check_range``: they have
        not been range-checked yet; IndexError names the first bad one).

        Equal ids keep their input order: a stable sort of the ids alone, on 32-bit
        keys, for tables of at most 2**31 rows (CuPy's argsort is always stable: a
        thrust stable sort; the numpy stand-in sorts stably too); beyond that the
        unique key ``id * n + position`` (any sort gives the stable order), or a
        lexicographic sort on (id, position) when ``num_rows * n`` would overflow
        int64.
        """
        if check_range:
            self.check_index_range(flat, num_rows)
        xp = self.xp
        n = int(flat.shape[0])
        if skip_row is None:
            pos = None  # every position: the order is the permutation itself
            ids = flat.astype(np.int64, copy=False)
        else:
            pos = xp.flatnonzero(flat != skip_row).astype(np.int64, copy=False)
            ids = flat[pos].astype(np.int64, copy=False)
        m = int(ids.shape[0])
        if m == 0:
            empty = xp.zeros(0, dtype=np.int64)
            return RowPlan(empty, empty, xp.zeros(1, dtype=np.int64), m < n, n)
        if int(num_rows) <= _INT32_MAX + 1:
            keys = flat if pos is None and flat.dtype == np.int32 else ids.astype(np.int32)
            order = xp.argsort(keys).astype(np.int64, copy=False)
        else:
            at = xp.arange(n, dtype=np.int64) if pos is None else pos
            if int(num_rows) <= _INT64_MAX // max(n, 1):
                order = xp.argsort(ids * n + at)
            else:  # pragma: no cover - needs more than 2**63 (id, position) pairs
                order = xp.lexsort(xp.stack([at, ids]))
        perm = order if pos is None else pos[order]
        # the segments: two kernels and a scan with one read of its total, where
        # CuPy operations took ten launches and nonzero's own scan and read
        ids = xp.ascontiguousarray(ids)
        sorted_ids = xp.empty(m, dtype=np.int64)
        head = xp.empty(m, dtype=np.int32)
        self.kernels.plan_heads(ids, order, sorted_ids, head)
        at = xp.cumsum(head, dtype=np.int64)
        n_rows = int(at[-1])
        starts = xp.empty(n_rows + 1, dtype=np.int64)
        rows = xp.empty(n_rows, dtype=np.int64)
        self.kernels.plan_segments(head, at, sorted_ids, starts, rows)
        return RowPlan(perm, rows, starts, m < n, n)

    # ------------------------------------------------------------- forward

    def gather_and_plan(self, weight, flat, num_rows, skip_row=None, ids_out=None):
        """``(weight[flat], None)``, the ids range-checked: the GPU plans when the plan
        is needed (the CPU backend may plan during the lookup)."""
        return self.gather(weight, flat, check_range=True, ids_out=ids_out), None

    def gather(self, weight, flat, check_range=False, ids_out=None):
        """``weight[flat]`` as a new (n, dim) array; ``ids_out`` also receives a copy
        of ``flat``.

        ``check_range``: ``flat`` has not been range-checked yet; the lookup kernel
        checks each id before reading its row (no separate pass) and IndexError names
        the first bad one. Only the new output (and ``ids_out``) can have been written
        by then.
        """
        xp = self.xp
        if ids_out is not None:
            ids_out[...] = flat
        out = xp.empty((flat.shape[0], weight.shape[1]), dtype=weight.dtype)
        if not out.size:
            if check_range:  # no row to read: the ids alone
                self.check_index_range(flat, weight.shape[0])
            return out
        bad = xp.zeros(1, dtype=np.int64)
        self.kernels.gather(weight, flat, out, bad)
        if check_range:
            self._raise_if_flagged(bad, flat, weight.shape[0])
        return out

    def renorm_rows_(self, weight, rows, max_norm, norm_type):
        """Rescale, in place, the distinct ``rows`` whose norm exceeds ``max_norm``."""
        if rows.shape[0] and weight.shape[1]:
            rows = self.xp.ascontiguousarray(rows, dtype=np.int64)
            self.kernels.renorm(weight, rows, float(max_norm), float(norm_type),
                                norm_kind(norm_type))

    # ------------------------------------------------------------- backward

    def _segment_sum(self, grad2d, plan, out, dense, scale_grad_by_freq):
        def run(starts, rows, dense_, scale_by_count, dst):
            self.kernels.segment_sum(grad2d, plan.perm, starts, rows, dense_, scale_by_count,
                                     dst)

        return self._planned_sums(run, plan, out, dense, scale_grad_by_freq)

    def _planned_sums(self, run, plan, out, dense, scale_grad_by_freq):
        """Each planned row's sum into ``out`` (row ``rows[u]`` when dense, else ``u``)
        through ``run(starts, rows, dense, scale_by_count, out)``, a segment kernel's
        launch; rows longer than ``segment_chunk`` entries are summed in chunks, then
        the chunk sums in chunk order, then divided by the row's count
        (``scale_grad_by_freq``) as the one-pass kernels do."""
        xp = self.xp
        if not (plan.rows.shape[0] and out.shape[1]):
            return out
        split = split_segments(xp, plan.starts, self.segment_chunk)
        if split is None:
            run(plan.starts, plan.rows, dense, bool(scale_grad_by_freq), out)
            return out
        sub_starts, chunk_starts = split
        partial = xp.empty((sub_starts.shape[0] - 1, out.shape[1]), dtype=out.dtype)
        run(sub_starts, sub_starts[:-1], False, False, partial)  # (rows unread: not dense)
        self.kernels.segment_sum(partial, xp.arange(partial.shape[0], dtype=np.int64),
                                 chunk_starts, plan.rows, dense, False, out)
        if scale_grad_by_freq:
            counts = plan.starts[1:] - plan.starts[:-1]
            many = xp.flatnonzero(counts > 1)
            dst = plan.rows[many] if dense else many
            out[dst] = out[dst] / counts[many].astype(out.dtype)[:, None]
        return out

    def dense_grad(self, grad2d, plan, num_rows, scale_grad_by_freq):
        """Dense (num_rows, dim) gradient: each planned row gets its sum of grad rows."""
        out = self.xp.zeros((num_rows, grad2d.shape[1]), dtype=grad2d.dtype)
        return self._segment_sum(grad2d, plan, out, True, scale_grad_by_freq)

    def zero_grad_(self, grad):
        """Zero the dense gradient ``grad`` in place."""
        grad.fill(0)

    def dense_grad_plans(self, grad2d, num_rows, scale_grad_by_freq):
        """Whether :meth:`dense_grad_of_ids` makes a row plan: always, here."""
        return True

    def dense_grad_of_ids(self, grad2d, flat, num_rows, skip_row, scale_grad_by_freq):
        """Dense (num_rows, dim) gradient of the ids ``flat`` (range-checked here), the
        row ``skip_row`` (or None) left at zero: :meth:`dense_grad` of their plan."""
        plan = self.plan_rows(flat, num_rows, skip_row, check_range=True)
        return self.dense_grad(grad2d, plan, num_rows, scale_grad_by_freq)

    def row_grad(self, grad2d, plan, scale_grad_by_freq):
        """(n_rows, dim) per-row sums, one per distinct planned id, in ``plan.rows`` order."""
        out = self.xp.empty((plan.rows.shape[0], grad2d.shape[1]), dtype=grad2d.dtype)
        return self._segment_sum(grad2d, plan, out, False, scale_grad_by_freq)

    def sparse_grad(self, grad2d, plan, num_rows, scale_grad_by_freq):
        """Canonical row-sparse CSR gradient of shape (num_rows, dim)."""
        return self.from_rows(plan.rows, self.row_grad(grad2d, plan, scale_grad_by_freq),
                              num_rows)

    # ------------------------------------------------------------- row-sparse CSR

    def from_rows(self, rows, data, num_rows):
        """The canonical CSR matrix holding ``data[u]`` as the full row ``rows[u]``.

        ``rows``: sorted, distinct. ``indptr[r] = dim * #(rows < r)``, written by one
        kernel; the index arrays are int32 when they fit (CuPy's sparse matrices want
        int32).
        """
        xp = self.xp
        n_rows, dim = data.shape
        nnz = n_rows * dim
        idx_dtype = np.int32 if max(int(num_rows), nnz) <= _INT32_MAX else np.int64
        indptr = xp.empty(int(num_rows) + 1, dtype=idx_dtype)
        self.kernels.row_pointer(xp.ascontiguousarray(rows, dtype=np.int64), int(num_rows),
                                 dim, indptr)
        indices = xp.empty(nnz, dtype=idx_dtype)
        if nnz:
            self.kernels.fill_columns(indices, dim)
        out = self.csr_type((data.reshape(-1), indices, indptr), shape=(int(num_rows), dim))
        out.has_canonical_format = True
        # the row list, as the CPU's matrices carry it (_rowsparse.wrap_rows), so that
        # reading the gradient back (an optimizer step, a backward adding into it)
        # need not scan the row pointer over every table row
        out.__dict__[_rowsparse._ROWS_KEY] = (rows, out.indptr)
        return out

    def stored_rows(self, mat):
        """Sorted ids of the non-empty rows; ValueError where the row pointer decreases
        (one diff both checks it and gives the row lengths, as on the CPU).

        A matrix made by :meth:`from_rows` carries its row list: used, as on the CPU
        (``_rowsparse.stored_rows``), while the matrix keeps that row pointer array
        and it still starts at 0 and gives each listed row at least one entry, their
        lengths adding up to nnz -- O(rows) and one read, where the scan is O(table
        rows) and two.
        """
        xp = self.xp
        indptr = mat.indptr
        cached = mat.__dict__.get(_rowsparse._ROWS_KEY)
        if cached is not None and cached[1] is indptr:
            rows = cached[0]
            if not rows.shape[0]:
                if int(indptr[-1]) == 0 and int(indptr[0]) == 0:
                    return rows
            else:
                lengths = indptr[rows + 1] - indptr[rows]
                if bool((indptr[0] == 0) & (lengths.min() > 0)
                        & (lengths.sum(dtype=np.int64) == indptr[-1])):
                    return rows
        steps = _rowsparse._check_pointer_order(indptr, "row", xp=xp)
        return xp.flatnonzero(steps).astype(np.int64, copy=False)

    def row_values(self, mat):
        """(rows, values) of a row-sparse CSR matrix; values has shape (n_rows, dim).

        Canonical matrices (ours) are read without a copy; any other CSR matrix has
        its duplicates summed and missing entries filled with zeros.
        """
        xp = self.xp
        dim = mat.shape[1]
        # the update kernels index the table by these rows: the row pointer must fit
        # the shape and never decrease (an edited matrix is not rechecked by cupyx;
        # stored_rows checks the order)
        _rowsparse._check_compressed(mat, "row", False, xp=xp)
        rows = self.stored_rows(mat)
        n_rows = int(rows.shape[0])
        if mat.nnz == n_rows * dim:
            # the flags trusted as cupyx trusts them, as the CPU trusts scipy's
            if _rowsparse.flagged_canonical(mat):  # every row holds 0 .. dim - 1: no O(nnz) read
                return rows, mat.data.reshape(n_rows, dim)
            cols = mat.indices.reshape(n_rows, dim)
            if n_rows == 0 or bool((cols == xp.arange(dim, dtype=cols.dtype)).all()):
                return rows, mat.data.reshape(n_rows, dim)
        _rowsparse._check_compressed(mat, "row", True, xp=xp)  # column indices too
        m = mat.copy()
        m.sum_duplicates()
        coo = m.tocoo()
        values = xp.zeros((n_rows, dim), dtype=mat.dtype)
        values[xp.searchsorted(rows, coo.row.astype(np.int64)), coo.col] = coo.data
        return rows, values

    def add_grad(self, a, b):
        """``a + b`` for two gradients (dense device arrays or row-sparse CSR)."""
        xp = self.xp
        if not self.is_sparse(a):
            if not self.is_sparse(b):
                return a + b
            a = a.copy()
            rows, vals = self.row_values(b)
            a[rows] += vals  # rows are distinct: no duplicate-index hazard
            return a
        if not self.is_sparse(b):
            return self.add_grad(b, a)
        rows_a, va = self.row_values(a)
        rows_b, vb = self.row_values(b)
        rows = xp.unique(xp.concatenate([rows_a, rows_b]))
        dtype = np.result_type(va.dtype, vb.dtype)
        n_rows, dim = rows.shape[0], a.shape[1]
        if va.dtype != vb.dtype or not (n_rows and dim):
            values = xp.zeros((n_rows, dim), dtype=dtype)
            values[xp.searchsorted(rows, rows_a)] += va
            values[xp.searchsorted(rows, rows_b)] += vb
            return self.from_rows(rows, values, a.shape[0])
        # one kernel reads both gradients' rows once (the scatter-adds into a zero-filled
        # array read and wrote each value several times)
        src_a = xp.full(n_rows, -1, dtype=np.int64)
        src_a[xp.searchsorted(rows, rows_a)] = xp.arange(rows_a.shape[0], dtype=np.int64)
        src_b = xp.full(n_rows, -1, dtype=np.int64)
        src_b[xp.searchsorted(rows, rows_b)] = xp.arange(rows_b.shape[0], dtype=np.int64)
        values = xp.empty((n_rows, dim), dtype=dtype)
        self.kernels.add_rows(xp.ascontiguousarray(va), src_a, xp.ascontiguousarray(vb), src_b,
                              values)
        return self.from_rows(rows, values, a.shape[0])


    # ------------------------------------------------------------- EmbeddingBag
    # (the bag functions of ``sparsembed._cpu``, same signatures and results)

    def bag_forward(self, weight, flat, starts, mode, padding_idx, per_sample_weights=None,
                    plan=None, check_range=False):
        """Pool the validated bags; returns (out, argmax or None, counts).

        ``check_range``: ``flat`` has not been range-checked yet; the pooling kernel
        checks each id before reading its row (those past the last bag too), and
        IndexError names the first bad one. Only the new outputs can have been written
        by then.

        (``plan`` is the CPU float16 path's; float16 tables are not supported on the
        GPU, so it is ignored here.)

        ``starts`` (n_bags + 1, int64) bounds the bags in ``flat``; ``argmax`` (max
        mode) holds, per bag and column, the position in ``flat`` of the winning entry
        (-1 for an empty bag); ``counts`` the non-padding entries per bag.
        """
        xp = self.xp
        n_bags = starts.shape[0] - 1
        dim = weight.shape[1]
        if n_bags <= 0 or dim == 0:  # no row to read: the ids alone
            if check_range:
                self.check_index_range(flat, weight.shape[0])
            argmax = xp.full((n_bags, dim), -1, dtype=np.int64) if mode == "max" else None
            # counts 0 with no columns, as the CPU kernel gives
            return (xp.zeros((n_bags, dim), dtype=weight.dtype), argmax,
                    xp.zeros(n_bags, dtype=np.int64))
        # the kernel writes every bag's row, count and winners
        out = xp.empty((n_bags, dim), dtype=weight.dtype)
        counts = xp.empty(n_bags, dtype=np.int64)
        argmax = xp.empty((n_bags, dim), dtype=np.int64) if mode == "max" else None
        bad = xp.zeros(1, dtype=np.int64)
        pad = -1 if padding_idx is None else int(padding_idx)
        self.kernels.bag_forward(weight, flat, starts, pad, BAG_MODES[mode],
                                 per_sample_weights, out, argmax, counts, bad)
        if check_range:
            self._raise_if_flagged(bad, flat, weight.shape[0])
        return out, argmax, counts

    def bag_starts(self, offsets, n, include_last_offset):
        """As ``sparsembed._cpu.bag_starts``: one kernel writes the starts and finds
        the first decrease, and one transfer brings it with the first and last
        offsets to the host."""
        xp = self.xp
        off = xp.ascontiguousarray(offsets, dtype=np.int64)
        k = int(off.shape[0])
        starts = xp.empty(k if include_last_offset else k + 1, dtype=np.int64)
        result = xp.zeros(3, dtype=np.int64)
        self.kernels.bag_starts(off, n, include_last_offset, starts, result)
        mark, first, last = (int(v) for v in self.to_numpy(result))
        return starts, (k - mark if mark else -1), first, last

    def bag_counts(self, flat, starts, padding_idx):
        """Non-padding entries of each bag, (n_bags,) int64 (a prefix sum, no kernel)."""
        xp = self.xp
        if padding_idx is None:
            return (starts[1:] - starts[:-1]).astype(np.int64)
        kept = xp.zeros(flat.shape[0] + 1, dtype=np.int64)
        xp.cumsum((flat != padding_idx).astype(np.int64), out=kept[1:])
        return kept[starts[1:]] - kept[starts[:-1]]

    def entry_bags(self, starts):
        """Bag of each entry ``0 .. starts[-1] - 1``, (starts[-1],) int64: the number of
        bag ends at or before the entry (empty bags are skipped over)."""
        xp = self.xp
        end = int(starts[-1])
        return xp.searchsorted(starts[1:], xp.arange(end, dtype=np.int64),
                               side="right").astype(np.int64, copy=False)

    def mean_scale(self, counts, entry_bag, dtype):
        """Per-entry factor ``1 / count`` of the entry's bag (mean mode)."""
        xp = self.xp
        inv = 1.0 / xp.maximum(counts, 1)
        return xp.ascontiguousarray(inv[entry_bag].astype(dtype, copy=False))

    def per_sample_weights_grad(self, grad2d, weight, flat, entry_bag, padding_idx, plan=None):
        """(n,) ``dot(grad2d[bag], weight[id])`` per entry; 0 for padding and unbagged
        entries (the dot products in float64)."""
        out = self.xp.zeros(flat.shape[0], dtype=grad2d.dtype)
        if entry_bag.shape[0] and weight.shape[1]:
            pad = -1 if padding_idx is None else int(padding_idx)
            self.kernels.psw_grad(grad2d, weight, flat, entry_bag, pad, out)
        return out

    def _bag_segment_sum(self, grad2d, plan, entry_bag, scale, argmax, scale_grad_by_freq,
                         out, dense):
        def run(starts, rows, dense_, scale_by_count, dst):
            self.kernels.bag_segment_sum(grad2d, plan.perm, starts, rows, dense_, entry_bag,
                                         scale, argmax, scale_by_count, dst)

        return self._planned_sums(run, plan, out, dense, scale_grad_by_freq)

    def bag_row_grad(self, grad2d, plan, entry_bag, scale, argmax, scale_grad_by_freq):
        """(n_rows, dim) per-row sums of ``grad2d[entry_bag[e]] * scale[e]`` over each
        planned row's entries (in max mode only the columns the entry won), in
        ``plan.rows`` order."""
        out = self.xp.empty((plan.rows.shape[0], grad2d.shape[1]), dtype=grad2d.dtype)
        return self._bag_segment_sum(grad2d, plan, entry_bag, scale, argmax,
                                     scale_grad_by_freq, out, False)

    def bag_dense_grad(self, grad2d, plan, entry_bag, scale, argmax, num_rows,
                       scale_grad_by_freq):
        """Dense (num_rows, dim) gradient of a bag forward."""
        out = self.xp.zeros((num_rows, grad2d.shape[1]), dtype=grad2d.dtype)
        return self._bag_segment_sum(grad2d, plan, entry_bag, scale, argmax,
                                     scale_grad_by_freq, out, True)

    def bag_max_dense_grad(self, grad2d, argmax, flat, plan, entry_bag, num_rows):
        """Max mode's dense gradient: the device sums the planned rows (``plan`` and
        ``entry_bag`` of the bagged entries, which ``_bags.plan_needed`` asks for on
        the GPU), as :meth:`bag_dense_grad` does."""
        return self.bag_dense_grad(grad2d, plan, entry_bag, None, argmax, num_rows, False)

    def bag_sparse_grad(self, grad2d, plan, entry_bag, scale, argmax, num_rows,
                        scale_grad_by_freq):
        """Canonical row-sparse CSR gradient of a bag forward."""
        values = self.bag_row_grad(grad2d, plan, entry_bag, scale, argmax, scale_grad_by_freq)
        return self.from_rows(plan.rows, values, num_rows)

    # ------------------------------------------------------------- optimizers

    def optim_grad(self, grad, weight):
        """A layer's gradient as (rows or None, values) on the device, in the table's
        dtype: a row-sparse CSR gives its stored rows and their values, a dense array
        (None, the array). numpy / scipy gradients are moved once. Same checks and
        messages as on the CPU."""
        xp = self.xp
        if self.is_sparse(grad) or _is_scipy_sparse(grad):
            if tuple(grad.shape) != tuple(weight.shape):
                raise ValueError(
                    f"grad has shape {tuple(grad.shape)}, expected {tuple(weight.shape)}")
            if np.dtype(grad.dtype).kind != "f":
                raise TypeError(f"grad must be a float array, got dtype {grad.dtype}")
            if _is_scipy_sparse(grad):
                grad = self._csr_from_host(grad)
            elif grad.format != "csr":
                grad = grad.tocsr()
            rows, values = self.row_values(grad)
            return (xp.ascontiguousarray(rows, dtype=np.int64),
                    xp.ascontiguousarray(values, dtype=weight.dtype))
        if isinstance(grad, (np.ndarray, xp.ndarray)):
            if tuple(grad.shape) != tuple(weight.shape):
                raise ValueError(
                    f"grad has shape {tuple(grad.shape)}, expected {tuple(weight.shape)}")
            if np.dtype(grad.dtype).kind != "f":
                raise TypeError(f"grad must be a float array, got dtype {grad.dtype}")
            return None, xp.ascontiguousarray(xp.asarray(grad), dtype=weight.dtype)
        raise TypeError(
            f"grad must be an ndarray or a sparse matrix, got {type(grad).__name__}"
        )

    def optim_update_rows(self, kind, hyper, weight, rows, values, s1, s2):
        """One optimizer update (``kind``: 0 SGD, 1 Adagrad, 2 SparseAdam, 3 row-wise
        Adagrad) of the rows of a built gradient.

        ``hyper`` is (lr, momentum, weight_decay, eps, c1, c2[, c3]) as the CPU kernel
        takes them; ``rows`` the sorted distinct rows of ``values`` (None: ``values`` has one
        row per table row); ``s1``/``s2`` the state arrays, None (or an empty dummy)
        when absent.
        """
        s1 = None if s1 is None or s1.shape[0] == 0 else s1
        s2 = None if s2 is None or s2.shape[0] == 0 else s2
        if values.shape[0] and weight.shape[1]:
            self.kernels.update_rows(kind, tuple(float(h) for h in hyper), weight,
                                     None if rows is None else
                                     self.xp.ascontiguousarray(rows, dtype=np.int64),
                                     values, s1, s2)

    def optim_fused_update(self, kind, hyper, weight, grad, plan, src, scale,
                           scale_grad_by_freq, s1, s2, argmax=None):
        """Fused backward + update: the planned rows' gradient sums (row ``rows[u]``
        gets ``sum scale[e] * grad[src[e]]`` over its entries, in input order), then
        one update of those rows. With ``src`` (EmbeddingBag: entry -> bag) the sums are
        the bag backward's row sums (``argmax``: max mode's winners). On the GPU the
        sums go through a (n_rows, dim) buffer (two kernels), the full gradient matrix
        is never built."""
        if src is None and scale is None:
            values = self.row_grad(grad, plan, scale_grad_by_freq)
        else:
            entry = src if src is not None else self.xp.arange(plan.n, dtype=np.int64)
            values = self.bag_row_grad(grad, plan, entry, scale,
                                       argmax if argmax is not None and argmax.shape[0] else None,
                                       scale_grad_by_freq)
        self.optim_update_rows(kind, hyper, weight, plan.rows, values, s1, s2)


BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


def _is_scipy_sparse(a):
    # not by the type's module: the CPU's gradients may be a subclass of csr_array
    # defined in sparsembed (_rowsparse._DeferredPointerCSR)
    return sp.issparse(a)


# The functions every backend module offers (``sparsembed._cpu``'s interface).
BACKEND_FUNCTIONS = (
    "asarray", "to_numpy", "plan_rows", "gather", "gather_and_plan", "renorm_rows_",
    "dense_grad", "row_grad", "sparse_grad", "add_grad", "as_index_array", "check_index_range",
    "check_weight", "check_writable", "as_grad_output",
    # EmbeddingBag
    "bag_starts", "bag_forward", "bag_counts", "entry_bags", "mean_scale",
    "per_sample_weights_grad", "bag_row_grad", "bag_dense_grad", "bag_max_dense_grad",
    "bag_sparse_grad",
    # optimizers
    "optim_grad", "optim_update_rows", "optim_fused_update",
)
