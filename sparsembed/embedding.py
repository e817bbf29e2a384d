"""Layers: a trainable table of vectors looked up by integer ids."""

import numpy as np

from sparsembed import _validation as V
from sparsembed import functional as F
from sparsembed._backend import backend_of, get_backend, normalize_device

__all__ = ["Embedding"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


class _Table:
    """What every table layer shares: the weight, its gradient and their life cycle.

    Subclasses set ``num_embeddings``, ``embedding_dim``, ``padding_idx`` and the
    other options, then call :meth:`_init_weight`.
    """

    def _init_weight(self, weight, dtype, random_state, device):
        self.device = normalize_device(device)
        get_backend(self.device)  # no CuPy / no GPU: fail before any work
        self.random_state = random_state
        self.requires_grad = True
        self.grad = None
        self._saved = None
        shape = (self.num_embeddings, self.embedding_dim)
        if weight is None:
            self.weight = np.empty(shape, dtype=dtype)
            self.reset_parameters(random_state)
        else:
            arr = np.asarray(weight) if not hasattr(weight, "__cuda_array_interface__") else weight
            if tuple(arr.shape) != shape:
                raise ValueError(f"weight has shape {tuple(arr.shape)}, expected {shape}")
            if isinstance(arr, np.ndarray) and (arr.dtype != dtype or not arr.flags.c_contiguous):
                arr = np.ascontiguousarray(arr, dtype=dtype)
            elif arr.dtype != dtype or not arr.flags.c_contiguous:  # a device array
                arr = arr.astype(dtype, order="C")
            self.weight = arr
        if self.device != "cpu" or not isinstance(self.weight, np.ndarray):
            self._move(self.device)

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
        values = rng.standard_normal(self.weight.shape)
        if self.padding_idx is not None:
            values[self.padding_idx] = 0
        be = backend_of(self.weight)  # the table may still be on the host during __init__
        self.weight[...] = be.xp.asarray(values, dtype=self.weight.dtype)

    def zero_grad(self):
        """Forget the accumulated gradient (``grad = None``)."""
        self.grad = None

    def _accumulate(self, grad):
        self.grad = grad if self.grad is None else self._backend.add_grad(self.grad, grad)
        return grad

    def _saved_forward(self):
        if self._saved is None:
            raise RuntimeError("backward() called before any forward()")
        return self._saved

    def state_dict(self):
        """``{"weight": weight}`` (the array itself, as torch shares storage)."""
        return {"weight": self.weight}

    def load_state_dict(self, state_dict):
        """Copy ``state_dict["weight"]`` into the table (same shape; cast to its dtype).

        Raises
        ------
        RuntimeError
            Missing or unexpected keys, or a shape mismatch (torch's behaviour).
        """
        keys = set(state_dict)
        if keys != {"weight"}:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"missing keys {sorted({'weight'} - keys)}, unexpected keys {sorted(keys - {'weight'})}"
            )
        new = state_dict["weight"]
        if tuple(new.shape) != tuple(self.weight.shape):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: size mismatch "
                f"for weight: copying a param with shape {tuple(new.shape)}, the shape in "
                f"the current model is {tuple(self.weight.shape)}"
            )
        self.weight[...] = self._backend.xp.asarray(new, dtype=self.weight.dtype)

    def to(self, device):
        """Move the table (and its gradient) to ``device`` ("cpu" or "cuda"); returns self."""
        self._move(normalize_device(device))
        return self

    def _move(self, device):
        be = get_backend(device)
        self.weight = be.from_host(self.weight) if device != "cpu" else _to_host(self.weight)
        if self.grad is not None:
            self.grad = be.from_host(self.grad) if device != "cpu" else _to_host(self.grad)
        self._saved = None
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
                parts.append(f"{name}={value!r}")
        if self.weight.dtype != np.float32:
            parts.append(f"dtype={np.dtype(self.weight.dtype).name}")
        if self.device != "cpu":
            parts.append(f"device={self.device!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


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
        p of that norm (``inf``, ``-inf``, 0 and negative p allowed).
    scale_grad_by_freq : bool, default False
        Divide each row's gradient by how often its id occurs in the batch (works with
        ``sparse=True`` too, unlike torch).
    sparse : bool, default False
        Gradients as canonical ``scipy.sparse.csr_array``: sorted distinct rows, each
        a full row of ``embedding_dim`` entries.
    weight : ndarray of shape (num_embeddings, embedding_dim), optional
        Initial table, used as is (no copy, padding row not zeroed, like torch's
        ``_weight``) when it is C-contiguous and of ``dtype``; otherwise converted.
    dtype : {numpy.float32, numpy.float64}, default float32
    random_state : None, int or numpy.random.Generator
        Seed of the default N(0, 1) initialisation.
    device : {"cpu", "cuda"}, default "cpu"

    Attributes
    ----------
    weight : ndarray of shape (num_embeddings, embedding_dim)
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

        Shares memory with ``embeddings`` when it is a C-contiguous float32/float64
        ndarray (otherwise converts it to float32, or keeps float64); does not zero
        the padding row; ``requires_grad = not freeze``.

        Parameters
        ----------
        embeddings : array of shape (num_embeddings, embedding_dim)
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
        """
        be = self._backend
        idx, flat = F.lookup_ids(input, self.num_embeddings, be)
        plan = None
        if self.max_norm is not None:
            be.check_writable(self.weight)
            plan = be.plan_rows(flat, self.num_embeddings, self.padding_idx)
            F.renorm_(self.weight, plan, self.max_norm, self.norm_type, self.padding_idx, be)
        out = be.gather(self.weight, flat).reshape(idx.shape + (self.embedding_dim,))
        if isinstance(input, be.xp.ndarray) and be.xp.may_share_memory(flat, input):
            flat = flat.copy()  # the caller may reuse its index buffer before backward
        self._saved = (flat, idx.shape, plan)
        return out

    __call__ = forward

    def _plan(self):
        flat, shape, plan = self._saved_forward()
        if plan is None:
            plan = self._backend.plan_rows(flat, self.num_embeddings, self.padding_idx)
            self._saved = (flat, shape, plan)
        return flat, shape, plan

    def backward(self, grad_output):
        """Gradient of the last forward w.r.t. ``weight``, also added into ``grad``.

        Parameters
        ----------
        grad_output : ndarray of shape ``input.shape + (embedding_dim,)``
            Cast to the table's dtype.

        Returns
        -------
        ndarray of shape (num_embeddings, embedding_dim), csr_array of that shape, or None
            The dense gradient, or with ``sparse=True`` the canonical row-sparse one;
            None when ``requires_grad`` is False.
        """
        flat, shape, _ = self._saved_forward()
        be = self._backend
        grad = be.as_grad_output(grad_output, shape + (self.embedding_dim,), self.weight.dtype)
        if not self.requires_grad:
            return None
        _, _, plan = self._plan()
        g = F.weight_grad(grad.reshape(flat.shape[0], self.embedding_dim), plan,
                          self.num_embeddings, self.scale_grad_by_freq, self.sparse, be)
        return self._accumulate(g)

    def __repr__(self):
        return self._repr_options(self._REPR_DEFAULTS)
