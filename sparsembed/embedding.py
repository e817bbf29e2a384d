"""Layers: a trainable table of vectors looked up by integer ids."""

import collections
import numbers
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from sparsembed import _aligned, _bags, _half, init
from sparsembed import _validation as V
from sparsembed import functional as F
from sparsembed import optim as _optim
from sparsembed._backend import backend_of, get_backend, requested_device

__all__ = ["Embedding", "EmbeddingBag"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
_DTYPE_CHARS = tuple(dtype.char for dtype in _DTYPES)

# what load_state_dict returns, as torch's Module.load_state_dict does
IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _check_real(arr, name):
    """TypeError for a table of anything but real numbers (floats, or integers, which
    convert exactly enough): numpy would turn objects into NaN, drop an imaginary
    part with only a warning, or fail on strings with its own message."""
    if np.dtype(arr.dtype).kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers (a float or integer array), got "
                        f"dtype {arr.dtype}")


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be float16, float32 or float64, got {dtype}")
    return dtype


class _Table:
    """What every table layer shares: the weight, its gradient and their life cycle.

    Subclasses set ``num_embeddings``, ``embedding_dim``, ``padding_idx`` and the
    other options, then call :meth:`_init_weight`.
    """

    def _init_weight(self, weight, dtype, random_state, device):
        self.device = requested_device(device)
        get_backend(self.device)  # no CuPy / no GPU: fail before any work
        self.random_state = random_state
        self.requires_grad = True
        self.grad = None
        self._saved = None
        self._plan_used = False
        shape = (self.num_embeddings, self.embedding_dim)
        if weight is None:
            self.weight = _aligned.empty(shape, dtype)
            self.reset_parameters(random_state)
        else:
            arr = np.asarray(weight) if not hasattr(weight, "__cuda_array_interface__") else weight
            if isinstance(weight, np.memmap):
                arr = weight  # keep the memmap object itself (flush(), filename)
            if tuple(arr.shape) != shape:
                raise ValueError(f"weight has shape {tuple(arr.shape)}, expected {shape}")
            _check_real(arr, "weight")
            if isinstance(arr, np.ndarray) and (arr.dtype != dtype or not arr.flags.c_contiguous):
                arr = _aligned.copy(arr, dtype)  # a copy is made anyway: make it aligned
            elif arr.dtype != dtype or not arr.flags.c_contiguous:  # a device array
                arr = arr.astype(dtype, order="C")
            self.weight = arr
        if self.device != "cpu" or not isinstance(self.weight, np.ndarray):
            self._move(self.device)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # layer(...) is layer.forward(...), a subclass's own forward included (as
        # torch's Module.__call__ dispatches): bound once per class that defines one,
        # where a wrapper method cost ~0.3 us of a 4.5 us lookup of 16 ids
        if "forward" in cls.__dict__:
            cls.__call__ = cls.forward

    @property
    def _backend(self):
        return get_backend(self.device)

    @property
    def dtype(self):
        """dtype of the table."""
        return self.weight.dtype

    def reset_parameters(self, random_state=None):
        """Redraw the table in place from N(0, 1) and zero the padding row.

        Parameters
        ----------
        random_state : None, int or numpy.random.Generator
            Seed for ``numpy.random.default_rng``.
        """
        rng = np.random.default_rng(random_state)
        # the table may still be on the host during __init__; drawn a block at a time
        init.fill_drawn(self.weight, rng.standard_normal)
        if self.padding_idx is not None:
            self.weight[self.padding_idx] = 0

    def zero_grad(self):
        """Forget the accumulated gradient (``grad = None``)."""
        self.grad = None

    def _accumulate(self, grad):
        self.grad = _summed(self.grad, grad, self._backend)
        return grad

    def _check_fused(self, optimizer, locate=True):
        """Refuse, before anything changes, an ``optimizer`` a fused backward cannot
        use: TypeError for anything but a ``sparsembed.optim`` optimizer, ValueError
        (with ``locate``) when this layer is not among its params."""
        if not isinstance(optimizer, _optim.Optimizer):
            raise TypeError(f"optimizer must be a sparsembed.optim optimizer (SGD, Adagrad, "
                            f"SparseAdam, RowWiseAdagrad), got {type(optimizer).__name__}")
        if locate:
            optimizer._locate(self)

    def _table_shape(self):
        """The shape ``weight`` must have: (num_embeddings, embedding_dim)."""
        return (self.num_embeddings, self.embedding_dim)

    # sizes and options a forward reads that are public attributes (torch's too,
    # which its F.embedding checks at every call): edited by hand, they are checked
    # and normalised again, as the constructor does, before the forward writes
    # anything (a max_norm of 0 would zero rows in place, a padding_idx of -1 count
    # from the front, an embedding_dim of 2.0 pass the table's shape check, equal to
    # 2, and fail after a renorm). Compared with the values last checked, the sizes'
    # types too (2.0 == 2), so an unedited layer pays one tuple comparison.
    _EDITABLE_OPTIONS = operator.attrgetter("num_embeddings", "embedding_dim", "padding_idx",
                                            "max_norm", "norm_type")
    _options_checked = None  # (the class's: none checked yet, or pickled before this)

    def _check_options(self):
        options = self._EDITABLE_OPTIONS(self)
        if options == self._options_checked and type(options[0]) is int \
                and type(options[1]) is int:
            return
        self.num_embeddings = V.check_size(self.num_embeddings, "num_embeddings")
        self.embedding_dim = V.check_size(self.embedding_dim, "embedding_dim")
        self.padding_idx = V.normalize_padding_idx(self.padding_idx, self.num_embeddings)
        self.max_norm, self.norm_type = V.check_max_norm(self.max_norm, self.norm_type)
        self._options_checked = self._EDITABLE_OPTIONS(self)

    def _checked_table(self):
        """Check that ``weight`` still has the layer's shape -- it is a public
        attribute, and a table replaced by one of another shape would send the
        layer's row ids (checked against ``num_embeddings``) past its end -- and
        return the layout a forward's ids are valid for (here that shape). The
        options a user may have edited are checked here too (:meth:`_check_options`)."""
        self._check_options()
        expected = self._table_shape()
        w = self.weight
        shape = getattr(w, "shape", None)
        if shape != expected:
            raise ValueError(f"{type(self).__name__}.weight has shape {shape}, expected "
                             f"{expected}: a table put in place of the layer's must keep "
                             f"its shape")
        # the kernels (a max_norm renorm, the optimizers) work on the table in place:
        # refuse, before any write, what they cannot take, with the fix in the message
        contiguous = getattr(getattr(w, "flags", None), "c_contiguous", False)
        dtype = getattr(w, "dtype", None)
        # (a dtype's char ignores its byte order: a big-endian table passed it, and
        # Cython's buffer check then refused it with its own message)
        if getattr(dtype, "char", "") not in _DTYPE_CHARS or not dtype.isnative \
                or not contiguous:
            raise ValueError(f"{type(self).__name__}.weight must be a C-contiguous "
                             f"float16, float32 or float64 array, got a "
                             f"{'' if contiguous else 'non-contiguous '}"
                             f"{getattr(w, 'dtype', type(w).__name__)} one: use "
                             f"numpy.ascontiguousarray(table, dtype=...) to replace it")
        return expected

    # the options a backward reads, as they were at the forward it differentiates
    # (torch records them in the autograd graph), not as they are when it runs; read
    # at every forward by one C call (a small batch's forward takes ~6 us)
    _OPTION_NAMES: tuple[str, ...] = ("padding_idx", "scale_grad_by_freq", "sparse")
    _OPTION_GETTER: Callable[[Any], tuple] = operator.attrgetter(*_OPTION_NAMES)

    def _remember(self, saved, layout):
        """Keep what the backward needs of this forward, the layout
        (:meth:`_checked_table`) it ran on and its options."""
        self._saved = saved
        self._saved_table = layout
        self._saved_dtype = self.weight.dtype
        self._dropped_by_move = None
        self._saved_options = self._OPTION_GETTER(self)

    def _forward_options(self):
        """The last forward's options: a tuple in :attr:`_OPTION_NAMES` order."""
        saved = self.__dict__.get("_saved_options")  # None: pickled by an older version
        return self._OPTION_GETTER(self) if saved is None else saved

    def _saved_forward(self):
        if self._saved is None:
            moved = self.__dict__.get("_dropped_by_move")
            raise RuntimeError("backward() called before any forward()" if moved is None else
                               f"backward() needs a forward() since the layer moved to "
                               f"{moved!r}")
        layout = self._checked_table()
        before = self.__dict__.get("_saved_table")  # None: pickled by an older version
        if before is not None and before != layout:
            raise ValueError(f"the table's shape changed from {before} to {layout} since "
                             f"the last forward(): run the forward again")
        # a table of another dtype put in place since: the forward's saved arrays
        # (per-sample weights, pooled rows) are of the old one
        dtype = self.__dict__.get("_saved_dtype", self.weight.dtype)
        if dtype != self.weight.dtype:
            raise ValueError(f"the table's dtype changed from {dtype} to {self.weight.dtype} "
                             f"since the last forward(): run the forward again")
        return self._saved

    def state_dict(self):
        """``{"weight": weight}`` (the array itself, as torch shares storage)."""
        return {"weight": self.weight}

    def load_state_dict(self, state_dict, strict=True):
        """Copy the arrays of a :meth:`state_dict` into the layer's (same shapes; cast
        to their dtypes).

        Parameters
        ----------
        state_dict : mapping of name -> array_like
        strict : bool, default True
            As in torch: keys missing from ``state_dict`` or not the layer's are an
            error; with False they are skipped (and listed in the result).

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, sorted lists of names (torch's result).

        Raises
        ------
        RuntimeError
            With ``strict``, missing or unexpected keys; a shape mismatch (torch's
            messages). TypeError for an array of anything but real numbers. Nothing is
            copied unless every array fits.
        """
        targets = self.state_dict()
        keys = set(state_dict)
        missing, unexpected = sorted(set(targets) - keys), sorted(keys - set(targets))
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        loaded = {}
        for name, target in targets.items():
            if name not in keys:
                continue
            new = state_dict[name]
            if not hasattr(new, "__cuda_array_interface__"):
                new = np.asarray(new)
            _check_real(new, f"state_dict[{name!r}]")
            if tuple(new.shape) != tuple(target.shape):
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}: size "
                    f"mismatch for {name}: copying a param with shape {tuple(new.shape)}, "
                    f"the shape in the current model is {tuple(target.shape)}"
                )
            loaded[name] = new
        xp = self._backend.xp
        for name, new in loaded.items():
            targets[name][...] = xp.asarray(new, dtype=targets[name].dtype)
        return IncompatibleKeys(missing, unexpected)

    def to(self, device):
        """Move the table (and its gradient) to ``device`` ("cpu" or "cuda"); returns self.

        Moving to the device the layer is on changes nothing. A move to another one
        drops the last forward (its arrays stay on the old device): run the forward
        again before a backward. "cuda:N" must name CuPy's current device (where
        sparsembed's arrays and kernels go): another index is a ValueError saying how
        to select it."""
        device = requested_device(device)
        if device != self.device:
            self._move(device)
        return self

    def _move(self, device):
        be = get_backend(device)
        self.weight = be.from_host(self.weight) if device != "cpu" else _to_host(self.weight)
        if self.grad is not None:
            self.grad = be.from_host(self.grad) if device != "cpu" else _to_host(self.grad)
        if self._saved is not None:
            self._saved = None
            self._dropped_by_move = device
        self.device = device

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.device != "cpu":
            state["weight"] = _to_host(self.weight)
            state["grad"] = None if self.grad is None else _to_host(self.grad)
            state["_saved"] = None
        return state

    def __setstate__(self, state):
        device = state.get("device", "cpu")
        self.__dict__.update(state)
        if device != "cpu":
            self.device = "cpu"
            self._move(device)

    def _repr_options(self, defaults):
        parts = [f"{self.num_embeddings}, {self.embedding_dim}"]
        for name, default in defaults:
            value = getattr(self, name)
            if value != default:
                # torch's format: numbers as str (max_norm=1, norm_type=inf), text quoted
                parts.append(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}")
        if self.weight.dtype != np.float32:
            parts.append(f"dtype={np.dtype(self.weight.dtype).name}")
        if self.device != "cpu":
            parts.append(f"device={self.device!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _summed(old, new, be):
    """The gradient ``old`` (None, or one set by hand) becomes with ``new`` added:
    checked (:func:`_check_grad_fits`) and summed, nothing assigned."""
    if old is None:
        return new
    _check_grad_fits(old, new)
    return be.add_grad(old, new)


def _check_grad_fits(old, new):
    """A ``grad`` already there (it may have been set by hand) must be a float array or
    a sparse matrix of the new gradient's shape for the new one to be added into it."""
    shape = getattr(old, "shape", None)
    if not (hasattr(old, "dtype") and shape is not None):
        raise TypeError(f"grad must be an array or a sparse matrix to add a gradient "
                        f"into, got {type(old).__name__}")
    if tuple(shape) != tuple(new.shape):
        raise ValueError(f"grad has shape {tuple(shape)}, expected {tuple(new.shape)} "
                         f"to add this gradient into it")
    if not hasattr(old, "format") and old.dtype.kind != "f":
        raise TypeError(f"grad must hold floats to add a gradient into it, got dtype "
                        f"{old.dtype}")


def _to_host(a):
    """A CuPy array or cupyx sparse gradient brought back as numpy / scipy csr_array."""
    if hasattr(a, "get") and (hasattr(a, "__cuda_array_interface__") or hasattr(a, "tocsr")):
        a = a.get()  # CuPy array or cupyx sparse matrix: device -> host
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "tocsr") and not isinstance(a, np.ndarray):
        # cupyx's .get() gives scipy's csr_matrix: the CPU side works with csr_array
        import scipy.sparse as sp

        canonical = a.has_canonical_format
        a = sp.csr_array(a)
        a.has_canonical_format = canonical
        return a
    return np.asarray(a)


class Embedding(_Table):
    """A table of ``num_embeddings`` trainable vectors of size ``embedding_dim``.

    The numpy counterpart of ``torch.nn.Embedding``: ``emb(ids)`` returns
    ``weight[ids]``; ``emb.backward(grad_output)`` returns the gradient w.r.t.
    ``weight`` (dense, or a canonical ``scipy.sparse.csr_array`` with ``sparse=True``)
    and adds it into ``emb.grad``.

    Parameters
    ----------
    num_embeddings : int
        Number of rows (ids ``0 .. num_embeddings - 1``).
    embedding_dim : int
        Size of each vector.
    padding_idx : int, optional
        A row that gets no gradient and starts at zero. Negative values count from the
        end (torch's rule); stored as a non-negative int.
    max_norm : float, optional
        Rows referenced by a forward whose ``norm_type``-norm exceeds it are rescaled in
        place to ``max_norm`` (torch's ``embedding_renorm_``); must be > 0.
    norm_type : float, default 2.0
        p of that norm (``inf``, ``-inf``, 0 and negative p allowed). Both are kept
        as given when they are Python ints or floats (``max_norm=1`` reads back and
        prints as 1, as torch's do); other real numbers become floats.
    scale_grad_by_freq : bool, default False
        Divide each row's gradient by how often its id occurs in the batch (works with
        ``sparse=True`` too, unlike torch).
    sparse : bool, default False
        Gradients as canonical ``scipy.sparse.csr_array``: sorted distinct rows, each
        a full row of ``embedding_dim`` entries. Their column indices (``indices``)
        are one read-only array shared by gradients of the same width (they are the
        same numbers); ``grad.copy()`` owns its arrays, to edit the structure.
    weight : ndarray of shape (num_embeddings, embedding_dim), optional
        Initial table, used as is (no copy, padding row not zeroed, like torch's
        ``_weight``) when it is C-contiguous and of ``dtype``; otherwise converted.
    dtype : {numpy.float32, numpy.float64, numpy.float16}, default float32
        float16 is storage only: lookups return float16 (torch's output dtype), but
        renorm, gradients (float32 arrays), bag pooling and optimizer updates (float32
        state) are computed in float32 and rounded once when stored in the table,
        where torch 2.13 CPU accumulates gradients and keeps optimizer state in
        float16, computes renorm's norm in float16 and rounds a mean bag's sum to
        float16 before dividing (its sum pooling is float32, as here; see
        ``sparsembed._half``).
    random_state : None, int or numpy.random.Generator
        Seed of the default N(0, 1) initialisation.
    device : {"cpu", "cuda"}, default "cpu"

    Attributes
    ----------
    weight : ndarray of shape (num_embeddings, embedding_dim)
        May be replaced by another C-contiguous float array of that shape (torch
        also takes a strided one; here the next forward raises ValueError, as the
        table is updated in place by the kernels), best of the same dtype: an
        optimizer's existing state keeps the old one and refuses the new table
        (RuntimeError at its next update) until it is reloaded. torch also takes a
        table of another shape (leaving ``num_embeddings`` stale); here the next
        forward or backward raises ValueError instead, as it does when the shape
        changed since the forward that a backward would use.
    grad : None, ndarray or csr_array
        Accumulated gradient, None until a backward (and after ``zero_grad``).
    requires_grad : bool
        When False, ``backward`` returns None and leaves ``grad`` alone.

    Examples
    --------
    >>> import numpy as np, sparsembed as se
    >>> emb = se.Embedding(10, 3, padding_idx=0, random_state=0)
    >>> out = emb(np.array([[1, 2, 0], [4, 4, 9]]))
    >>> out.shape
    (2, 3, 3)
    >>> emb.backward(np.ones_like(out)).shape
    (10, 3)
    """

    _REPR_DEFAULTS = (("padding_idx", None), ("max_norm", None), ("norm_type", 2.0),
                      ("scale_grad_by_freq", False), ("sparse", False))

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None,
                 norm_type=2.0, scale_grad_by_freq=False, sparse=False, *, weight=None,
                 dtype=np.float32, random_state=None, device="cpu"):
        self.num_embeddings = V.check_size(num_embeddings, "num_embeddings")
        self.embedding_dim = V.check_size(embedding_dim, "embedding_dim")
        self.padding_idx = V.normalize_padding_idx(padding_idx, self.num_embeddings)
        self.max_norm, self.norm_type = V.check_max_norm(max_norm, norm_type)
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        self.sparse = bool(sparse)
        self._init_weight(weight, _check_dtype(dtype), random_state, device)

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, padding_idx=None, max_norm=None,
                        norm_type=2.0, scale_grad_by_freq=False, sparse=False):
        """Wrap an existing table.

        Shares memory with ``embeddings`` when it is a C-contiguous float32, float64 or
        float16 ndarray (otherwise converts it to float32, or keeps its float dtype of
        those three; a float16 table has float32 gradients); does not zero
        the padding row; ``requires_grad = not freeze``.

        Parameters
        ----------
        embeddings : array of shape (num_embeddings, embedding_dim)
            numpy (or CuPy: the layer is then on the GPU).
        freeze : bool, default True
            The layer gets no gradient (``requires_grad = False``).
        padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse
            As in the constructor.

        Returns
        -------
        Embedding
        """
        arr = embeddings if hasattr(embeddings, "__cuda_array_interface__") else np.asarray(embeddings)
        if arr.ndim != 2:
            raise ValueError(f"embeddings must be 2-D, got shape {arr.shape}")
        dtype = arr.dtype if np.dtype(arr.dtype) in _DTYPES else np.float32
        device = "cuda" if hasattr(arr, "__cuda_array_interface__") else "cpu"
        layer = cls(arr.shape[0], arr.shape[1], padding_idx=padding_idx, max_norm=max_norm,
                    norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse,
                    weight=arr, dtype=dtype, device=device)
        layer.requires_grad = not freeze
        return layer

    def forward(self, input):
        """Look up ``weight[input]``.

        Parameters
        ----------
        input : array_like of int, any shape
            Ids in ``[0, num_embeddings)``, any integer dtype.

        Returns
        -------
        ndarray of shape ``input.shape + (embedding_dim,)``, weight's dtype

        Notes
        -----
        The backward sorts the ids of its forward once (the row plan). When the last
        forward's plan was used by a backward (a training loop), a large CPU lookup
        makes the plan of its ids on the side, on one thread of its team while the
        others copy rows, and the backward finds it made; a forward not followed by
        a backward (inference) does not, nor one followed by a dense backward that
        sums without a plan (rows of one to four 64-byte lines on a large table).
        """
        be = self._backend
        layout = self._checked_table()
        # the lookup checks the ids itself, and so does the plan that renorm needs first
        renorm = self.max_norm is not None
        idx, flat = F.lookup_ids(input, be, self.num_embeddings)
        plan = None
        plan_ahead = (self.__dict__.get("_plan_used", False) and self.requires_grad
                      and not renorm)
        self._plan_used = False
        if renorm:
            plan = be.plan_rows(flat, self.num_embeddings, self.padding_idx, check_range=True)
            be.check_writable(self.weight)
            F.renorm_(self.weight, plan, self.max_norm, self.norm_type, self.padding_idx, be)
        # the caller may reuse its index buffer before the backward: keep a copy,
        # written by the lookup as it reads the ids
        kept = None
        if (be.xp.may_share_memory(flat, input) if isinstance(input, be.xp.ndarray)
                else _shares_memory(flat, _sources(be, input), be.xp)):
            kept = be.xp.empty_like(flat)
        if plan_ahead:
            out, plan = be.gather_and_plan(self.weight, flat, self.num_embeddings,
                                           self.padding_idx, ids_out=kept)
        else:
            out = be.gather(self.weight, flat, check_range=not renorm, ids_out=kept)
        out = out.reshape(idx.shape + (self.embedding_dim,))
        if kept is not None:
            flat = kept
        self._remember((flat, idx.shape, plan), layout)
        return out

    def _plan(self):
        """The last forward's row plan, made on first use (the caller has checked the
        forward with :meth:`_saved_forward`)."""
        flat, shape, plan = self._saved
        if plan is None:
            padding_idx, _, _ = self._forward_options()
            plan = self._backend.plan_rows(flat, self.num_embeddings, padding_idx)
            self._saved = (flat, shape, plan)
        self._plan_used = True  # the next forward plans ahead (see forward)
        return flat, shape, plan

    def backward(self, grad_output, optimizer=None):
        """Gradient of the last forward w.r.t. ``weight``, also added into ``grad``.

        With the options that forward ran with (``padding_idx``,
        ``scale_grad_by_freq``, ``sparse``), as torch's autograd graph records them:
        an option changed since applies from the next forward.

        Parameters
        ----------
        grad_output : ndarray of shape ``input.shape + (embedding_dim,)``
            Cast to the table's dtype (float32 for a float16 table: its gradients are
            float32).
        optimizer : sparsembed.optim optimizer, optional
            Fused backward + update: sum each touched row's gradient and apply
            ``optimizer``'s update to that row in the same pass, without building the
            gradient matrix. Returns None and leaves ``grad`` untouched (a gradient
            already there is not applied). It always applies the touched-rows (sparse)
            form of the update (lazy weight decay and momentum), so for a
            ``sparse=True`` layer whose ``grad`` is None it equals ``backward`` then
            ``optimizer.step()`` (the optimizer counts it as one step of this layer).
            The layer must be among the optimizer's params.

        Returns
        -------
        ndarray of shape (num_embeddings, embedding_dim), csr_array of that shape, or None
            The dense gradient, or with ``sparse=True`` the canonical row-sparse one;
            None when ``requires_grad`` is False or ``optimizer`` is given. When
            ``grad`` was None the result becomes ``grad`` itself, not a copy (a dense
            gradient is the table's size), so editing it in place edits ``grad``;
            later calls return their own gradient and replace ``grad`` by the sum,
            leaving the arrays returned before as they were (torch's ``backward``
            returns nothing).
        """
        flat, shape, _ = self._saved_forward()
        be = self._backend
        grad = be.as_grad_output(grad_output, shape + (self.embedding_dim,),
                                 _half.compute_dtype(self.weight.dtype))
        if optimizer is not None:
            self._check_fused(optimizer)
        if not self.requires_grad:
            return None
        padding_idx, scale_grad_by_freq, sparse = self._forward_options()
        grad2d = grad.reshape(flat.shape[0], self.embedding_dim)
        if (optimizer is None and not sparse
                and not be.dense_grad_plans(grad2d, self.num_embeddings, scale_grad_by_freq)):
            # summed without a plan (as fast as with one the forward made: same bits),
            # so the next forward does not make one on the side
            return self._accumulate(be.dense_grad_of_ids(grad2d, flat, self.num_embeddings,
                                                         padding_idx, scale_grad_by_freq))
        _, _, plan = self._plan()
        if optimizer is not None:
            optimizer._fused_update(self, grad2d, plan, scale_grad_by_freq)
            return None
        g = F.weight_grad(grad2d, plan, self.num_embeddings, scale_grad_by_freq, sparse, be)
        return self._accumulate(g)

    def __repr__(self):
        return self._repr_options(self._REPR_DEFAULTS)


def _own(arr, sources, xp):
    """``arr``, copied when it may share memory with one of the caller's ``sources``
    (the caller may reuse its buffers before backward)."""
    if arr is None or not _shares_memory(arr, sources, xp):
        return arr
    return arr.copy()


def _shares_memory(arr, sources, xp):
    return any(xp.may_share_memory(arr, src) for src in sources)


# converted element by element: numpy's array of one of these is new memory
_COPIED_INPUTS = (list, tuple, range, numbers.Number)
_SPARSE_PARTS = ("indices", "indptr", "data", "row", "col")


def _sources(be, *objs):
    """The arrays of backend ``be`` through which the caller can still write the
    memory of its inputs ``objs`` after a forward: an array of the backend itself,
    a scipy matrix's arrays, and the memory that any other array-like exposes (a
    buffer such as ``array.array`` or ``memoryview``, a torch tensor, an object with
    ``__array__`` or, on the GPU, ``__cuda_array_interface__``), which converting it
    may have kept rather than copied."""
    xp = be.xp
    out = []
    for obj in objs:
        if obj is None or isinstance(obj, _COPIED_INPUTS):
            continue
        if isinstance(obj, xp.ndarray):
            out.append(obj)
            continue
        if _bags._is_scipy_sparse(obj):  # its arrays, in any format
            parts = (getattr(obj, name, None) for name in _SPARSE_PARTS)
            out.extend(part for part in parts if isinstance(part, xp.ndarray))
        elif xp is np:
            if hasattr(obj, "__array__") or hasattr(obj, "__array_interface__") \
                    or _is_buffer(obj):
                out.append(np.asarray(obj))  # as the forward converted it: a view or a copy
        elif hasattr(obj, "__cuda_array_interface__"):
            out.append(xp.asarray(obj))  # a view of the same device memory
    return out


def _is_buffer(obj):
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


class EmbeddingBag(_Table):
    """A table of vectors pooled per bag: the numpy counterpart of
    ``torch.nn.EmbeddingBag``.

    ``bag(input, offsets)`` returns, for every bag, the sum, mean or element-wise
    max of its rows, without materialising the (n_ids, embedding_dim) lookup;
    ``bag.backward(grad_output)`` returns the gradient w.r.t. ``weight`` (dense or a
    canonical ``scipy.sparse.csr_array``) and adds it into ``bag.grad``.

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    max_norm : float, optional
        Rows referenced by a forward (padding included, as torch) whose
        ``norm_type``-norm exceeds it are rescaled in place before pooling; > 0.
    norm_type : float, default 2.0
        p of that norm. Both are kept as given, as :class:`Embedding`'s.
    scale_grad_by_freq : bool, default False
        Divide each row's gradient by how often its id occurs in the batch. torch
        CPU divides by the wrong count (pytorch#190063); we divide each row by its own
        count. Also allowed in max mode and with ``sparse=True`` (torch refuses both).
    mode : {"sum", "mean", "max"}, default "mean"
    sparse : bool, default False
        Gradients as canonical ``scipy.sparse.csr_array`` (sorted distinct rows, each a
        full row of ``embedding_dim`` entries; read-only shared column indices, as for
        :class:`Embedding`). Allowed in max mode (torch refuses).
    include_last_offset : bool, default False
        ``offsets`` holds n_bags + 1 entries, the last one the end of the last bag.
    padding_idx : int, optional
        Entries equal to it are left out of the pooling and of the mean's count and
        get no gradient; the row starts at zero. Negative values count from the end.
    weight, dtype, random_state, device
        As for :class:`Embedding`.

    Attributes
    ----------
    weight : ndarray of shape (num_embeddings, embedding_dim)
        May be replaced by another C-contiguous float array of that shape (see
        :class:`Embedding`).
    grad : None, ndarray or csr_array
        Accumulated table gradient.
    per_sample_weights_grad : ndarray or None
        Set by every ``backward`` whose forward had per-sample weights: their gradient
        ``dot(grad_output[bag], weight[id])`` (0 for padding entries; a float32
        table's dot accumulated in float64, then rounded), shaped as they were. Not
        accumulated across calls; None when the forward had none.
    requires_grad : bool

    Examples
    --------
    >>> import numpy as np, sparsembed as se
    >>> bag = se.EmbeddingBag(10, 3, mode="sum", random_state=0)
    >>> out = bag(np.array([1, 2, 4, 5, 4, 3]), offsets=np.array([0, 2, 2]))
    >>> out.shape
    (3, 3)
    >>> bag.backward(np.ones_like(out)).shape
    (10, 3)
    """

    # torch always prints the mode; sparse and include_last_offset (which torch leaves
    # out) are shown when set
    _REPR_DEFAULTS = (("max_norm", None), ("norm_type", 2.0), ("scale_grad_by_freq", False),
                      ("mode", None), ("sparse", False), ("include_last_offset", False),
                      ("padding_idx", None))

    _OPTION_NAMES = _Table._OPTION_NAMES + ("mode",)
    _OPTION_GETTER = operator.attrgetter(*_OPTION_NAMES)

    def __init__(self, num_embeddings, embedding_dim, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, mode="mean", sparse=False,
                 include_last_offset=False, padding_idx=None, *, weight=None,
                 dtype=np.float32, random_state=None, device="cpu"):
        self.num_embeddings = V.check_size(num_embeddings, "num_embeddings")
        self.embedding_dim = V.check_size(embedding_dim, "embedding_dim")
        self.max_norm, self.norm_type = V.check_max_norm(max_norm, norm_type)
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        self.mode = _bags.check_mode(mode)
        self.sparse = bool(sparse)
        self.include_last_offset = bool(include_last_offset)
        self.padding_idx = V.normalize_padding_idx(padding_idx, self.num_embeddings)
        self.per_sample_weights_grad = None
        self._init_weight(weight, _check_dtype(dtype), random_state, device)

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, max_norm=None, norm_type=2.0,
                        scale_grad_by_freq=False, mode="mean", sparse=False,
                        include_last_offset=False, padding_idx=None):
        """Wrap an existing table (shares memory when it can; the padding row is not
        zeroed; ``requires_grad = not freeze``), as :meth:`Embedding.from_pretrained`.

        Parameters
        ----------
        embeddings : array of shape (num_embeddings, embedding_dim)
            numpy (or CuPy: the layer is then on the GPU).
        freeze : bool, default True
            The layer gets no gradient (``requires_grad = False``).
        max_norm, norm_type, scale_grad_by_freq, mode, sparse, include_last_offset, padding_idx
            As in the constructor.

        Returns
        -------
        EmbeddingBag
        """
        arr = embeddings if hasattr(embeddings, "__cuda_array_interface__") else np.asarray(embeddings)
        if arr.ndim != 2:
            raise ValueError(f"embeddings must be 2-D, got shape {arr.shape}")
        dtype = arr.dtype if np.dtype(arr.dtype) in _DTYPES else np.float32
        device = "cuda" if hasattr(arr, "__cuda_array_interface__") else "cpu"
        layer = cls(arr.shape[0], arr.shape[1], max_norm=max_norm, norm_type=norm_type,
                    scale_grad_by_freq=scale_grad_by_freq, mode=mode, sparse=sparse,
                    include_last_offset=include_last_offset, padding_idx=padding_idx,
                    weight=arr, dtype=dtype, device=device)
        layer.requires_grad = not freeze
        return layer

    def forward(self, input, offsets=None, per_sample_weights=None):
        """Pool each bag's rows.

        Parameters
        ----------
        input : array_like of int, or scipy.sparse matrix
            1-D ids with ``offsets``, 2-D ids (n_bags, bag_len) without, or a sparse
            matrix whose rows are bags (see :func:`sparsembed.functional.embedding_bag`).
        offsets : array_like of int, optional
            Bag starts (``offsets[0] == 0``, non-decreasing, ``<= len(input)``); with
            ``include_last_offset`` also the end of the last bag.
        per_sample_weights : array_like of float, same shape as ``input``, optional
            Mode "sum" only.

        Returns
        -------
        ndarray of shape (n_bags, embedding_dim), weight's dtype
            Empty bags and bags of padding only give zeros.
        """
        be = self._backend
        layout = self._checked_table()
        # plain pooling checks the ids itself (one pass fewer); renorm and the float16
        # pooling of a compact float32 copy (max mode) plan the rows first, which
        # needs ids known to be in range
        half = _half.is_half(self.weight)
        copies_half = half and not _half.pools_rows(self.weight, self.mode)
        deferred = self.max_norm is None and not copies_half
        bags = _bags.bags_of(input, offsets, per_sample_weights, self.mode,
                             self.include_last_offset, self.num_embeddings,
                             _half.compute_dtype(self.weight.dtype), be,
                             check_range=not deferred)
        plan = None
        if self.max_norm is not None:
            be.check_writable(self.weight)
            plan = be.plan_rows(bags.flat, self.num_embeddings, self.padding_idx)
            F.renorm_(self.weight, plan, self.max_norm, self.norm_type, self.padding_idx, be)
            if bags.end != bags.flat.shape[0]:
                plan = None  # the backward plans the bagged entries only
        # sum and mean read float16 rows as they are: the plan waits for a backward
        if copies_half and plan is None:
            plan = be.plan_rows(bags.used, self.num_embeddings, self.padding_idx)
        out, argmax, counts = be.bag_forward(self.weight, bags.flat, bags.starts, self.mode,
                                             self.padding_idx, bags.psw, check_range=deferred,
                                             **({"plan": plan} if half else {}))
        src = _sources(be, input, offsets, per_sample_weights)
        bags.flat = _own(bags.flat, src, be.xp)
        bags.starts = _own(bags.starts, src, be.xp)
        bags.psw = _own(bags.psw, src, be.xp)
        self._remember({"bags": bags, "argmax": argmax, "counts": counts, "plan": plan,
                        "entry_bag": None}, layout)
        self.per_sample_weights_grad = None
        return out

    def _grad_parts(self, grad_output, need_plan=True):
        """The pieces every backward form needs, from the last forward:
        ``(grad2d, plan, entry_bag, scale, argmax, bags)``; ``grad2d`` is
        ``grad_output`` as a C-contiguous (n_bags, dim) array of the table's dtype;
        ``plan`` None unless ``need_plan`` or the forward made one, ``entry_bag``
        None unless ``need_plan`` (see ``_bags.plan_needed``).

        The table gradient's row ``plan.rows[u]`` is
        ``bag_row_sum(grad2d, plan segment u, entry_bag, scale, argmax)`` (see
        ``sparsembed/_kernels/_bag.pxd``), divided by the segment's length with
        ``scale_grad_by_freq``.
        """
        saved = self._saved_forward()
        padding_idx, _, _, mode = self._forward_options()
        be = self._backend
        bags = saved["bags"]
        grad = be.as_grad_output(grad_output, (bags.n_bags, self.embedding_dim),
                                 _half.compute_dtype(self.weight.dtype))
        if saved["plan"] is None and need_plan:
            saved["plan"] = be.plan_rows(bags.used, self.num_embeddings, padding_idx)
        if saved["entry_bag"] is None and need_plan:
            saved["entry_bag"] = be.entry_bags(bags.starts)
        entry_bag = saved["entry_bag"]
        scale = _bags.entry_scale(bags, mode, saved["counts"], entry_bag,
                                  _half.compute_dtype(self.weight.dtype), be)
        return grad, saved["plan"], entry_bag, scale, saved["argmax"], bags

    def backward(self, grad_output, optimizer=None):
        """Gradient of the last forward w.r.t. ``weight``, also added into ``grad``.

        Sum and mean modes add each bag's gradient (times the per-sample weight, or
        divided by the bag's count) to its entries' rows; max mode sends each
        column's gradient to the row that won it (first occurrence wins ties);
        padding gets nothing. The options are those the forward ran with (``mode``,
        ``padding_idx``, ``scale_grad_by_freq``, ``sparse``), as in torch. When the
        forward had per-sample weights, their gradient is left in
        ``per_sample_weights_grad`` (computed with the table as it is now, which is
        the forward's table unless it was changed since).

        Parameters
        ----------
        grad_output : ndarray of shape (n_bags, embedding_dim)
        optimizer : sparsembed.optim optimizer, optional
            Fused backward + update, as for :meth:`Embedding.backward`: each touched
            row's gradient is summed and ``optimizer``'s touched-rows update applied to
            it in the same pass (all modes; max mode sends each column to the row that
            won it). Returns None and leaves ``grad``
            untouched; ``per_sample_weights_grad`` is computed first, from the table
            before the update. The layer must be among the optimizer's params.

        Returns
        -------
        ndarray or csr_array of shape (num_embeddings, embedding_dim), or None
            None when ``requires_grad`` is False (the per-sample weights' gradient is
            still computed) or ``optimizer`` is given. The first result after
            ``grad`` was None is ``grad`` itself (see :meth:`Embedding.backward`).
        """
        be = self._backend
        if optimizer is not None:
            self._check_fused(optimizer)
        padding_idx, scale_grad_by_freq, sparse, mode = self._forward_options()
        need_plan = (optimizer is not None
                     or _bags.plan_needed(mode, scale_grad_by_freq, sparse, be))
        grad, plan, entry_bag, scale, argmax, bags = self._grad_parts(grad_output, need_plan)
        # from the table before any update, but kept only once nothing can fail
        psw_grad = _bags.psw_grad(grad, self.weight, bags, entry_bag, padding_idx, be,
                                  plan)
        g = None
        if self.requires_grad:
            if optimizer is not None:
                optimizer._fused_update(self, grad, plan, scale_grad_by_freq,
                                        src=entry_bag, scale=scale, argmax=argmax)
            else:
                g = self._accumulate(_bags.weight_grad(
                    grad, bags, plan, entry_bag, scale, argmax, self.num_embeddings,
                    scale_grad_by_freq, sparse, be))
        self.per_sample_weights_grad = psw_grad
        return g

    def __repr__(self):
        return self._repr_options(self._REPR_DEFAULTS)
