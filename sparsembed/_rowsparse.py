"""Row-sparse gradients as canonical ``scipy.sparse.csr_array``.

Canonical here means: the non-empty rows are sorted and distinct, each stored as a
full row of ``dim`` entries (explicit zeros kept), column indices ``0..dim-1`` in
order. scipy's own ``+`` drops explicit zeros, so accumulation goes through
:func:`add` instead.
"""

import types

import numpy as np
import scipy.sparse as sp

from sparsembed._kernels import _backward, _pool
from sparsembed._threads import threads_for, workers_spin


# Outputs at least this large are written with non-temporal stores (the gather, the
# dense backward). A plain store to a line that is not cached first reads it
# (read-for-ownership); an output this big would not stay in most L2/L3 caches for
# its consumer anyway, so streaming it halves the write traffic and keeps the table
# rows cached. Measured on the benchmark machine: the forward of 262,144 ids at
# D = 256 (256 MB) 1.4-2x faster, at D = 64 (64 MB) 1.25-1.35x.
STREAM_BYTES = 32 << 20

# Row sums are read once more (by the optimizer step, or the csr's user). Above what
# the L2 caches of two cores hold (2 x 2 MiB here) they come back from L3 or memory
# either way, and plain stores would first read every line. Measured, V = 1e6,
# 2 threads: Adagrad step of 262,144 Zipf ids at D = 256 (30 MB of sums) 33.6 ->
# 31.8 ms; steps of 16,384-65,536 uniform ids at D = 64 unchanged.
ROW_SUMS_STREAM_BYTES = 4 << 20

# sparsembed never reads a csr gradient's column indices back (the optimizer trusts
# the canonical flag), so they are streamed unless tiny. Measured (fill_row_csr,
# V = 1e6, D = 64, plain vs streamed): 256 KiB 0.21 vs 0.20 ms, 1 MiB 0.30 vs 0.24,
# 4 MiB 0.67 vs 0.54, 16 MiB 1.8 vs 1.2; 30 MB at D = 256 2.4 vs 1.3.
CSR_INDEX_STREAM_BYTES = 256 << 10

# The csr structure is plain stores of constants (about 0.1 ns an element), so a
# second thread pays for its wake-up (~0.1 ms here with passive waiting) only from
# about 1.5 million elements (row pointer + column indices) on. Measured, V = 1e6,
# D = 64, 2 threads vs 1: 4,096 rows 0.31 vs 0.22 ms, 8,192 rows 0.34 vs 0.30,
# 16,384 rows 0.45 vs 0.55, 65,536 rows 1.2 vs 1.8 (remeasured later back to back:
# 0.16-0.19 vs 0.22 at 4,096 rows, but with 10 ms between calls 0.35-0.38 vs 0.29
# at 256 rows of D = 16: kept). Workers that spin (see workers_spin) start at once,
# and a row pointer past L2 (4 MB at V = 1e6) is written twice as fast by two
# cores: D = 16, 256 rows, 1 vs 2 threads, back to back and with 10 ms between
# calls: V = 1e6 0.18 vs 0.084 and 0.27-0.33 vs 0.14-0.15 ms; V = 5e5 0.076 vs
# 0.035 and 0.115 vs 0.081; V = 1e5 0.015 vs 0.010 but 0.018 vs 0.05 with the gaps
# -- so from about half a million elements on; and since the structure is claimed
# in blocks (no barrier at the start of the region), from a quarter million: D =
# 64, back to back, V = 3e5: 256 rows 22.5 vs 17.4 us, 1,024 rows 29 vs 21 (V =
# 1e5, left on one thread: 13 vs 12 and 19 vs 15).
CSR_FILL_GRAIN = 1 << 17 if workers_spin() else 3 << 18


def _index_dtype(num_rows, nnz):
    limit = np.iinfo(np.int32).max
    return np.int32 if max(num_rows, nnz) <= limit else np.int64


def from_rows(rows, data, num_rows):
    """Build the canonical csr_array holding ``data[u]`` in row ``rows[u]`` (its row
    pointer written when first read where it can be: :class:`_DeferredPointerCSR`).

    Parameters
    ----------
    rows : ndarray of shape (n_rows,), int64
        Sorted distinct row ids.
    data : ndarray of shape (n_rows, dim)
        C-contiguous row values; becomes the matrix's ``data`` without a copy.
    num_rows : int
        Number of rows of the matrix.
    """
    n_rows, dim = data.shape
    indices = deferrable_indices(n_rows, dim, num_rows)
    if indices is not None:
        return with_deferred_pointer(rows, data, indices, num_rows)
    indptr, indices, to_fill = structure_arrays(n_rows, dim, num_rows)
    _backward.fill_row_csr(np.ascontiguousarray(rows, dtype=np.int64), num_rows, indptr,
                           to_fill, dim, threads_for(csr_work(num_rows, to_fill), CSR_FILL_GRAIN),
                           stream_indices(to_fill))
    return wrap_rows(rows, data, indptr, indices, num_rows)


def structure_arrays(n_rows, dim, num_rows):
    """``(indptr, indices, to_fill)`` of a (num_rows, dim) matrix storing n_rows full
    rows, in the smallest index dtype scipy accepts for it: an uninitialised row
    pointer, the column indices, and the array the csr kernels are to write them
    into -- ``indices`` itself, or an empty one when ``indices`` is the shared,
    already filled array of :func:`column_indices`."""
    idx_dtype = _index_dtype(num_rows, n_rows * dim)
    indptr = _pool.empty((num_rows + 1,), idx_dtype)
    indices = column_indices(n_rows, dim, idx_dtype)
    if indices is not None:
        return indptr, indices, np.empty(0, dtype=idx_dtype)
    indices = _pool.empty((n_rows * dim,), idx_dtype)
    return indptr, indices, indices


def deferrable_indices(n_rows, dim, num_rows):
    """The column indices of a (num_rows, dim) matrix of n_rows full rows where its
    row pointer can be deferred (see :class:`_DeferredPointerCSR`): the shared
    pattern of :func:`column_indices`, or None (then the csr is built whole)."""
    if _CSR_TEMPLATE is None:
        return None
    idx_dtype = _index_dtype(num_rows, n_rows * dim)
    if n_rows * dim == 0:
        return np.empty(0, dtype=idx_dtype)
    return column_indices(n_rows, dim, idx_dtype)


def csr_work(num_rows, to_fill):
    """Elements the csr kernels write: the row pointer and ``to_fill``."""
    return num_rows + to_fill.shape[0]


def stream_indices(indices):
    """Whether to write ``indices`` with non-temporal stores (see CSR_INDEX_STREAM_BYTES)."""
    return indices.nbytes >= CSR_INDEX_STREAM_BYTES


# Every stored row of a canonical row-sparse matrix of width dim holds the columns
# 0..dim-1, so its column indices are the first n_rows * dim entries of one array of
# that pattern: the gradients share one read-only array per (dim, index dtype)
# instead of each writing its own, as large as its values in float32 (262,144
# uniform ids over 10^6 rows, D = 64: 59 MB written per backward, ~1.4 ms of the
# sparse forward + backward's ~10 on 2 threads). Read-only so that no edit through
# one gradient reaches another: scipy methods that rewrite a matrix's indices in
# place (eliminate_zeros) then raise instead; ``grad.copy()`` owns its arrays.
# A pattern is kept with 1/8 to spare, so that a batch with a few more distinct ids
# does not build a new one; the patterns kept hold at most the output cache's limit
# (``SPARSEMBED_POOL_BYTES``, see ``_pool``) between them, the most recently used
# first; a larger one is not kept (each gradient then writes its own, as before).
_COLUMN_PATTERNS: dict[tuple[int, np.dtype], np.ndarray] = {}


def column_indices(n_rows, dim, idx_dtype):
    """Read-only column indices ``[0, 1, .., dim - 1] * n_rows`` (idx_dtype) shared with
    every other gradient of this width, or None when they would not be kept (see
    ``_COLUMN_PATTERNS``)."""
    need = n_rows * dim
    if need == 0:
        return None
    key = (dim, np.dtype(idx_dtype))
    pattern = _COLUMN_PATTERNS.pop(key, None)
    if pattern is None or pattern.shape[0] < need:
        limit = _pool.stats()["limit"]
        size = (n_rows + n_rows // 8 + 1) * dim
        if size * key[1].itemsize > limit:
            if pattern is not None:
                _COLUMN_PATTERNS[key] = pattern
            return None
        pattern = np.empty(size, dtype=idx_dtype)
        pattern.reshape(-1, dim)[:] = np.arange(dim, dtype=idx_dtype)
        pattern.flags.writeable = False
        kept = size * key[1].itemsize
        for other in list(_COLUMN_PATTERNS):  # dict order: least recently used first
            if kept + sum(p.nbytes for p in _COLUMN_PATTERNS.values()) <= limit:
                break
            del _COLUMN_PATTERNS[other]
    _COLUMN_PATTERNS[key] = pattern  # now the most recently used
    return pattern[:need]


def clear_column_indices():
    """Drop the kept column-index patterns (gradients that use one keep it alive)."""
    _COLUMN_PATTERNS.clear()


def wrap_rows(rows, data, indptr, indices, num_rows):
    """The canonical csr_array of filled structure arrays (see :func:`from_rows`)."""
    dim = data.shape[1]
    out = _canonical_csr(data.reshape(-1), indices, indptr, (num_rows, dim))
    # the row list, so stored_rows() need not scan the O(num_rows) row pointer (an
    # optimizer step would otherwise pay ~1 ms per million rows for it)
    out.__dict__[_ROWS_KEY] = (rows, indptr)
    return out


_ROWS_KEY = "_sparsembed_rows"
_DEFERRED_KEY = "_sparsembed_deferred_pointer"


class _DeferredPointerCSR(sp.csr_array):
    """A canonical row-sparse ``csr_array`` whose row pointer is written when something
    first reads it.

    The row pointer has num_rows + 1 entries whatever the batch: 4 MB at a million
    rows, written by every sparse backward, while a training loop hands the
    gradient to an optimizer that reads only its row list and values. That write
    was most of a small batch's step (V = 1e6, D = 64, 64 ids, SGD: the backward
    143 of the step's 195 us; torch's sparse COO gradient has no such array).
    Reading ``indptr`` (scipy does for nearly everything: ``nnz``, ``toarray``,
    arithmetic, pickling) writes it and turns the object into a plain
    ``csr_array`` (``type(g) is scipy.sparse.csr_array`` from then on); so does
    assigning one. Until then the object is this subclass of ``csr_array``.
    """

    @property
    def indptr(self):
        return _write_deferred_pointer(self)

    @indptr.setter
    def indptr(self, value):
        # in this order: a thread that finds the state gone finds a plain csr_array
        # holding its pointer (see _write_deferred_pointer)
        self.__dict__["indptr"] = value
        self.__class__ = sp.csr_array  # the class has no indptr attribute of its own
        self.__dict__.pop(_DEFERRED_KEY, None)

    def __reduce_ex__(self, protocol):  # pickle, copy, deepcopy: a plain csr_array
        _write_deferred_pointer(self)
        return sp.csr_array.__reduce_ex__(self, protocol)

    def _getnnz(self, axis=None):
        # ``nnz`` (often logged) is the pointer's last entry: known without writing
        # the pointer, whose (num_rows + 1) entries would cost memory growing with V
        state = self.__dict__.get(_DEFERRED_KEY)
        if axis is None and state is not None:
            return state[0].shape[0] * state[3][1]
        return super()._getnnz(axis)


def with_deferred_pointer(rows, data, indices, num_rows):
    """The canonical csr_array holding ``data[u]`` in row ``rows[u]`` (sorted distinct)
    with these column indices (:func:`deferrable_indices`), its row pointer left to
    :class:`_DeferredPointerCSR`."""
    out = sp.csr_array.__new__(_DeferredPointerCSR)
    out.__dict__.update(_CSR_TEMPLATE)
    flat = data.reshape(-1)
    shape = (int(num_rows), int(data.shape[1]))
    out.__dict__.update(data=flat, indices=indices, _shape=shape)
    # a read-only view: the kernel that writes the pointer trusts these to be sorted,
    # distinct and in range, and callers of row_values get this array
    rows = np.ascontiguousarray(rows, dtype=np.int64).view()
    rows.flags.writeable = False
    out.__dict__[_DEFERRED_KEY] = (rows, flat, indices, shape)
    return out


def _write_deferred_pointer(mat):
    """Write ``mat``'s row pointer and make it a plain csr_array; returns the pointer."""
    state = mat.__dict__.get(_DEFERRED_KEY)
    if state is None:  # another thread got here first
        return mat.__dict__["indptr"]
    rows, _, indices, (num_rows, dim) = state  # not _shape, which a user may assign
    indptr = _pool.empty((num_rows + 1,), indices.dtype)
    _backward.fill_row_csr(rows, num_rows, indptr, np.empty(0, indices.dtype), dim,
                           threads_for(num_rows + 1, CSR_FILL_GRAIN), False)
    mat.__dict__[_ROWS_KEY] = (rows, indptr)
    mat.indptr = indptr
    return indptr


def _deferred_rows(mat):
    """The row list of a gradient whose row pointer is still deferred and whose data,
    column indices and canonical flags are still the ones it was made with (edits in
    place included: as with a built pointer, the values are read as they are), or
    None."""
    if type(mat) is not _DeferredPointerCSR:
        return None
    d = mat.__dict__
    state = d.get(_DEFERRED_KEY)
    if (state is None or d.get("data") is not state[1] or d.get("indices") is not state[2]
            or d.get("_shape") != state[3] or not flagged_canonical(mat)):
        return None
    return state[0]


def flagged_canonical(mat):
    """Whether the matrix's own flags say canonical (sorted, no duplicates, columns in
    range): read from the instance, never through scipy's (or cupyx's) properties,
    which compute an unknown flag by reading the structure with compiled code before
    anything has checked it. A has_sorted_indices set False after an edit overrides
    the canonical one, as in scipy's has_canonical_format."""
    flags = mat.__dict__
    return bool(flags.get("_has_canonical_format", False)) \
        and bool(flags.get("_has_sorted_indices", True))

# The attributes scipy's csr_array constructor sets, all of them plain values. Where
# this scipy sets exactly these (checked once, below), a canonical matrix is made by
# filling them in: the constructor's checks (index dtypes, shape, prune) take ~13 us,
# a quarter of a small batch's whole forward + backward (16 ids: 53 us, torch 38 us).
_CSR_ATTRS = frozenset({"_shape", "data", "indices", "indptr", "maxprint",
                        "_has_sorted_indices", "_has_canonical_format"})


def _canonical_csr_checked(data, indices, indptr, shape):
    """The canonical csr_array of these parts, through scipy's constructor."""
    out = sp.csr_array((data, indices, indptr), shape=shape, copy=False)
    out.has_sorted_indices = True
    out.has_canonical_format = True
    return out


def _canonical_csr_direct(data, indices, indptr, shape, template):
    """The same matrix, its attributes filled in (see _CSR_ATTRS): ``template`` holds
    the ones that do not depend on the parts."""
    out = sp.csr_array.__new__(sp.csr_array)
    out.__dict__.update(template)
    out.data = data
    out.indices = indices
    out.indptr = indptr
    out._shape = (int(shape[0]), int(shape[1]))
    return out


def _direct_csr_template():
    """The attributes a direct build copies (maxprint and the two format flags), or
    None when this scipy's constructor sets other attributes or the direct build
    does not reproduce its matrix exactly."""
    try:
        parts = (np.array([1.0, 2.0, 3.0, 4.0], np.float32), np.array([0, 1, 0, 1], np.int32),
                 np.array([0, 0, 2, 2, 4], np.int32))
        ref = _canonical_csr_checked(*parts, (4, 2))
        if set(ref.__dict__) != _CSR_ATTRS:
            return None
        template = {k: v for k, v in ref.__dict__.items()
                    if k not in ("data", "indices", "indptr", "_shape")}
        got = _canonical_csr_direct(*parts, (4, 2), template)
        same = (type(got) is type(ref) and got.shape == ref.shape and got.nnz == ref.nnz
                and got.has_canonical_format and got.has_sorted_indices
                and np.array_equal(got.toarray(), ref.toarray())
                and np.array_equal(got @ np.ones(2, np.float32), ref @ np.ones(2, np.float32)))
        return template if same else None
    except Exception:  # any change in scipy's internals: use the constructor
        return None


_CSR_TEMPLATE = _direct_csr_template()


def _canonical_csr(data, indices, indptr, shape):
    """csr_array of canonical parts (sorted distinct rows, full rows, columns in order),
    flagged canonical: built directly where the check above passed, else through
    scipy's constructor."""
    if _CSR_TEMPLATE is not None:
        return _canonical_csr_direct(data, indices, indptr, shape, _CSR_TEMPLATE)
    return _canonical_csr_checked(data, indices, indptr, shape)


def checked_csr(mat, what="gradient"):
    """A scipy.sparse matrix (a gradient, or a bag input) as a csr matrix whose
    structure is safe to read.

    scipy trusts a matrix's arrays (they can be replaced or edited after it was
    built), and its compiled conversions read them unchecked. A csr matrix is
    returned as it is after O(1) checks of its row pointer (length, first and last
    entry; the rest is checked where it is read: :func:`stored_rows`,
    :func:`row_values`); any other format is checked in full, then converted.

    Raises
    ------
    ValueError
        Naming what does not fit the matrix's shape (the matrix is left unchanged);
        messages call it "the ``what``".
    """
    fmt = mat.format
    if fmt == "csr":
        _check_compressed(mat, "row", False, what)
        return mat
    if fmt == "csc":
        _check_compressed(mat, "column", True, what)
        return sp.csr_array(mat)
    if fmt == "coo":
        _check_coords(mat, what)
        return sp.csr_array(mat)
    if fmt == "bsr":  # scipy's compiled conversions read these unchecked
        _check_blocks(mat, what)
    elif fmt == "lil":
        _check_lists(mat, what)
    out = sp.csr_array(mat)  # dia, dok: converted by numpy code
    _check_compressed(out, "row", True, what)
    return out


def _check_blocks(mat, what):
    """A bsr matrix's block structure fits its shape and arrays: the checks of
    :func:`_check_compressed` on its block rows (scipy's own check_format skips them
    when the matrix has no stored block, and its conversion then walks the pointer)."""
    data = mat.data
    shape = mat.shape
    if not (isinstance(data, np.ndarray) and data.ndim == 3 and data.shape[1] >= 1
            and data.shape[2] >= 1 and shape[0] % data.shape[1] == 0
            and shape[1] % data.shape[2] == 0):
        raise ValueError(f"the {what}'s data must be a 3-D ndarray of blocks that tile its "
                         f"shape {shape}, got {type(data).__name__} of shape "
                         f"{getattr(data, 'shape', '?')}")
    r, c = data.shape[1:]
    # the block grid, as a compressed matrix of one value per block
    blocks = types.SimpleNamespace(shape=(shape[0] // r, shape[1] // c), indptr=mat.indptr,
                                   indices=mat.indices, data=data[:, 0, 0])
    _check_compressed(blocks, "block row", True, what)


def _check_lists(mat, what):
    """A lil matrix holds one list of columns and one of values per row, of one length
    (scipy's conversion sizes its arrays by the columns and copies the values into
    them unchecked: a longer list of values writes past their end)."""
    n = mat.shape[0]
    rows, data = mat.rows, mat.data
    for name, lists in (("rows", rows), ("data", data)):
        if not (isinstance(lists, np.ndarray) and lists.shape == (n,)
                and all(isinstance(x, list) for x in lists)):
            raise ValueError(f"the {what}'s {name} must be an object array of {n} lists")
    for i, (cols, values) in enumerate(zip(rows, data)):
        if len(cols) != len(values):
            raise ValueError(f"the {what}'s row {i} lists {len(cols)} columns but "
                             f"{len(values)} values")


def entries_by_row(mat, what="sparse input"):
    """(csr, data_order): ``mat`` as a csr matrix whose entries are ``mat``'s stored
    entries grouped by row, each row's in their order in ``mat`` (duplicates kept),
    and ``data_order[i]`` the csr position of ``mat.data[i]`` (None when the entries
    are those of ``mat.data`` in order: a csr matrix, or a format with no flat data).

    An EmbeddingBag batch given as a csc or coo matrix: the per-sample weights'
    gradient is returned aligned with the matrix's own data. (scipy's conversion
    orders each row by column and sums a coo matrix's duplicates.) Structure checked
    as :func:`checked_csr` checks it.
    """
    fmt = mat.format
    if fmt == "csc":
        _check_compressed(mat, "column", True, what)
        nnz = int(mat.indptr[-1])
        row = np.asarray(mat.indices[:nnz], dtype=np.int64)
        col = np.repeat(np.arange(mat.shape[1], dtype=np.int64), np.diff(mat.indptr))
        data = mat.data[:nnz]
    elif fmt == "coo":
        _check_coords(mat, what)
        row = np.asarray(mat.row, dtype=np.int64)
        col = np.asarray(mat.col, dtype=np.int64)
        data = mat.data
    else:
        return checked_csr(mat, what), None
    order = np.argsort(row, kind="stable")
    indptr = np.zeros(mat.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=mat.shape[0]), out=indptr[1:])
    csr = sp.csr_array((data[order], col[order], indptr), shape=mat.shape)
    data_order = np.empty_like(order)
    data_order[order] = np.arange(order.shape[0], dtype=order.dtype)
    return csr, data_order


def _is_vector(a):
    """A 1-D numpy or CuPy array (duck-typed: either module's ndarray)."""
    return getattr(a, "ndim", None) == 1 and hasattr(a, "dtype") and hasattr(a, "shape")


def _int_vector(a, name, what):
    if not _is_vector(a) or a.dtype.kind not in "iu":
        raise ValueError(f"the {what}'s {name} must be a 1-D integer ndarray, got "
                         f"{type(a).__name__} {getattr(a, 'dtype', '')} of shape "
                         f"{getattr(a, 'shape', '?')}")
    return a


def _check_compressed(mat, major, full, what="gradient", xp=np):
    """``mat`` (csr: ``major`` = "row", csc: "column") has a row pointer that fits its
    shape and its arrays; with ``full`` also a non-decreasing one and minor indices
    in range (O(rows + nnz)). ``xp``: the array module of the matrix (numpy, or CuPy
    for the GPU backend's matrices, which cupyx does not recheck either)."""
    n_major, n_minor = mat.shape[::-1] if major == "column" else mat.shape
    indptr = _int_vector(mat.indptr, f"{major} pointer (indptr)", what)
    indices = _int_vector(mat.indices, "indices", what)
    data = mat.data
    if not _is_vector(data):
        raise ValueError(f"the {what}'s data must be a 1-D ndarray, got "
                         f"{type(data).__name__} of shape {getattr(data, 'shape', '?')}")
    if indptr.shape[0] != n_major + 1:
        raise ValueError(f"the {what}'s {major} pointer has {indptr.shape[0]} entries, "
                         f"expected {n_major + 1} for its shape {mat.shape}")
    first, last = int(indptr[0]), int(indptr[-1])
    if first != 0 or last > min(indices.shape[0], data.shape[0]):
        raise ValueError(f"the {what}'s {major} pointer runs from {first} to {last}, "
                         f"expected 0 to at most {min(indices.shape[0], data.shape[0])} "
                         f"(its indices / data lengths)")
    if full:
        _check_pointer_order(indptr, major, what, xp)
        used = indices[:last]
        if used.size and (int(used.min()) < 0 or int(used.max()) >= n_minor):
            bad = used[(used < 0) | (used >= n_minor)][0]
            raise ValueError(f"the {what} holds index {int(bad)}, outside [0, {n_minor})")


def _check_pointer_order(indptr, major, what="gradient", xp=np):
    """ValueError where ``indptr`` decreases; returns its steps (the row lengths).

    Neighbours are compared, not the steps' signs: in a narrow integer type a drop
    of more than half its range wraps to a positive step (int16: 30000 -> -30000 is
    +5536), which scipy's compiled conversions then take for a row length. The
    callers have checked that ``indptr`` starts at 0, so once it never decreases its
    steps fit its type."""
    down = indptr[1:] < indptr[:-1]
    if down.size and bool(down.any()):
        at = int(xp.flatnonzero(down)[0])
        raise ValueError(f"the {what}'s {major} pointer decreases at {major} {at} "
                         f"({int(indptr[at])} -> {int(indptr[at + 1])})")
    return xp.diff(indptr)


def _check_coords(mat, what):
    row = _int_vector(mat.row, "row indices", what)
    col = _int_vector(mat.col, "column indices", what)
    data = mat.data
    if not (_is_vector(data) and row.shape[0] == col.shape[0] == data.shape[0]):
        raise ValueError(f"the {what}'s row indices, column indices and data must be 1-D "
                         "arrays of one length")
    for name, idx, bound in (("row", row, mat.shape[0]), ("column", col, mat.shape[1])):
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= bound):
            bad = idx[(idx < 0) | (idx >= bound)][0]
            raise ValueError(f"the {what} holds {name} index {int(bad)}, outside [0, {bound})")


def stored_rows(mat):
    """Sorted ids of the non-empty rows of a csr matrix (see :func:`checked_csr`).

    A matrix built by :func:`from_rows` carries its row list; it is used when the
    matrix still has the same row pointer array and that array still says exactly
    those rows hold entries (checked in O(rows): their lengths add up to nnz, so no
    other row can hold any). Otherwise the row pointer is checked and scanned.
    """
    deferred = _deferred_rows(mat)
    if deferred is not None:
        return deferred
    indptr = mat.indptr
    cached = mat.__dict__.get(_ROWS_KEY)
    if cached is not None and cached[1] is indptr and _backward.rows_hold_all(indptr, cached[0]):
        return cached[0]
    return np.flatnonzero(_check_pointer_order(indptr, "row"))


def row_values(mat):
    """(rows, values) of a row-sparse scipy.sparse matrix; values has shape
    (n_rows, dim).

    Works for any sparse matrix (canonical csr ones are read without a copy; the
    others are checked, :func:`checked_csr`); duplicates are summed and missing
    entries are zeros.
    """
    rows = _deferred_rows(mat)
    if rows is not None:  # its structure is this module's own, unread so far
        return rows, mat.data[:rows.shape[0] * mat.shape[1]].reshape(rows.shape[0], mat.shape[1])
    mat = checked_csr(mat)
    n_rows_total, dim = mat.shape
    rows = stored_rows(mat)
    nnz = int(mat.indptr[-1])
    if nnz == rows.size * dim and _is_full_rows(mat, rows, dim, nnz):
        return rows, mat.data[:nnz].reshape(rows.size, dim)
    _check_compressed(mat, "row", full=True)  # scipy's tocoo reads it unchecked
    coo = mat.tocoo()
    values = np.zeros((rows.size, dim), dtype=mat.dtype)
    np.add.at(values, (np.searchsorted(rows, coo.row), coo.col), coo.data)
    return rows, values


def _is_full_rows(mat, rows, dim, nnz):
    """Whether every stored row holds the columns 0..dim-1 in order (the caller has
    checked ``nnz == rows.size * dim``)."""
    if rows.size == 0:
        return True
    if flagged_canonical(mat):
        # scipy's own flags (set by from_rows, trusted as scipy trusts them): sorted,
        # no duplicates, columns in [0, dim); with nnz == rows * dim each stored row
        # then holds exactly the dim columns -- no O(nnz) scan needed
        return True
    # compared here, not through scipy's has_sorted_indices, which reads the
    # structure with compiled code before anything has checked it
    cols = mat.indices[:nnz].reshape(rows.size, dim)
    return bool((cols == np.arange(dim, dtype=cols.dtype)).all())


def add(a, b):
    """Sum of two row-sparse matrices, canonical, explicit zeros kept.

    One merge of the two sorted row lists, then one parallel pass that writes each
    row of the result once (``a``'s row + ``b``'s row, or a copy of the one that
    exists): O(rows x dim), no sort. Each element is one addition ``a + b``, so the
    result does not depend on the thread count.
    """
    rows_a, va = row_values(a)
    rows_b, vb = row_values(b)
    dtype = np.result_type(va.dtype, vb.dtype)
    rows_a = np.ascontiguousarray(rows_a, dtype=np.int64)
    rows_b = np.ascontiguousarray(rows_b, dtype=np.int64)
    cap = rows_a.size + rows_b.size
    # from the output cache: three new 2 MB arrays (two gradients of ~130,000 rows)
    # cost more in page faults than the merge itself (1.5 ms against 1.0)
    rows, from_a, from_b = (_pool.empty((cap,), np.int64) for _ in range(3))
    n = _backward.merge_rows(rows_a, rows_b, rows, from_a, from_b)
    from_a, from_b = from_a[:n], from_b[:n]
    dim = a.shape[1]
    if dtype in (np.float32, np.float64):
        values = _pool.empty((n, dim), dtype)
        _backward.add_merged_rows(np.ascontiguousarray(va, dtype=dtype),
                                  np.ascontiguousarray(vb, dtype=dtype),
                                  from_a, from_b, values, threads_for(n * dim),
                                  values.nbytes >= ROW_SUMS_STREAM_BYTES)
    else:  # a grad set by hand (integers): numpy, on the same merge
        values = np.zeros((n, dim), dtype=dtype)
        values[from_a >= 0] += va[from_a[from_a >= 0]]
        values[from_b >= 0] += vb[from_b[from_b >= 0]]
    return from_rows(rows[:n], values, a.shape[0])
