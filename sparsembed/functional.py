"""Stateless forms of the layer operations (torch.nn.functional's names).

Input validation lives on this boundary: every check runs before a kernel writes,
so an error leaves the weights untouched.
"""

import numpy as np

from sparsembed import _validation as V
from sparsembed._backend import backend_of

__all__ = ["embedding", "embedding_backward", "embedding_renorm_"]


def _grad_dtype(dtype):
    # float64 keeps its precision; everything else accumulates in float32
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _weight(weight):
    be = backend_of(weight)
    be.check_weight(weight)
    return be


def lookup_ids(input, num_embeddings, be):
    """Validated (ids with input's shape, flat ids) for a table of ``num_embeddings`` rows."""
    idx = be.as_index_array(input)
    flat = idx.reshape(-1)
    be.check_index_range(flat, num_embeddings)
    return idx, flat


def renorm_(weight, plan, max_norm, norm_type, padding_idx, be):
    """Renormalise every row the planned batch references (padding row included, as torch)."""
    rows = plan.rows
    if plan.skipped:
        rows = be.xp.sort(be.xp.concatenate([rows, be.xp.asarray([padding_idx], dtype=rows.dtype)]))
    if weight.flags.c_contiguous:
        be.renorm_rows_(weight, rows, max_norm, norm_type)
    else:
        contiguous = be.xp.ascontiguousarray(weight)
        be.renorm_rows_(contiguous, rows, max_norm, norm_type)
        weight[rows] = contiguous[rows]


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
              scale_grad_by_freq=False, sparse=False):
    """Look up rows of ``weight``: ``weight[input]``.

    Parameters
    ----------
    input : array_like of int, any shape
        Row ids in ``[0, num_embeddings)``; any integer dtype.
    weight : ndarray of shape (num_embeddings, embedding_dim), float32 or float64
        The table. Renormalised in place when ``max_norm`` is given.
    padding_idx : int, optional
        Accepted for torch compatibility; it only matters for the gradient.
    max_norm : float, optional
        Referenced rows whose ``norm_type``-norm exceeds it are scaled in place by
        ``max_norm / (norm + 1e-7)`` before the lookup. Must be > 0.
    norm_type : float, default 2.0
        The p of the norm: any real, ``inf``, ``-inf``, 0 (count of non-zeros) or
        negative p included.
    scale_grad_by_freq, sparse : bool
        Accepted for torch compatibility; they only matter for the gradient
        (:func:`embedding_backward`).

    Returns
    -------
    ndarray of shape ``input.shape + (embedding_dim,)``, weight's dtype
        A new array.

    Raises
    ------
    TypeError
        ``input`` is not an integer array.
    IndexError
        An id is out of range: the message names it and its position; nothing is
        written.
    """
    be = _weight(weight)
    num_embeddings = weight.shape[0]
    padding_idx = V.normalize_padding_idx(padding_idx, num_embeddings)
    max_norm, norm_type = V.check_max_norm(max_norm, norm_type)
    idx, flat = lookup_ids(input, num_embeddings, be)
    if max_norm is not None:
        be.check_writable(weight)
        plan = be.plan_rows(flat, num_embeddings)
        renorm_(weight, plan, max_norm, norm_type, None, be)
    table = weight if weight.flags.c_contiguous else be.xp.ascontiguousarray(weight)
    return be.gather(table, flat).reshape(idx.shape + (weight.shape[1],))


def embedding_backward(grad_output, input, num_embeddings, padding_idx=None,
                       scale_grad_by_freq=False, sparse=False):
    """Gradient of :func:`embedding` with respect to the table.

    Parameters
    ----------
    grad_output : ndarray of shape ``input.shape + (embedding_dim,)``
        Gradient of the loss w.r.t. the lookup's output. float64 stays float64;
        other dtypes are accumulated in float32.
    input : array_like of int
        The ids of the forward.
    num_embeddings : int
        Rows of the table.
    padding_idx : int, optional
        This row gets no gradient (negative values count from the end).
    scale_grad_by_freq : bool, default False
        Divide each row's sum by how often its id occurs in ``input``.
    sparse : bool, default False
        Return a canonical ``scipy.sparse.csr_array`` instead of a dense array.

    Returns
    -------
    ndarray of shape (num_embeddings, embedding_dim), or csr_array of that shape
        The dense gradient, or the row-sparse one whose non-empty rows are exactly
        the sorted distinct ids other than ``padding_idx``, each a full row
        (explicit zeros kept).
    """
    num_embeddings = V.check_size(num_embeddings, "num_embeddings")
    padding_idx = V.normalize_padding_idx(padding_idx, num_embeddings)
    be = backend_of(grad_output)
    idx, flat = lookup_ids(input, num_embeddings, be)
    g = be.xp.asarray(grad_output)
    if g.ndim != idx.ndim + 1:
        raise ValueError(
            f"grad_output has shape {g.shape}, expected {idx.shape} + (embedding_dim,)"
        )
    grad = be.as_grad_output(g, idx.shape + (g.shape[-1],), _grad_dtype(g.dtype))
    plan = be.plan_rows(flat, num_embeddings, padding_idx)
    return weight_grad(grad.reshape(flat.shape[0], g.shape[-1]), plan, num_embeddings,
                       scale_grad_by_freq, sparse, be)


def weight_grad(grad2d, plan, num_embeddings, scale_grad_by_freq, sparse, be):
    """Dense or row-sparse table gradient from (n, dim) output rows and the batch's plan."""
    if sparse:
        return be.sparse_grad(grad2d, plan, num_embeddings, scale_grad_by_freq)
    return be.dense_grad(grad2d, plan, num_embeddings, scale_grad_by_freq)


def embedding_renorm_(weight, input, max_norm, norm_type=2.0):
    """torch's ``embedding_renorm_``: rescale, in place, the referenced rows whose
    ``norm_type``-norm exceeds ``max_norm`` by ``max_norm / (norm + 1e-7)``.

    Parameters
    ----------
    weight : ndarray of shape (num_embeddings, embedding_dim), writable
    input : array_like of int
        Ids whose rows are checked; duplicates are renormalised once.
    max_norm : float
        Must be > 0.
    norm_type : float, default 2.0

    Returns
    -------
    weight : the same array, modified in place
    """
    be = _weight(weight)
    if max_norm is None:
        raise ValueError("max_norm must be > 0, got None")
    max_norm, norm_type = V.check_max_norm(max_norm, norm_type)
    _, flat = lookup_ids(input, weight.shape[0], be)
    be.check_writable(weight)
    renorm_(weight, be.plan_rows(flat, weight.shape[0]), max_norm, norm_type, None, be)
    return weight
