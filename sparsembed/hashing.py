"""The hashing trick: embeddings for unbounded id spaces (``HashEmbedding``).

Ids (any 64-bit integer, int64 or uint64, or strings; one batch may mix them) are
never stored: each id ``x`` is mapped by
``num_hashes`` seeded hash functions to rows ``b_1(x) .. b_k(x)`` of a table of
``num_buckets`` rows, and its vector is the sum of those rows (``mode="sum"``), or
their sum weighted by ``k`` learned importance weights that ``x`` looks up, through one
more hash, in a small table of ``num_weights`` rows (``mode="weighted"``: Svenstrup,
Hansson and Winther, "Hash Embeddings for Efficient Word Representations", 2017).

Two different ids share a whole vector only when all ``k`` buckets collide: with
``num_hashes=2`` and ``num_buckets = 10 * n_distinct_ids`` about ``1 / (100 n)`` of the
ids do (the documented load; a single hash would give ~10% collisions).

Hash functions (stable across processes, platforms and Python's hash randomisation):

- an integer id ``x`` (as uint64, two's complement for negatives) gives
  ``h_j(x) = splitmix64(x XOR key_j)`` where ``key_j = splitmix64(splitmix64(seed) + j)``
  for ``j = 0 .. num_hashes`` (``j = num_hashes`` is the importance hash), and bucket
  ``h_j(x) mod num_buckets``. ``splitmix64(z)``: ``z += 0x9E3779B97F4A7C15;
  z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9; z = (z ^ z >> 27) * 0x94D049BB133111EB;
  z ^ z >> 31`` (mod 2**64). Vectorised in numpy.
- a string (or bytes) first becomes the integer
  ``int.from_bytes(blake2b(utf8_bytes, digest_size=8, key=b"sparsembed"), "little")``
  (one ``hashlib`` call per string), then as above. Never Python's ``hash()``.
"""

import hashlib

import numpy as np

from sparsembed import _half
from sparsembed import _validation as V
from sparsembed._backend import normalize_device
from sparsembed.embedding import _Table, _check_dtype, _summed

__all__ = ["HashEmbedding", "hash_ids", "splitmix64"]

_MODES = ("sum", "weighted")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_STRING_KEY = b"sparsembed"


def splitmix64(z):
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _keys(seed, n):
    s = splitmix64(np.array([seed], dtype=np.uint64))
    return splitmix64(s + np.arange(n, dtype=np.uint64))


def _string_hash(token):
    if isinstance(token, str):
        token = token.encode("utf-8")
    elif not isinstance(token, (bytes, bytearray)):
        raise TypeError(f"ids must be integers or strings, got {type(token).__name__} {token!r}")
    return int.from_bytes(hashlib.blake2b(token, digest_size=8, key=_STRING_KEY).digest(), "little")


def _element_id(token):
    """One id of an object array or a mixed list as its uint64 value: an int in two's
    complement (any 64-bit value), a string hashed."""
    if isinstance(token, (int, np.integer)) and not isinstance(token, (bool, np.bool_)):
        value = int(token)
        if not -2**63 <= value < 2**64:
            raise ValueError(f"integer ids must fit in 64 bits (int64 or uint64), got {value}")
        return value % 2**64
    return _string_hash(token)


def _as_uint64_ids(input):
    """Ids as a uint64 array of the input's shape (ints as two's complement, strings hashed)."""
    if isinstance(input, (str, bytes)):
        raise TypeError("ids must be an array or sequence; wrap a single string in a list")
    arr = np.asarray(input) if not (isinstance(input, (list, tuple)) and len(input) == 0) \
        else np.zeros(0, dtype=np.int64)
    kind = arr.dtype.kind
    if isinstance(input, (list, tuple)) and kind in "USf":
        # numpy gives a list one type: ints beside strings would become strings, ints
        # beside ints past int64 floats; each id is hashed as what it is
        arr, kind = np.asarray(input, dtype=object), "O"
    if kind in "iu":
        return arr.astype(np.int64, copy=False).view(np.uint64) if kind == "i" else arr.astype(np.uint64)
    if kind in "USO":
        flat = arr.reshape(-1)
        out = np.fromiter((_element_id(t) for t in flat.tolist()), dtype=np.uint64, count=flat.size)
        return out.reshape(arr.shape)
    raise TypeError(f"ids must be integers or strings, got dtype {arr.dtype}"
                    + (" (bool is not an id type)" if kind == "b" else ""))


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed)


def hash_ids(input, num_buckets, num_hashes=2, seed=0):
    """Bucket ids: ndarray of shape ``input.shape + (num_hashes,)``, int64 in ``[0, num_buckets)``.

    Parameters
    ----------
    input : array_like of int (any 64-bit value) or str, or a list mixing them
    num_buckets : int >= 1
    num_hashes : int >= 1
    seed : int
        Selects the hash functions (any int; taken mod 2**64).
    """
    num_buckets = V.check_positive_size(num_buckets, "num_buckets")
    num_hashes = V.check_positive_size(num_hashes, "num_hashes")
    seed = _check_seed(seed)
    ids = _as_uint64_ids(input)
    return _hash_rows(ids[..., None], _keys(seed % 2**64, num_hashes), num_buckets)


def _hash_rows(ids, keys, num_rows):
    """``splitmix64(ids ^ keys) mod num_rows`` as int64 (numpy broadcasting): the row
    ids of every hash of :func:`hash_ids` and of the layer."""
    return (splitmix64(ids ^ keys) % np.uint64(num_rows)).astype(np.int64)


class HashImportance:
    """The importance-weight table of a weighted :class:`HashEmbedding`.

    A parameter of its own (``weight``, ``grad``, ``requires_grad``), so it can be
    given to an optimizer next to the embedding: ``se.optim.SGD([emb,
    emb.importance], lr=0.1)``.

    Attributes
    ----------
    weight : ndarray of shape (num_weights, num_hashes)
    grad : None, ndarray or csr_array of that shape
    requires_grad : bool
    """

    def __init__(self, weight, sparse):
        self.weight = weight
        self.grad = None
        self.requires_grad = True
        self.sparse = sparse

    @property
    def num_embeddings(self):
        return self.weight.shape[0]

    @property
    def embedding_dim(self):
        return self.weight.shape[1]

    def zero_grad(self):
        """``grad = None``."""
        self.grad = None

    def __repr__(self):
        return f"HashImportance({self.weight.shape[0]}, {self.weight.shape[1]})"


class HashEmbedding(_Table):
    """Embeddings for an unbounded id space through the hashing trick.

    Parameters
    ----------
    num_buckets : int
        Rows of the shared table.
    embedding_dim : int
    num_hashes : int, default 2
        Buckets per id (k).
    mode : {"sum", "weighted"}, default "sum"
        "sum": ``out = sum_j weight[b_j(x)]``. "weighted": ``out = sum_j
        importance.weight[w(x), j] * weight[b_j(x)]`` with learned importance weights.
    seed : int, default 0
        Seed of the hash functions (the same seed gives the same buckets in every
        process and on every platform).
    sparse : bool, default False
        Gradients as canonical row-sparse ``csr_array`` (as ``Embedding``).
    num_weights : int, optional
        Rows of the importance table (mode "weighted"); default ``num_buckets``.
    weight : ndarray of shape (num_buckets, embedding_dim), optional
        Initial table, used as is when C-contiguous and of ``dtype`` (a memmap works).
    dtype : {numpy.float32, numpy.float64}, default float32
    random_state : None, int or numpy.random.Generator
        Seed of the N(0, 1) initialisation of ``weight``. Importance weights start at 1
        (so a fresh weighted layer equals the summed one).
    device : "cpu"
        Only the CPU is supported.

    Attributes
    ----------
    weight : ndarray of shape (num_buckets, embedding_dim)
    grad : None, ndarray or csr_array
    requires_grad : bool
    importance : HashImportance or None
        The importance table (mode "weighted"), with its own ``weight``/``grad``.

    Notes
    -----
    Unlike ``Embedding`` there is no ``padding_idx``, ``max_norm`` or
    ``scale_grad_by_freq`` (ids are not rows). A bucket hit several times in a batch
    (by several ids, or by two hashes of one id) gets the sum of its gradients.
    Use :meth:`parameters` to hand every trainable table to an optimizer.

    Examples
    --------
    >>> import numpy as np, sparsembed as se
    >>> emb = se.HashEmbedding(1000, 8, num_hashes=2, random_state=0)
    >>> emb(np.array([3, 2**62, -7])).shape
    (3, 8)
    >>> emb(["user:alice", "user:bob"]).shape
    (2, 8)
    """

    _OPTION_NAMES = ("sparse",)
    _OPTION_GETTER = staticmethod(lambda layer: (layer.sparse,))

    def __init__(self, num_buckets, embedding_dim, num_hashes=2, mode="sum", seed=0, sparse=False, *,
                 num_weights=None, weight=None, dtype=np.float32, random_state=None, device="cpu"):
        self.num_buckets = V.check_positive_size(num_buckets, "num_buckets")
        self.embedding_dim = V.check_size(embedding_dim, "embedding_dim")
        self.num_hashes = V.check_positive_size(num_hashes, "num_hashes")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.seed = _check_seed(seed)
        self.sparse = bool(sparse)
        if mode == "weighted":
            self.num_weights = V.check_positive_size(
                self.num_buckets if num_weights is None else num_weights, "num_weights")
        elif num_weights is not None:
            raise ValueError("num_weights is only used with mode='weighted'")
        else:
            self.num_weights = None
        if normalize_device(device) != "cpu":
            raise ValueError(f"HashEmbedding supports device 'cpu' only, got {device!r}")
        self.num_embeddings = self.num_buckets  # what _Table and the optimizers read
        self.padding_idx = None
        self._keys = _keys(self.seed % 2**64, self.num_hashes + 1)
        dtype = _check_dtype(dtype)
        self._init_weight(weight, dtype, random_state, "cpu")
        self.importance = None
        if mode == "weighted":
            self.importance = HashImportance(np.ones((self.num_weights, self.num_hashes), dtype=dtype),
                                             self.sparse)

    def _table_shape(self):
        return (self.num_buckets, self.embedding_dim)

    def _check_options(self):
        pass  # no padding_idx or max_norm to edit

    def _checked_table(self):
        table = super()._checked_table()
        if self.importance is None:
            return table, None
        expected = (self.num_weights, self.num_hashes)
        shape = getattr(self.importance.weight, "shape", None)
        if shape != expected:
            raise ValueError(f"importance.weight has shape {shape}, expected {expected}: "
                             f"a table put in place of the layer's must keep its shape")
        return table, expected

    def reset_parameters(self, random_state=None):
        """Redraw ``weight`` from N(0, 1) in place and set the importance weights to 1.

        Parameters
        ----------
        random_state : None, int or numpy.random.Generator
        """
        super().reset_parameters(random_state)
        if getattr(self, "importance", None) is not None:
            self.importance.weight[...] = 1

    def parameters(self):
        """The trainable tables: ``[self]``, plus ``self.importance`` in weighted mode."""
        return [self] if self.importance is None else [self, self.importance]

    def buckets(self, input):
        """Row ids of ``input``: int64 array of shape ``input.shape + (num_hashes,)``."""
        return self._buckets(_as_uint64_ids(input))

    def _buckets(self, ids):
        return _hash_rows(ids[..., None], self._keys[: self.num_hashes], self.num_buckets)

    def importance_ids(self, input):
        """Rows of the importance table for ``input`` (weighted mode): int64, input's shape."""
        if self.importance is None:
            raise ValueError("importance_ids needs mode='weighted'")
        return self._importance_ids(_as_uint64_ids(input))

    def _importance_ids(self, ids):
        return _hash_rows(ids, self._keys[self.num_hashes], self.num_weights)

    def forward(self, input):
        """Vectors of ``input`` (ints of any value, or strings).

        Returns
        -------
        ndarray of shape ``input.shape + (embedding_dim,)``, weight's dtype
        """
        be = self._backend
        layout = self._checked_table()
        ids = _as_uint64_ids(input)
        buckets = self._buckets(ids)
        shape = ids.shape
        flat = buckets.reshape(-1)
        n, k, d = int(np.prod(shape, dtype=np.int64)), self.num_hashes, self.embedding_dim
        # the buckets are below num_buckets by construction; the copy checks them
        # against the table anyway, at no extra pass
        rows = be.gather(self.weight, flat, check_range=True).reshape(n, k, d)
        if self.importance is None:
            out = rows.sum(axis=1)
            saved_rows = p = wid = None
        else:
            wid = self._importance_ids(ids).reshape(-1)
            p = self.importance.weight[wid]  # (n, k)
            out = np.einsum("nk,nkd->nd", p, rows)
            saved_rows = rows
        self._remember((flat, shape, None, wid, p, saved_rows), layout)
        return out.reshape(shape + (d,))

    def backward(self, grad_output, optimizer=None):
        """Gradient w.r.t. ``weight`` (returned and added into ``grad``); in weighted
        mode the importance table's gradient is added into ``importance.grad``.

        Parameters
        ----------
        grad_output : ndarray of shape ``input.shape + (embedding_dim,)``
        optimizer : sparsembed.optim optimizer, optional
            Fused backward + update (as ``Embedding.backward``): each touched bucket's
            gradient is summed and the optimizer's touched-rows update applied in the
            same pass, without building the gradient matrix; ``grad`` is left alone and
            None is returned. The importance table is updated the same way when it is
            among the optimizer's params (else its gradient goes to ``importance.grad``).

        Returns
        -------
        ndarray or csr_array of shape (num_buckets, embedding_dim), or None
            None when ``requires_grad`` is False (the importance gradient is still
            computed when ``importance.requires_grad``) or with ``optimizer``. The
            first result after ``grad`` was None is ``grad`` itself (see
            :meth:`Embedding.backward`).
        """
        flat, shape, plan, wid, p, rows = self._saved_forward()
        (sparse,) = self._forward_options()
        be = self._backend
        # the forward's sizes (num_hashes is a public attribute, and may have been
        # edited since); gradients of a float16 table are float32, as Embedding's
        n, d = int(np.prod(shape, dtype=np.int64)), self.embedding_dim
        k = flat.shape[0] // n if n else self.num_hashes
        grad = be.as_grad_output(grad_output, shape + (d,),
                                 _half.compute_dtype(self.weight.dtype)).reshape(n, d)
        fuse_importance = False
        if optimizer is not None:
            self._check_fused(optimizer, locate=self.requires_grad)
            if self.importance is not None:
                fuse_importance = any(layer is self.importance for group in optimizer.param_groups
                                      for layer in group["params"])
        # both tables' gradients and checks before either table or gradient is written:
        # a refused embedding table left the importance table updated
        importance = self.importance is not None and self.importance.requires_grad
        if importance:
            dp = np.einsum("nd,nkd->nk", grad, rows)  # d out / d p[n, k] = rows[n, k]
            wplan = be.plan_rows(wid, self.num_weights)
            if fuse_importance:
                optimizer._check_update(self.importance)
            else:
                importance_grad = _summed(self.importance.grad, (
                    be.sparse_grad(dp, wplan, self.num_weights, False) if sparse
                    else be.dense_grad(dp, wplan, self.num_weights, False)), be)
        if self.requires_grad:
            if plan is None:
                plan = be.plan_rows(flat, self.num_buckets)
                self._saved = (flat, shape, plan, wid, p, rows)
            if optimizer is not None:
                optimizer._check_update(self)
            else:
                if self.importance is None:
                    per_hash = np.repeat(grad, k, axis=0)
                else:
                    per_hash = (p[:, :, None] * grad[:, None, :]).reshape(n * k, d)
                g = (be.sparse_grad(per_hash, plan, self.num_buckets, False) if sparse
                     else be.dense_grad(per_hash, plan, self.num_buckets, False))
                total = _summed(self.grad, g, be)
        ready = None
        if importance and fuse_importance and self.requires_grad and optimizer is not None:
            # both tables' state before either is written: a MemoryError for the
            # buckets' state must not leave the importance table updated alone
            targets = [optimizer._target(self.importance), optimizer._target(self)]
            ready = optimizer._prepare_states(targets)
        if importance:
            if fuse_importance:
                try:
                    optimizer._fused_update(self.importance, dp, wplan,
                                            prepared=None if ready is None else ready[0])
                except BaseException:  # both back as they were (again, for importance)
                    if ready is not None:
                        optimizer._restore_states(targets, ready)
                    raise
            else:
                self.importance.grad = importance_grad
        if not self.requires_grad:
            return None
        if optimizer is not None:
            # entry e (bucket occurrence) reads gradient row e // k, scaled by p[e]
            src = np.repeat(np.arange(n, dtype=np.int64), k)
            scale = None if self.importance is None else p.reshape(-1)
            optimizer._fused_update(self, grad, plan, False, src=src, scale=scale,
                                    prepared=None if ready is None else ready[1])
            return None
        self.grad = total
        return g

    def zero_grad(self):
        """Forget the accumulated gradients (of the importance table too)."""
        self.grad = None
        if self.importance is not None:
            self.importance.grad = None

    def state_dict(self):
        """``{"weight": ..., "importance": ...}`` (importance only in weighted mode)."""
        d = {"weight": self.weight}
        if self.importance is not None:
            d["importance"] = self.importance.weight
        return d

    def to(self, device):
        """Only "cpu" is supported; returns self."""
        if normalize_device(device) != "cpu":
            raise ValueError(f"HashEmbedding supports device 'cpu' only, got {device!r}")
        return self

    def __repr__(self):
        parts = [f"{self.num_buckets}, {self.embedding_dim}"]
        for name, default in (("num_hashes", 2), ("mode", "sum"), ("seed", 0), ("sparse", False),
                              ("num_weights", None if self.mode == "sum" else self.num_buckets)):
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        if self.weight.dtype != np.float32:
            parts.append(f"dtype={np.dtype(self.weight.dtype).name}")
        return f"HashEmbedding({', '.join(parts)})"
