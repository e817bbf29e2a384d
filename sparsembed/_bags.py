"""EmbeddingBag's input layout: validation of (input, offsets, per_sample_weights) into
flat ids and bag bounds, and the gradient pieces shared by the layer and the
functional form.

Everything here runs before any kernel writes: a failed call leaves every array as
it was.
"""

import numpy as np

from sparsembed import _half, _rowsparse
from sparsembed import _validation as V
from sparsembed._kernels import _bag

MODES = ("sum", "mean", "max")


def check_mode(mode):
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of 'sum', 'mean', 'max', got {mode!r}")
    return mode


class Bags:
    """A validated batch of bags.

    Attributes
    ----------
    flat : ndarray of shape (n,), int32 or int64
        All ids, in input order (validated against the table size).
    starts : ndarray of shape (n_bags + 1,), int64
        Bag ``b`` holds ``flat[starts[b]:starts[b + 1]]``; ``starts[0] == 0``.
    end : int
        ``starts[-1]``: entries from ``end`` on belong to no bag (torch ignores them
        too: ``include_last_offset`` with ``offsets[-1] < len(input)``, or empty
        offsets).
    psw : ndarray of shape (n,) or None
        Per-sample weights in the table's dtype.
    psw_shape : tuple or None
        The shape the per-sample weights had (their gradient gets it back).
    psw_order : ndarray of shape (n,) or None
        Where each of the given per-sample weights sits in ``psw`` (a csc or coo
        input, whose data were regrouped by row), None when in order.
    """

    __slots__ = ("flat", "starts", "end", "psw", "psw_shape", "psw_order")

    def __init__(self, flat, starts, psw, psw_shape, psw_order=None, end=None):
        self.flat, self.starts, self.psw, self.psw_shape = flat, starts, psw, psw_shape
        self.psw_order = psw_order
        # given when known on the host (a GPU's starts[-1] would cost a transfer)
        self.end = int(starts[-1]) if end is None else int(end)

    @property
    def n_bags(self):
        return self.starts.shape[0] - 1

    @property
    def used(self):
        """The ids that belong to a bag (a view of ``flat``)."""
        return self.flat[: self.end]


def _is_scipy_sparse(x):
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - scipy is a dependency
        return False
    return sp.issparse(x)


def _host(x):
    """A CuPy array brought to the host (offsets, per-sample weights are checked there)."""
    return x.get() if hasattr(x, "__cuda_array_interface__") and hasattr(x, "get") else x


def _offsets_array(offsets, n, be):
    """``offsets`` as a C-contiguous 1-D int32/int64 array of the backend: an array of
    the backend's own kind with such a dtype is kept where it is (a GPU's offsets are
    checked on the GPU); anything else is checked and converted on the host."""
    xp = be.xp
    if (isinstance(offsets, xp.ndarray) and offsets.ndim == 1
            and np.dtype(offsets.dtype) in (np.dtype(np.int32), np.dtype(np.int64))):
        return xp.ascontiguousarray(offsets)
    off = _host(offsets)
    if isinstance(off, (list, tuple)) and len(off):
        off = np.asarray(off)
        if off.dtype.kind == "f":
            off = V.ints_past_float(offsets, off)
    if np.ndim(off) != 1:
        raise ValueError(f"offsets must be 1-D, got shape {np.shape(off)}")
    # past int64 is past the end of any input (or below its start): a bad offset
    # (ValueError), not the out-of-range id as_index_array would call it. uint64
    # holds such values, and so do the object arrays numpy makes of Python ints.
    found = V.past_int64(off) if isinstance(off, np.ndarray) else None
    if found is not None:
        pos, value = found
        where = f"past the end of input (length {n})" if value > 0 else "negative"
        raise ValueError(f"offsets[{pos}] = {value} is {where}")
    return be.asarray(V.as_index_array(off, "offsets"))


def _check_offsets(offsets, n, include_last_offset, be):
    """Validated bag starts from ``offsets`` over an input of ``n`` entries:
    ``(starts, end)``, ``starts`` an int64 array of the backend (see :class:`Bags`),
    ``end`` its last entry, an int."""
    off = _offsets_array(offsets, n, be)
    if off.shape[0] == 0:
        if include_last_offset:
            raise ValueError(
                "offsets must hold at least one entry with include_last_offset=True "
                "(the end of the last bag)"
            )
        return be.xp.zeros(1, dtype=np.int64), 0  # torch: no offsets, no bags
    starts, pos, first, last = be.bag_starts(off, n, include_last_offset)
    if first != 0:
        raise ValueError(f"offsets[0] must be 0 (the first bag starts at 0), got {first}")
    if pos >= 0:
        raise ValueError(
            f"offsets must be non-decreasing, got offsets[{pos}] = {int(off[pos])} "
            f"after offsets[{pos - 1}] = {int(off[pos - 1])}"
        )
    if last > n:
        raise ValueError(f"offsets[-1] = {last} is past the end of input (length {n})")
    return starts, (last if include_last_offset else n)


def _check_psw(per_sample_weights, shape, mode, dtype, be, name="per_sample_weights"):
    """Per-sample weights as a flat array of ``dtype``, and the shape they had; an
    array of the backend's own kind stays where it is (no transfer to check it)."""
    if per_sample_weights is None:
        return None, None
    if mode != "sum":
        raise ValueError(
            f"per_sample_weights are only supported with mode='sum', got mode={mode!r}"
        )
    on_backend = isinstance(per_sample_weights, be.xp.ndarray)
    w = per_sample_weights if on_backend else np.asarray(_host(per_sample_weights))
    if np.dtype(w.dtype).kind not in "biuf":
        raise TypeError(f"{name} must be a real array, got dtype {w.dtype}")
    w_shape = tuple(w.shape)
    if w_shape != tuple(shape):
        raise ValueError(
            f"per_sample_weights has shape {w_shape}, expected {tuple(shape)} (the shape of input)"
        )
    xp = be.xp if on_backend else np
    return xp.ascontiguousarray(w, dtype=dtype).reshape(-1), w_shape


def bags_of(input, offsets, per_sample_weights, mode, include_last_offset, num_embeddings,
            dtype, be, check_range=True):
    """Validate an EmbeddingBag batch into :class:`Bags` (no write happens here).

    ``check_range=False`` leaves the ids' range check to the caller: a forward
    without renorm passes ``check_range=True`` to ``be.bag_forward`` instead, whose
    kernel checks each id before reading its row.

    ``input`` is 1-D ids with 1-D ``offsets``, 2-D ids (n_bags, bag_len) without, or a
    scipy.sparse matrix (converted to CSR: rows are bags, column indices the ids, data
    the per-sample weights in mode "sum"; in modes "mean" and "max" the data must all
    be 1, a plain multi-hot matrix).
    """
    mode = check_mode(mode)
    if _is_scipy_sparse(input):
        if offsets is not None:
            raise ValueError("offsets must be None when input is a scipy.sparse matrix "
                             "(its rows are the bags)")
        if per_sample_weights is not None:
            raise ValueError("per_sample_weights must be None when input is a scipy.sparse "
                             "matrix (its data are the weights)")
        if len(input.shape) != 2:
            raise ValueError(f"a sparse input must be 2-D, got shape {input.shape}")
        # scipy reads a matrix's arrays unchecked, and they may have been edited
        csr, data_order = _rowsparse.entries_by_row(input, "sparse input")
        end = int(csr.indptr[-1])
        try:
            starts, _ = _check_offsets(csr.indptr, end, True, be)
        except ValueError as e:
            raise ValueError(f"the sparse input's row pointer (indptr) does not bound its "
                             f"bags: {e}") from None
        flat = be.as_index_array(csr.indices[:end], "input", num_embeddings)
        data = np.asarray(csr.data[:end])
        if mode == "sum":
            psw, psw_shape = _check_psw(data, flat.shape, mode, dtype, be,
                                        "a sparse input's data (its per-sample weights)")
        else:
            if data.size and not np.all(data == 1):
                raise ValueError(
                    f"a sparse input's data are per-sample weights, which need mode='sum'; "
                    f"with mode={mode!r} its data must all be 1"
                )
            psw, psw_shape = None, None
        if check_range:
            be.check_index_range(flat, num_embeddings)
        return _on_backend(be, flat, starts, end, psw, psw_shape,
                           data_order if psw is not None else None)

    idx = be.as_index_array(input, "input", num_embeddings)
    if idx.ndim == 2:
        if offsets is not None:
            raise ValueError(
                f"offsets must be None for 2-D input (each row is a bag), got input of shape "
                f"{idx.shape} with offsets"
            )
        n_bags, bag_len = idx.shape
        end = n_bags * bag_len
        # made where the table is; one allocation (arange(n_bags + 1) * bag_len takes two)
        starts = (be.xp.arange(0, end + bag_len, bag_len, dtype=np.int64) if bag_len
                  else be.xp.zeros(n_bags + 1, dtype=np.int64))
    elif idx.ndim == 1:
        if offsets is None:
            raise ValueError("offsets is required for 1-D input (or pass 2-D input, one bag per row)")
        starts, end = _check_offsets(offsets, idx.shape[0], include_last_offset, be)
    else:
        raise ValueError(f"input must be 1-D (with offsets) or 2-D, got shape {idx.shape}")
    psw, psw_shape = _check_psw(per_sample_weights, idx.shape, mode, dtype, be)
    flat = idx.reshape(-1)
    if check_range:
        be.check_index_range(flat, num_embeddings)
    return _on_backend(be, flat, starts, end, psw, psw_shape)


def _on_backend(be, flat, starts, end, psw, psw_shape, psw_order=None):
    """Bags whose arrays live where the table does (weights checked on the host are
    moved once to the GPU; on the CPU nothing is copied)."""
    return Bags(flat, starts, None if psw is None else be.asarray(psw), psw_shape,
                None if psw_order is None else be.asarray(psw_order), end=end)


def entry_scale(bags, mode, counts, entry_bag, dtype, be):
    """Per-entry factor of the backward: the weight (sum), 1 / bag count (mean), or None."""
    if mode == "mean":
        return be.mean_scale(counts, entry_bag, dtype)
    if bags.psw is not None:
        return bags.psw[: bags.end]
    return None


def plan_needed(mode, scale_grad_by_freq, sparse, be):
    """Whether :func:`weight_grad` needs the plan of the bagged entries (and their
    bags, ``entry_bag``): all but max mode's dense gradient without
    ``scale_grad_by_freq`` on the CPU, which is summed straight from the winners
    (n_bags x dim adds instead of sorting every entry; the GPU sums planned rows)."""
    return mode != "max" or scale_grad_by_freq or sparse or be.xp is not np


def weight_grad(grad2d, bags, plan, entry_bag, scale, argmax, num_embeddings,
                scale_grad_by_freq, sparse, be):
    """Dense or row-sparse table gradient of a bag forward (``plan`` and
    ``entry_bag`` may be None where :func:`plan_needed` says so)."""
    if argmax is not None and not scale_grad_by_freq and not sparse:
        return be.bag_max_dense_grad(grad2d, argmax, bags.flat, plan, entry_bag,
                                     num_embeddings)
    if sparse:
        return be.bag_sparse_grad(grad2d, plan, entry_bag, scale, argmax, num_embeddings,
                                  scale_grad_by_freq)
    return be.bag_dense_grad(grad2d, plan, entry_bag, scale, argmax, num_embeddings,
                             scale_grad_by_freq)


def psw_grad(grad2d, weight, bags, entry_bag, padding_idx, be, plan=None):
    """Gradient of the per-sample weights, shaped as they were (None without weights).

    ``plan`` (the bagged entries' plan) is reused by a float16 table's compact copy."""
    if bags.psw is None:
        return None
    half = {"plan": plan} if plan is not None and _half.is_half(weight) else {}
    g = be.per_sample_weights_grad(grad2d, weight, bags.flat, entry_bag, padding_idx, **half)
    if bags.psw_order is not None:
        g = g[bags.psw_order]
    return g.reshape(bags.psw_shape)
