"""Stateless forms of the layer operations (torch.nn.functional's names).

Input validation lives on this boundary: every check runs before a kernel writes,
so an error leaves the weights untouched.
"""

import numpy as np

from sparsembed import _bags, _half
from sparsembed import _validation as V
from sparsembed._backend import backend_of
from sparsembed._kernels import _lookup

__all__ = ["embedding", "embedding_backward", "embedding_renorm_", "embedding_bag",
           "embedding_bag_backward"]


def _grad_dtype(dtype):
    # float64 keeps its precision; everything else accumulates in float32
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _weight(weight):
    be = backend_of(weight)
    be.check_weight(weight)
    return be


def lookup_ids(input, be, num_rows):
    """(ids with input's shape, flat ids) for a table of ``num_rows`` rows. Not
    range-checked here (but for ids past int64): the kernel that reads them first
    (the gather or the plan) checks each id on the way and names the first bad one."""
    idx = be.as_index_array(input, "input", num_rows)
    return idx, idx.reshape(-1)


def renorm_(weight, plan, max_norm, norm_type, padding_idx, be):
    """Renormalise every row the planned batch references (padding row included, as torch)."""
    rows = plan.rows
    if plan.skipped:
        rows = be.xp.sort(be.xp.concatenate([rows, be.xp.asarray([padding_idx], dtype=rows.dtype)]))
    if weight.flags.c_contiguous:
        be.renorm_rows_(weight, rows, max_norm, norm_type)
    else:  # the referenced rows only (see compact_rows)
        named = be.xp.ascontiguousarray(weight[rows])
        be.renorm_rows_(named, be.xp.arange(rows.shape[0], dtype=rows.dtype), max_norm,
                        norm_type)
        weight[rows] = named


def compact_rows(weight, flat, padding_idx, be):
    """``(table, flat, padding_idx)`` for the kernels, which read C-contiguous tables.

    A table that is not C-contiguous (a Fortran-order array, a strided view; a
    column slice too, except for the lookup, which reads one in place: see
    :func:`_rows_in_place`) gives a C-contiguous copy of only the rows ``flat`` names,
    with the ids and the padding row renumbered into it (None where ``flat`` holds
    no padding): the same values as a copy of the whole table, for memory that grows
    with the batch (torch reads a strided table in place). ``flat`` is range-checked
    here.
    """
    if weight.flags.c_contiguous:
        return weight, flat, padding_idx
    xp = be.xp
    be.check_index_range(flat, weight.shape[0])
    rows, local = xp.unique(flat, return_inverse=True)
    if padding_idx is not None:
        # (CuPy's searchsorted takes arrays only)
        at = int(xp.searchsorted(rows, xp.asarray([padding_idx], dtype=rows.dtype))[0])
        padding_idx = at if at < rows.shape[0] and int(rows[at]) == padding_idx else None
    return (xp.ascontiguousarray(weight[rows]), local.reshape(-1).astype(np.int64),
            padding_idx)


def _rows_in_place(weight):
    """Whether the lookup reads ``weight`` where it is: C-contiguous, or a host
    float32 / float64 table whose rows are each contiguous and do not overlap (a
    column slice of a wider table); the other layouts go through
    :func:`compact_rows`."""
    if weight.flags.c_contiguous:
        return True
    return (isinstance(weight, np.ndarray) and weight.dtype in (np.float32, np.float64)
            and _lookup.rows_apart(weight))


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
              scale_grad_by_freq=False, sparse=False):
    """Look up rows of ``weight``: ``weight[input]``.

    Parameters
    ----------
    input : array_like of int, any shape
        Row ids in ``[0, num_embeddings)``; any integer dtype.
    weight : ndarray of shape (num_embeddings, embedding_dim), float32 or float64
        The table. Renormalised in place when ``max_norm`` is given. float16 tables
        work too: the renorm is computed in float32 and rounded once. Any layout: a
        column slice of a wider table is read in place, as a C-contiguous table is;
        other layouts (Fortran order, strided columns, float16 slices) have only the
        rows named copied per call, not the whole table.
    padding_idx : int, optional
        Accepted for torch compatibility; it only matters for the gradient.
    max_norm : float, optional
        Referenced rows whose ``norm_type``-norm exceeds it are scaled in place by
        ``max_norm / (norm + 1e-7)`` before the lookup. Must be > 0. The norm is
        computed in float64: a float32 row whose norm overflows float32 (entries
        near 3e38, or a large p) is still scaled to ``max_norm``, where torch's
        float32 norm becomes inf and the row is zeroed. A row holding a NaN has a
        NaN norm and is left as it is (as in torch).
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
    # the lookup checks the ids itself, and so does the plan that renorm needs first
    renorm = max_norm is not None
    idx, flat = lookup_ids(input, be, num_embeddings)
    if renorm:
        plan = be.plan_rows(flat, num_embeddings, check_range=True)
        be.check_writable(weight)
        renorm_(weight, plan, max_norm, norm_type, None, be)
    table, ids = ((weight, flat) if _rows_in_place(weight)
                  else compact_rows(weight, flat, None, be)[:2])
    return be.gather(table, ids, check_range=not renorm and table is weight).reshape(
        idx.shape + (weight.shape[1],))


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
        Return a canonical ``scipy.sparse.csr_array`` instead of a dense array (its
        column indices are a read-only array shared by gradients of the same width;
        ``.copy()`` owns its arrays). Its row pointer (num_embeddings + 1 entries,
        whatever the batch) is written when something first reads it (scipy does for
        nearly everything; sparsembed's optimizers do not): until then the object is
        a subclass of ``csr_array``, from then on a plain one.

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
    idx, flat = lookup_ids(input, be, num_embeddings)
    g = be.xp.asarray(grad_output)
    if g.ndim != idx.ndim + 1:
        raise ValueError(
            f"grad_output has shape {g.shape}, expected {idx.shape} + (embedding_dim,)"
        )
    grad = be.as_grad_output(g, idx.shape + (g.shape[-1],), _grad_dtype(g.dtype))
    grad2d = grad.reshape(flat.shape[0], g.shape[-1])
    if not sparse:
        return be.dense_grad_of_ids(grad2d, flat, num_embeddings, padding_idx, scale_grad_by_freq)
    plan = be.plan_rows(flat, num_embeddings, padding_idx, check_range=True)
    return weight_grad(grad2d, plan, num_embeddings, scale_grad_by_freq, sparse, be)


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
    _, flat = lookup_ids(input, be, weight.shape[0])
    plan = be.plan_rows(flat, weight.shape[0], check_range=True)
    be.check_writable(weight)
    renorm_(weight, plan, max_norm, norm_type, None, be)
    return weight


# ---------------------------------------------------------------- EmbeddingBag

def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2.0,
                  scale_grad_by_freq=False, mode="mean", sparse=False,
                  per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """Pooled lookups: the sum, mean or element-wise max of each bag's rows.

    torch's ``F.embedding_bag`` (CPU) semantics.

    Parameters
    ----------
    input : array_like of int, or scipy.sparse matrix
        1-D ids with ``offsets``, or 2-D ids of shape (n_bags, bag_len) (one bag per
        row, ``offsets=None``); int32 and int64 are used as they are, other integer
        dtypes converted once. A scipy.sparse matrix is a batch of bags: rows are
        bags, column indices the ids, data the per-sample weights in mode "sum" (in
        modes "mean" and "max" its data must all be 1). Each bag pools its row's
        stored entries in their order in the matrix (csr, csc, coo; duplicates are
        entries of their own, as repeated ids in a 1-D bag); other formats are taken
        as ``tocsr()`` gives them.
    weight : ndarray of shape (num_embeddings, embedding_dim), float32 or float64
        The table. Renormalised in place when ``max_norm`` is given. A float16 table
        is pooled in float32 (per-sample weights too) and the result rounded once to
        float16: the same bits as torch 2.13 CPU for sum, but torch rounds a mean's
        sum to float16 before dividing (100 entries of 1000.0: inf there). Any
        layout, as for :func:`embedding`.
    offsets : array_like of int of shape (n_bags,), optional
        Start of each bag in a 1-D ``input``: ``offsets[0] == 0``, non-decreasing,
        ``offsets[-1] <= len(input)``; bag ``b`` is ``input[offsets[b]:offsets[b+1]]``,
        the last one runs to the end of ``input``. Any integer dtype, independent of
        ``input``'s. Empty offsets mean no bags (torch's behaviour).
    max_norm : float, optional
        Rows referenced by ``input`` (padding included, as torch) whose
        ``norm_type``-norm exceeds it are rescaled in place by
        ``max_norm / (norm + 1e-7)`` before pooling. Must be > 0.
    norm_type : float, default 2.0
    scale_grad_by_freq : bool, default False
        Only matters for the gradient (:func:`embedding_bag_backward`).
    mode : {"sum", "mean", "max"}, default "mean"
        Max takes each column's largest value; as torch's, it keeps the first of
        equal values and skips a NaN that comes after a number (a column's leading
        NaN stays: [5, nan] gives 5, [nan, 5] gives nan).
    sparse : bool, default False
        Only matters for the gradient (:func:`embedding_bag_backward`).
    per_sample_weights : array_like of float, same shape as ``input``, optional
        Mode "sum" only: each entry's row is multiplied by its weight.
    include_last_offset : bool, default False
        ``offsets`` has n_bags + 1 entries, the last one the end of the last bag
        (entries past it belong to no bag and are ignored, but their ids are still
        range-checked: an IndexError). torch documents that the last offset must
        equal the input's length and, when it does not, 2.13 CPU is not consistent:
        float32 sum ignores such entries, float32 mean leaves them out of the sum
        but counts them, float32 max and float64 add them to the last bag.
        Ignored for a scipy.sparse input, whose row pointer bounds every bag
        already.
    padding_idx : int, optional
        Entries equal to it are left out of the reduction and of the mean's count.

    Returns
    -------
    ndarray of shape (n_bags, embedding_dim), weight's dtype
        Empty bags, and bags of padding only, give zeros in every mode.

    Raises
    ------
    ValueError
        Unknown mode; bad offsets (not starting at 0, decreasing, past the input);
        offsets with 2-D input or none with 1-D input; per-sample weights with a
        mode other than "sum" or of the wrong shape.
    IndexError
        An id out of range (nothing is written).
    TypeError
        Non-integer ids or offsets.
    """
    be = _weight(weight)
    num_embeddings = weight.shape[0]
    padding_idx = V.normalize_padding_idx(padding_idx, num_embeddings)
    max_norm, norm_type = V.check_max_norm(max_norm, norm_type)
    # without renorm nothing is written before the pooling, which checks the ids itself
    renorm = max_norm is not None
    bags = _bags.bags_of(input, offsets, per_sample_weights, mode, include_last_offset,
                         num_embeddings, _half.compute_dtype(weight.dtype), be,
                         check_range=renorm)
    if renorm:
        be.check_writable(weight)
        renorm_(weight, be.plan_rows(bags.flat, num_embeddings, padding_idx), max_norm,
                norm_type, padding_idx, be)
    table, flat, pad = compact_rows(weight, bags.flat, padding_idx, be)
    out, _, _ = be.bag_forward(table, flat, bags.starts, mode, pad, bags.psw,
                               check_range=not renorm and table is weight)
    return out


def embedding_bag_backward(grad_output, input, weight, offsets=None, mode="mean",
                           per_sample_weights=None, include_last_offset=False,
                           padding_idx=None, scale_grad_by_freq=False, sparse=False):
    """Gradients of :func:`embedding_bag` w.r.t. the table and the per-sample weights.

    ``weight`` is the table as the forward saw it (after any ``max_norm`` renorm): max
    mode recomputes the winners from it, and the per-sample weights' gradient is
    ``dot(grad_output[bag], weight[id])`` per entry (a float32 table's accumulated
    in float64, then rounded: torch's float32 sums can differ by a few ulp, or
    overflow where this does not). No renorm happens here.

    Parameters
    ----------
    grad_output : ndarray of shape (n_bags, embedding_dim)
        Cast to the table's dtype (to float32 for a float16 table, whose gradients
        are float32).
    input : array_like of int, or scipy.sparse matrix
        As given to :func:`embedding_bag`.
    weight : ndarray of shape (num_embeddings, embedding_dim)
        The table as the forward saw it (see above).
    offsets, mode, per_sample_weights, include_last_offset, padding_idx
        As given to :func:`embedding_bag`.
    scale_grad_by_freq : bool, default False
        Divide each row's gradient by how often its id occurs in the batch (padding
        and entries outside every bag not counted). torch CPU divides by the wrong
        count here (pytorch#190063); we divide each row by its own count. Also allowed
        in max mode, where torch refuses.
    sparse : bool, default False
        Return a canonical ``scipy.sparse.csr_array`` (sorted distinct rows, each a
        full row, explicit zeros kept; read-only shared column indices, as for
        :func:`embedding_backward`); allowed in max mode too, where torch refuses.

    Returns
    -------
    grad_weight : ndarray or csr_array of shape (num_embeddings, embedding_dim)
        Sum and mean modes add each bag's (weighted, or 1/count scaled) gradient to
        its entries' rows; max mode sends each column's gradient to the row that won
        it (the first occurrence wins ties). Padding gets nothing.
    grad_per_sample_weights : ndarray shaped as ``per_sample_weights``, or None
        0 for padding entries. For a scipy.sparse input one per stored entry,
        aligned with its ``data`` (csr, csc, coo), or with ``input.tocsr().data``
        for the other formats.
    """
    be = _weight(weight)
    num_embeddings, dim = weight.shape
    padding_idx = V.normalize_padding_idx(padding_idx, num_embeddings)
    bags = _bags.bags_of(input, offsets, per_sample_weights, mode, include_last_offset,
                         num_embeddings, _half.compute_dtype(weight.dtype), be)
    grad = be.as_grad_output(grad_output, (bags.n_bags, dim), _half.compute_dtype(weight.dtype))
    argmax = counts = None
    # (a C-contiguous float16 table's max mode pools a compact copy of the planned rows)
    need_plan = _bags.plan_needed(mode, scale_grad_by_freq, sparse, be)
    plan = (be.plan_rows(bags.used, num_embeddings, padding_idx)
            if need_plan or (_half.is_half(weight) and weight.flags.c_contiguous) else None)
    # the table is read only for max mode's winners and the per-sample weights' dots
    table, read, pad = weight, bags, padding_idx
    if (mode == "max" or bags.psw is not None) and not weight.flags.c_contiguous:
        table, flat, pad = compact_rows(weight, bags.flat, padding_idx, be)
        read = _bags.Bags(flat, bags.starts, bags.psw, bags.psw_shape, bags.psw_order,
                          bags.end)
    table_plan = plan if table is weight else None  # a plan of the table's own ids
    if mode == "max":
        half = {"plan": table_plan} if _half.is_half(table) else {}  # float16: reuse it
        _, argmax, counts = be.bag_forward(table, read.flat, read.starts, mode, pad, **half)
    elif mode == "mean":
        counts = be.bag_counts(bags.flat, bags.starts, padding_idx)
    entry_bag = be.entry_bags(bags.starts) if need_plan else None
    scale = _bags.entry_scale(bags, mode, counts, entry_bag, _half.compute_dtype(weight.dtype), be)
    grad_weight = _bags.weight_grad(grad, bags, plan, entry_bag, scale, argmax, num_embeddings,
                                    scale_grad_by_freq, sparse, be)
    return grad_weight, _bags.psw_grad(grad, table, read, entry_bag, pad, be, table_plan)
