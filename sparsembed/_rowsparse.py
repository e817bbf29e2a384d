"""Row-sparse gradients as canonical ``scipy.sparse.csr_array``.

Canonical here means: the non-empty rows are sorted and distinct, each stored as a
full row of ``dim`` entries (explicit zeros kept), column indices ``0..dim-1`` in
order. scipy's own ``+`` drops explicit zeros, so accumulation goes through
:func:`add` instead.
"""

import numpy as np
import scipy.sparse as sp

from sparsembed._kernels import _backward, _pool
from sparsembed._threads import threads_for


def _index_dtype(num_rows, nnz):
    limit = np.iinfo(np.int32).max
    return np.int32 if max(num_rows, nnz) <= limit else np.int64


def from_rows(rows, data, num_rows):
    """Build the canonical csr_array holding ``data[u]`` in row ``rows[u]``.

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
    idx_dtype = _index_dtype(num_rows, n_rows * dim)
    indptr = _pool.empty((num_rows + 1,), idx_dtype)
    indices = _pool.empty((n_rows * dim,), idx_dtype)
    _backward.fill_row_csr(np.ascontiguousarray(rows, dtype=np.int64), num_rows, indptr,
                           indices, dim, threads_for(num_rows + n_rows * dim))
    out = sp.csr_array((data.reshape(-1), indices, indptr), shape=(num_rows, dim), copy=False)
    out.has_sorted_indices = True
    out.has_canonical_format = True
    return out


def stored_rows(mat):
    """Sorted ids of the non-empty rows of a csr matrix."""
    indptr = mat.indptr
    return np.flatnonzero(indptr[1:] != indptr[:-1])


def row_values(mat):
    """(rows, values) of a row-sparse csr matrix; values has shape (n_rows, dim).

    Works for any csr matrix (canonical ones are read without a copy); duplicates
    are summed and missing entries are zeros.
    """
    n_rows_total, dim = mat.shape
    rows = stored_rows(mat)
    if mat.nnz == rows.size * dim and _is_full_rows(mat, rows, dim):
        return rows, mat.data.reshape(rows.size, dim)
    coo = mat.tocoo()
    values = np.zeros((rows.size, dim), dtype=mat.dtype)
    np.add.at(values, (np.searchsorted(rows, coo.row), coo.col), coo.data)
    return rows, values


def _is_full_rows(mat, rows, dim):
    """Whether every stored row holds the columns 0..dim-1 in order (the caller has
    checked ``nnz == rows.size * dim``)."""
    if rows.size == 0:
        return True
    if mat.__dict__.get("_has_canonical_format", False):
        # scipy's own flag (set by from_rows, trusted as scipy trusts it): sorted,
        # no duplicates, columns in [0, dim); with nnz == rows * dim each stored row
        # then holds exactly the dim columns -- no O(nnz) scan needed
        return True
    if not mat.has_sorted_indices:
        return False
    cols = mat.indices.reshape(rows.size, dim)
    return bool((cols == np.arange(dim, dtype=cols.dtype)).all())


def add(a, b):
    """Sum of two row-sparse matrices, canonical, explicit zeros kept."""
    rows_a, va = row_values(a)
    rows_b, vb = row_values(b)
    rows = np.union1d(rows_a, rows_b)
    dtype = np.result_type(va.dtype, vb.dtype)
    values = np.zeros((rows.size, a.shape[1]), dtype=dtype)
    values[np.searchsorted(rows, rows_a)] += va
    values[np.searchsorted(rows, rows_b)] += vb
    return from_rows(rows.astype(np.int64, copy=False), values, a.shape[0])
