"""scikit-learn estimators built on sparsembed's tables.

``EmbeddingEncoder`` turns categorical columns into learned dense features;
``MatrixFactorization`` is a biased matrix-factorization regressor for explicit
ratings. This module needs scikit-learn (``pip install scikit-learn``, or
``pip install '.[sklearn]'`` in a sparsembed checkout);
``import sparsembed`` itself never imports scikit-learn.
"""

import numbers
import sys
import warnings
from collections.abc import Hashable

import numpy as np

try:
    import sklearn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(
        "sparsembed.sklearn needs scikit-learn: pip install scikit-learn "
        "(or pip install '.[sklearn]' in a sparsembed checkout)"
    ) from exc

from sklearn.base import BaseEstimator, RegressorMixin, TransformerMixin
from sklearn.preprocessing import OrdinalEncoder
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import (
    _check_feature_names_in,
    _check_y,
    check_array,
    check_consistent_length,
    check_is_fitted,
    validate_data,
)

from sparsembed import functional as F
from sparsembed import _threads
from sparsembed._threads import get_num_threads
from sparsembed.embedding import Embedding

__all__ = ["EmbeddingEncoder", "MatrixFactorization"]


# --------------------------------------------------------------------------- helpers


class _IdIndex:
    """Maps arbitrary ids (ints, floats, strings) to rows ``0 .. n-1`` by sorted value.

    What ``OrdinalEncoder`` does for one column, kept minimal because it sits on the
    recommender's hot path: ``np.unique`` at fit, ``searchsorted`` at predict (see
    :func:`_lookup_ids`; ids not seen at fit map to -1).
    """

    def __init__(self, values, what="id"):
        values = np.asarray(values)
        if (values.dtype.kind in "iu" and values.size
                and values.min() >= 0 and values.max() <= 4 * values.size + 1024):
            # small non-negative ints (the usual case): a counting pass, O(n + max id)
            present = np.bincount(values) > 0
            self.ids = np.flatnonzero(present).astype(values.dtype)
            codes = (np.cumsum(present) - 1)[values]
        else:
            try:
                self.ids, codes = np.unique(values, return_inverse=True)
            except TypeError:  # ids numpy cannot order: a mix of kinds
                kinds = sorted({type(v).__name__ for v in values.ravel().tolist()})
                raise TypeError(f"{what} ids must be all numbers or all strings (ids of one "
                                f"kind, to be ordered), got a mix of {', '.join(kinds)}") from None
        self.codes = codes.reshape(-1).astype(np.int32 if self.ids.size < 2**31 else np.int64)

    def __len__(self):
        return self.ids.size


def _id_kind(values):
    """"number", "string" or another type's name: what kind of ids ``values`` holds
    (an object array: its first one; fitted ids are all of one kind, or unorderable)."""
    kind = values.dtype.kind
    if kind in "biuf":
        return "number"
    if kind in "US":
        return "string"
    first = values.flat[0] if values.size else None
    if isinstance(first, numbers.Number):
        return "number"
    return "string" if isinstance(first, (str, bytes)) else type(first).__name__


def _warn_other_kind(values, ids, what):
    """A warning when ids of another kind than the fitted ones are looked up (ints
    against ids fitted as strings, say): none of them can be found."""
    values = np.asarray(values)
    if not (values.size and ids.size):
        return
    given, fitted = _id_kind(values), _id_kind(ids)
    if given != fitted:
        warnings.warn(f"{what} ids given as {given}s, but the fitted {what} ids are "
                      f"{fitted}s ({ids.dtype}): none can match, all are treated as "
                      f"unseen", UserWarning, stacklevel=3)


def _lookup_ids(ids, values):
    """Rows of ``values`` in the sorted ``ids`` (-1 where absent)."""
    values = np.asarray(values)
    if ids.size == 0:
        return np.full(values.shape, -1, dtype=np.int64)
    try:
        pos = np.searchsorted(ids, values)
    except TypeError:  # values not comparable with the fitted ids (say str vs int)
        index = {v: k for k, v in enumerate(ids.tolist())}
        rows = [index.get(v, -1) if isinstance(v, Hashable) else -1 for v in values.ravel().tolist()]
        return np.asarray(rows, dtype=np.int64).reshape(values.shape)
    pos = np.minimum(pos, ids.size - 1)
    found = ids[pos] == values
    return np.where(found, pos, -1).astype(np.int64)


def _effective_n_threads(n_threads):
    if n_threads is None:
        return get_num_threads()
    return int(n_threads)


def _dsgd_blocks(counts, n_blocks):
    """Block of each row, balanced by rating counts, and rows renumbered by block.

    Rows sorted by count (descending) are dealt to the blocks in a snake order, which
    gives blocks with nearly equal numbers of ratings. Returns ``(block, inv)``:
    ``block[new_row]`` is the block of a renumbered row, and ``inv[row]`` the new
    number of a row; renumbering makes each block a contiguous range of rows, so
    that two threads never write to the same cache line (no false sharing).
    """
    order = np.argsort(-counts, kind="stable")
    pos = np.empty(counts.size, dtype=np.int64)
    pos[order] = np.arange(counts.size)
    rnd, off = np.divmod(pos, n_blocks)
    block = np.where(rnd % 2 == 0, off, n_blocks - 1 - off)
    new_order = np.argsort(block, kind="stable")
    inv = np.empty(counts.size, dtype=np.int64)
    inv[new_order] = np.arange(counts.size)
    return block[new_order], inv


# --------------------------------------------------------------------------- MF


class MatrixFactorization(RegressorMixin, BaseEstimator):
    """Biased matrix factorization for explicit ratings, trained by SGD.

    Predicts ``r_ui = mu + b_u + b_i + p_u . q_i`` (Funk's SVD as in Surprise's
    ``SVD``): ``mu`` the global mean, ``b_u``/``b_i`` user and item biases, ``p_u``
    and ``q_i`` rows of the factor tables. Training is per-rating SGD with Surprise's
    update rule, so results are directly comparable::

        err  = r - r_ui
        b_u += lr * (err - reg * b_u);       b_i += lr * (err - reg * b_i)
        p_u += lr * (err * q_i - reg * p_u);  q_i += lr * (err * p_u - reg * q_i)

    Each epoch visits the ratings in a fresh order drawn from ``random_state`` and
    runs entirely in compiled code (``sparsembed._kernels._mf``).

    Parallelism and determinism: with one thread an epoch is plain serial SGD. With
    ``B > 1`` threads the epoch follows DSGD's stratified schedule (Gemulla et al.,
    KDD 2011): users and items are dealt into ``B`` blocks each (balanced by rating
    counts); the ``B`` blocks of a stratum ``{(t, (t + s) mod B)}`` share no user
    and no item, so ``B`` threads update them at once without races (no Hogwild),
    and the ``B`` strata run one after another. Only the visiting order changes
    (grouped by block, shuffled within), not the update rule. ``B`` is
    ``min(n_threads, n_ratings // 10000)`` (at least 1): smaller problems train
    serially, where a parallel region per stratum would cost more than it saves.
    The fitted model is a deterministic function of the data, ``random_state`` and
    ``n_threads``: bitwise identical from run to run, statistically equivalent
    (not bitwise equal) across thread counts.

    The factor and bias tables are float32 (as in implicit and LightFM): twice the
    SIMD width of float64 for the same accuracy on ratings; errors are summed in
    float64 and predictions are float64.

    Parameters
    ----------
    n_factors : int, default 100
        Size of ``p_u`` and ``q_i``.
    biased : bool, default True
        Use the global mean and the biases. With False the model is ``p_u . q_i``
        alone (Surprise's ``biased=False``); unseen users or items then predict the
        global mean.
    epochs : int, default 20
        Passes over the ratings.
    lr : float, default 0.005
        SGD step size (Surprise's ``lr_all``).
    reg : float, default 0.02
        L2 regularisation of biases and factors (Surprise's ``reg_all``).
    optimizer : {"sgd"}, default "sgd"
        The per-rating SGD above. (Adaptive optimizers from ``se.optim`` are not
        offered yet: per-rating updates need the fused kernel, which ``se.optim`` does
        not provide; any other value is a ``ValueError`` at ``fit``.)
    init_std : float, default 0.1
        Factors start from N(0, init_std**2); biases start at zero.
    random_state : None, int or numpy.random.RandomState
        Seeds the initial factors and the order of every epoch.
    n_threads : int or None, default None
        Threads (and DSGD blocks) for training; None means
        ``sparsembed.get_num_threads()`` (all usable cores unless set otherwise).

    Attributes
    ----------
    global_mean_ : float
        Mean training rating ``mu``.
    user_embedding_ : sparsembed.Embedding
        User factors ``p_u``, a float32 table of shape (n_users, n_factors).
    item_embedding_ : sparsembed.Embedding
        Item factors ``q_i``, a float32 table of shape (n_items, n_factors).
    user_bias_ : ndarray of shape (n_users,), float32
    item_bias_ : ndarray of shape (n_items,), float32
    user_ids_ : ndarray of shape (n_users,)
        Original user ids, sorted; row ``r`` of the user table is ``user_ids_[r]``.
    item_ids_ : ndarray of shape (n_items,)
        Original item ids, sorted.
    rating_range_ : tuple of float
        (min, max) of the training ratings; predictions are clipped to it, as
        Surprise's ``predict`` does by default.
    train_rmse_ : ndarray of shape (epochs,)
        Training RMSE of each epoch, measured before each rating's update.
    n_features_in_ : int
        Always 2.

    Notes
    -----
    ``check_estimator`` compatibility: ``X`` must hold exactly two id columns, so
    the generic checks that build an ``X`` of another width (3 to 10 feature
    columns, one column, or a 1-D array) cannot fit at all. They are the expected
    failures returned by ``MatrixFactorization._expected_failed_checks()``:
    check_fit_score_takes_y, check_dont_overwrite_parameters,
    check_n_features_in_after_fitting, check_positive_only_tag_during_fit,
    check_estimators_dtypes, check_dtype_object, check_pipeline_consistency,
    check_estimators_nan_inf, check_estimators_pickle,
    check_f_contiguous_array_estimator, check_regressors_train,
    check_regressor_data_not_an_array, check_regressors_no_decision_function,
    check_supervised_y_2d, check_regressors_int,
    check_methods_sample_order_invariance, check_methods_subset_invariance,
    check_fit2d_1sample, check_dict_unchanged, check_fit2d_predict1d. Every other
    check passes, and ``tests/test_sklearn.py``
    tests the properties behind the listed ones (pickling, parameters and
    ``__dict__`` unchanged, dtypes, order and subset invariance, NaN rejection,
    ``n_features_in_``) on two-column data.

    Examples
    --------
    >>> import numpy as np, sparsembed as se
    >>> from sparsembed.sklearn import MatrixFactorization
    >>> users, items, ratings = se.datasets.load_sample_ratings()
    >>> mf = MatrixFactorization(n_factors=8, epochs=30, random_state=0, n_threads=1)
    >>> mf = mf.fit(np.column_stack([users, items]), ratings)
    >>> mf.recommend(0, k=3).shape
    (3,)
    """

    _dtype = np.float32  # factor and bias tables (see the class docstring)
    _min_ratings_per_block = 10_000

    _parameter_constraints = {
        "n_factors": [Interval(numbers.Integral, 1, None, closed="left")],
        "biased": ["boolean"],
        "epochs": [Interval(numbers.Integral, 0, None, closed="left")],
        "lr": [Interval(numbers.Real, 0, None, closed="left")],
        "reg": [Interval(numbers.Real, 0, None, closed="left")],
        "optimizer": [StrOptions({"sgd"})],
        "init_std": [Interval(numbers.Real, 0, None, closed="left")],
        "random_state": ["random_state"],
        "n_threads": [Interval(numbers.Integral, 1, None, closed="left"), None],
    }

    def __init__(self, n_factors=100, *, biased=True, epochs=20, lr=0.005, reg=0.02,
                 optimizer="sgd", init_std=0.1, random_state=None, n_threads=None):
        self.n_factors = n_factors
        self.biased = biased
        self.epochs = epochs
        self.lr = lr
        self.reg = reg
        self.optimizer = optimizer
        self.init_std = init_std
        self.random_state = random_state
        self.n_threads = n_threads

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True  # ids may be strings
        tags.input_tags.categorical = True
        return tags

    @staticmethod
    def _expected_failed_checks():
        """``{check name: reason}`` for ``check_estimator``'s ``expected_failed_checks``.

        Each of these checks builds an ``X`` with a number of columns other than 2
        (or a 1-D one), which ``MatrixFactorization`` rejects by design: ``X`` holds
        (user id, item id) pairs. The properties those checks test (pickling, no
        change of parameters or of ``__dict__`` by ``predict``, dtypes, sample-order
        and subset invariance, ``n_features_in_``, NaN rejection, fitting a fair
        model...) are tested on two-column data in ``tests/test_sklearn.py``.
        """
        reason = "X must hold exactly two id columns (user, item); this check uses another width"
        return {name: reason for name in (
            "check_fit_score_takes_y",
            "check_dont_overwrite_parameters",
            "check_n_features_in_after_fitting",
            "check_positive_only_tag_during_fit",
            "check_estimators_dtypes",
            "check_dtype_object",
            "check_pipeline_consistency",
            "check_estimators_nan_inf",
            "check_estimators_pickle",
            "check_f_contiguous_array_estimator",
            "check_regressors_train",
            "check_regressor_data_not_an_array",
            "check_regressors_no_decision_function",
            "check_supervised_y_2d",
            "check_regressors_int",
            "check_methods_sample_order_invariance",
            "check_methods_subset_invariance",
            "check_fit2d_1sample",
            "check_dict_unchanged",
            "check_fit2d_predict1d",
        )}

    def _validate_X(self, X, reset, y="no_validation"):
        """``([user ids, item ids], y)``: the two id columns as 1-D arrays, y checked."""
        no_y = isinstance(y, str) and y == "no_validation"
        pd = sys.modules.get("pandas")
        if pd is not None and isinstance(X, pd.DataFrame):
            return self._validate_frame(X, reset, y, no_y)
        kwargs = dict(dtype=None, ensure_all_finite=True, reset=reset)
        if no_y:
            X = validate_data(self, X, **kwargs)
        else:
            X, y = validate_data(self, X, y, y_numeric=True, **kwargs)
        if X.shape[1] != 2:
            raise ValueError(
                f"X must have 2 columns (user id, item id), got {X.shape[1]} feature(s)")
        return [X[:, 0], X[:, 1]], y

    def _validate_frame(self, X, reset, y, no_y):
        # each column as it is: one array of a common dtype (sklearn's check) turns
        # int64 ids beside float or nullable (Int64) ones into float64, which merges
        # ids past 2**53 (and returns ids as floats)
        validate_data(self, X, reset=reset, skip_check_array=True)
        if X.shape[1] != 2:
            raise ValueError(
                f"X must have 2 columns (user id, item id), got {X.shape[1]} feature(s)")
        columns = []
        for j, what in enumerate(("user", "item")):
            col = X.iloc[:, j]
            if col.isna().any():
                raise ValueError(f"{what} ids (column {X.columns[j]!r}) hold a missing value "
                                 f"at row {int(np.flatnonzero(col.isna().to_numpy())[0])}")
            columns.append(check_array(col.to_numpy().reshape(-1, 1), dtype=None,
                                       ensure_all_finite=True, input_name="X")[:, 0])
        if not no_y:
            y = _check_y(y, y_numeric=True, estimator=self)
            check_consistent_length(columns[0], y)
        return columns, y

    def fit(self, X, y):
        """Learn biases and factors from ratings.

        Parameters
        ----------
        X : array-like of shape (n_ratings, 2)
            (user id, item id) pairs; ids may be any ints, floats or strings (each
            column of one kind). A DataFrame's columns are read one by one, each
            keeping its dtype (nullable "Int64" ids stay integers).
        y : array-like of shape (n_ratings,)
            Ratings.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            When training diverges (the training RMSE becomes NaN or inf: ``lr`` too
            large); nothing learned is kept.
        """
        self._validate_params()
        (user_col, item_col), y = self._validate_X(X, reset=True, y=y)
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D ratings, got shape {y.shape}")
        rng = check_random_state(self.random_state)
        users = _IdIndex(user_col, "user")
        items = _IdIndex(item_col, "item")
        n_users, n_items, k = len(users), len(items), int(self.n_factors)
        global_mean = float(y.mean())
        # Surprise's order of draws: user factors, then item factors
        dtype = self._dtype
        P = rng.normal(0.0, self.init_std, (n_users, k)).astype(dtype, copy=False)
        Q = rng.normal(0.0, self.init_std, (n_items, k)).astype(dtype, copy=False)
        bu = np.zeros(n_users, dtype=dtype)
        bi = np.zeros(n_items, dtype=dtype)
        u, i = users.codes, items.codes
        n = y.size
        # DSGD blocks only when each thread gets real work: a parallel region per
        # stratum costs more than SGD on a few thousand ratings
        B = max(1, min(_effective_n_threads(self.n_threads), n // self._min_ratings_per_block))
        if B > 1:
            # train on rows renumbered so that each block is contiguous (see _dsgd_blocks)
            ublock, uinv = _dsgd_blocks(np.bincount(u, minlength=n_users), B)
            iblock, iinv = _dsgd_blocks(np.bincount(i, minlength=n_items), B)
            u, i = uinv[u].astype(u.dtype), iinv[i].astype(i.dtype)
            P[uinv], Q[iinv] = P.copy(), Q.copy()
            ub, ib = ublock[u], iblock[i]
            key = (((ib - ub) % B) * B + ub).astype(np.int16 if B * B < 2**15 else np.int64)
        else:
            key = np.zeros(n, dtype=np.int16)
        starts = np.zeros(B * B + 1, dtype=np.int64)
        np.cumsum(np.bincount(key, minlength=B * B), out=starts[1:])
        sse = np.zeros(B * B)
        y_t = y.astype(dtype, copy=False)
        history = np.empty(self.epochs)
        from sparsembed._kernels._mf import sgd_epoch

        for epoch in range(self.epochs):
            order = rng.permutation(n)
            if B > 1:
                order = order[np.argsort(key[order], kind="stable")]
            sgd_epoch(u[order], i[order], y_t[order], starts, P, Q, bu, bi,
                      global_mean, float(self.lr), float(self.reg), bool(self.biased),
                      sse, _threads.kernel_threads(B))  # B blocks: the same on fewer threads
            history[epoch] = np.sqrt(sse.sum() / max(n, 1))
            if not np.isfinite(history[epoch]):  # nothing learned is kept
                raise ValueError(
                    f"MatrixFactorization diverged: the training RMSE is {history[epoch]} "
                    f"after epoch {epoch + 1} (lr={self.lr}); lower lr or raise reg")
        if B > 1:  # back to the rows of the sorted ids
            P, Q, bu, bi = P[uinv], Q[iinv], bu[uinv], bi[iinv]
            u, i = users.codes, items.codes
        self.user_ids_, self.item_ids_ = users.ids, items.ids
        self.global_mean_ = global_mean
        self.rating_range_ = (float(y.min()), float(y.max()))
        self.train_rmse_ = history
        self.user_bias_, self.item_bias_ = bu, bi
        self.user_embedding_ = Embedding(n_users, k, weight=P, dtype=dtype)
        self.item_embedding_ = Embedding(n_items, k, weight=Q, dtype=dtype)
        # (user row, item row) pairs seen in training, for recommend(exclude_seen=True)
        seen = np.sort(u.astype(np.int64) * n_items + i)
        seen = seen[np.concatenate(([True], seen[1:] != seen[:-1]))]
        self._seen_indptr = np.searchsorted(seen // n_items, np.arange(n_users + 1))
        self._seen_items = (seen % n_items).astype(np.int64)
        return self

    def _score(self, urow, irow):
        """Raw scores (no clipping) for rows ``urow``/``irow`` (-1 = unseen)."""
        uk, ik = urow >= 0, irow >= 0
        both = uk & ik
        P, Q = self.user_embedding_.weight, self.item_embedding_.weight
        out = np.full(urow.shape, self.global_mean_, dtype=np.float64)
        if self.biased:
            out[uk] += self.user_bias_[urow[uk]]
            out[ik] += self.item_bias_[irow[ik]]
            out[both] += np.einsum("ij,ij->i", P[urow[both]], Q[irow[both]])
        else:
            out[both] = np.einsum("ij,ij->i", P[urow[both]], Q[irow[both]])
        return out

    def predict(self, X):
        """Predicted ratings, clipped to ``rating_range_``.

        Unseen users or items fall back to what is known: the global mean plus the
        known bias (no factor term); both unseen gives the global mean.

        Parameters
        ----------
        X : array-like of shape (n_pairs, 2)
            (user id, item id) pairs.

        Returns
        -------
        ndarray of shape (n_pairs,), float64
        """
        check_is_fitted(self)
        (user_col, item_col), _ = self._validate_X(X, reset=False)
        _warn_other_kind(user_col, self.user_ids_, "user")
        _warn_other_kind(item_col, self.item_ids_, "item")
        urow = _lookup_ids(self.user_ids_, user_col)
        irow = _lookup_ids(self.item_ids_, item_col)
        return np.clip(self._score(urow, irow), *self.rating_range_)

    def recommend(self, user, k=10, exclude_seen=True):
        """The ``k`` items with the highest predicted rating for ``user``.

        Parameters
        ----------
        user : scalar
            A user id as given to ``fit``. An unseen user gets the items with the
            highest bias (the popular-and-well-rated fallback).
        k : int, default 10
        exclude_seen : bool, default True
            Leave out the items the user rated in the training data.

        Returns
        -------
        ndarray of shape (min(k, n_candidates),)
            Item ids (as given to ``fit``), best first; ties broken by item id.
        """
        check_is_fitted(self)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        if np.ndim(user) != 0:
            raise ValueError(f"user must be a single user id (recommend takes one user at "
                             f"a time), got an array of shape {np.shape(user)}")
        if user is None or not isinstance(user, Hashable):
            raise TypeError(f"user must be a user id (a number or a string), got {user!r}")
        one = np.asarray([user])
        _warn_other_kind(one, self.user_ids_, "user")
        urow = int(_lookup_ids(self.user_ids_, one)[0])
        n_items = self.item_ids_.size
        scores = np.full(n_items, self.global_mean_ if self.biased else 0.0)
        if self.biased:
            scores += self.item_bias_
        if urow >= 0:
            scores += self.item_embedding_.weight @ self.user_embedding_.weight[urow]
        candidates = np.arange(n_items)
        if exclude_seen and urow >= 0:
            seen = self._seen_items[self._seen_indptr[urow]:self._seen_indptr[urow + 1]]
            mask = np.ones(n_items, dtype=bool)
            mask[seen] = False
            candidates = candidates[mask]
        k = min(int(k), candidates.size)
        # stable sort by -score keeps the lower item row first among ties
        best = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
        return self.item_ids_[best]


# --------------------------------------------------------------------------- encoder


class _Param:
    """A dense trainable array in the shape ``se.optim`` expects (weight, grad)."""

    def __init__(self, weight):
        self.weight = weight
        self.grad = None
        self.requires_grad = True


class _Adagrad:
    """torch's Adagrad (lr_decay=0, weight_decay=0, eps=1e-10) on dense or csr grads.

    Used until ``sparsembed.optim`` is available; a csr gradient updates only its
    stored rows (torch's sparse Adagrad): ``s[r] += g**2; w[r] -= lr * g / (sqrt(s[r]) + eps)``.
    """

    def __init__(self, params, lr, eps=1e-10):
        self.params = list(params)
        self.lr = lr
        self.eps = eps
        self._sums = [np.zeros_like(p.weight) for p in self.params]

    def step(self):
        import scipy.sparse as sp

        from sparsembed import _rowsparse

        for p, s in zip(self.params, self._sums):
            g = p.grad
            if g is None:
                continue
            if sp.issparse(g):
                rows, vals = _rowsparse.row_values(g)
                acc = s[rows] + vals * vals
                s[rows] = acc
                p.weight[rows] -= self.lr * vals / (np.sqrt(acc) + self.eps)
            else:
                s += g * g
                p.weight -= self.lr * g / (np.sqrt(s) + self.eps)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def _adagrad(params, lr):
    """``sparsembed.optim.Adagrad`` when the package has it, else the local fallback."""
    try:
        from sparsembed.optim import Adagrad
    except ImportError:
        return _Adagrad(params, lr)
    return Adagrad(params, lr=lr)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _pandas_na_as_nan(X):
    """``X`` with pandas' ``pd.NA`` as ``np.nan`` in its nullable "string" columns
    and its object columns that hold one: sklearn's encoders refuse strings beside
    ``pd.NA`` ("uniformly strings or numbers") but take ``np.nan`` as a missing value,
    the category this encoder promises (an object column's None stays None, its own
    category, as in sklearn). Nullable integer ("Int64", "UInt64") columns become
    numpy integers, or objects with ``np.nan`` where they hold ``pd.NA``: sklearn
    reads them as float64, which merges ids past 2**53. Other inputs are returned as
    they are."""
    pd = sys.modules.get("pandas")
    if pd is None or not isinstance(X, pd.DataFrame):
        return X
    fixes = {}
    for i, dtype in enumerate(X.dtypes):
        nullable_int = (isinstance(dtype, pd.api.extensions.ExtensionDtype)
                        and getattr(dtype, "kind", "") in ("i", "u")
                        and getattr(dtype, "numpy_dtype", None) is not None)
        if not (nullable_int or isinstance(dtype, pd.StringDtype) or dtype == object):
            continue
        col = X.iloc[:, i]
        if not col.isna().any():
            if nullable_int:
                fixes[i] = col.astype(dtype.numpy_dtype)
            continue
        if isinstance(dtype, pd.StringDtype) or nullable_int:
            fixes[i] = col.astype(object).where(col.notna(), np.nan)
        else:
            values = col.to_numpy()
            is_na = np.fromiter((v is pd.NA for v in values), bool, values.size)
            if is_na.any():
                values = values.copy()
                values[is_na] = np.nan
                fixes[i] = pd.Series(values, index=col.index, dtype=object)
    if not fixes:
        return X
    X = X.copy()
    for i, col in fixes.items():
        X.isetitem(i, col)
    return X


class EmbeddingEncoder(TransformerMixin, BaseEstimator):
    """Encode categorical columns as dense, optionally target-trained, embeddings.

    Each column gets its categories (learned as ``OrdinalEncoder`` learns them: ints,
    floats, strings, pandas categoricals, missing values as a category of their own)
    and its own ``sparsembed.Embedding`` table with one extra out-of-vocabulary (OOV)
    row. ``transform`` looks each value up and concatenates the vectors:
    (n_samples, n_columns * embedding_dim) float64.

    ``fit(X)`` keeps the seeded random tables (N(0, 1) entries, torch's default).
    ``fit(X, y)`` trains them as "entity embeddings" (Guo & Berkhahn, 2016): a linear
    head on the concatenated embeddings, minibatches of 128 rows in a seeded order,
    sparse Adagrad updates of the rows a batch touches (``sparsembed.optim.Adagrad``
    when available) and of the head, for ``epochs`` passes. The kernels run on one
    thread during training (batches are too small to share out). The loss follows the
    target type as ``TargetEncoder`` infers it: squared loss on the standardised
    target for a continuous one (one head output per output column), log loss for a
    binary one, softmax cross-entropy for a multiclass one, one log loss per column
    for a multilabel indicator. The head is discarded after training.

    The OOV row is set at the end of ``fit`` to the frequency-weighted mean of the
    column's rows, so an unseen category looks like an average one.

    Parameters
    ----------
    embedding_dim : int, default 8
        Size of each column's vectors.
    handle_unknown : {"use_oov", "error"}, default "use_oov"
        Unseen categories at ``transform``: the OOV row, or a ``ValueError``.
    max_norm : float, optional
        Rows are kept within this L2 norm: renormed at every lookup during training
        (torch's ``max_norm``) and once more at the end of ``fit``, so ``transform``
        never changes the tables.
    epochs : int, default 10
        Training passes over the data when ``y`` is given.
    lr : float, default 0.05
        Adagrad learning rate.
    random_state : None, int or numpy.random.RandomState
        Seeds the tables and the order of the training batches.
    target_type : {"auto", "continuous", "binary", "multiclass"}, default "auto"
        The target's type, as ``TargetEncoder``'s parameter: "auto" infers it
        (``type_of_target``), which takes whole numbers for class labels -- prices in
        whole units would train a softmax over every price seen, so "auto" warns when
        it finds a numeric target of more than 100 classes; say "continuous" there.

    Attributes
    ----------
    categories_ : list of ndarray
        The categories of each column (``OrdinalEncoder``'s ``categories_``); row
        ``r`` of table ``j`` is ``categories_[j][r]``, row ``len(categories_[j])``
        is the OOV row.
    embeddings_ : list of sparsembed.Embedding
        One float64 table per column, of shape (len(categories_[j]) + 1, embedding_dim).
    target_type_ : str or None
        "continuous", "continuous-multioutput", "binary", "multiclass",
        "multilabel-indicator", or None when fitted without ``y``.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` had string column names.

    Notes
    -----
    Output is always float64 (the tables are float64), whatever the input dtype; it
    passes every check of ``sklearn.utils.estimator_checks.check_estimator`` without
    expected failures.

    Examples
    --------
    >>> import numpy as np
    >>> from sparsembed.sklearn import EmbeddingEncoder
    >>> X = np.array([["a", "x"], ["b", "y"], ["a", "y"]], dtype=object)
    >>> enc = EmbeddingEncoder(embedding_dim=2, random_state=0).fit(X, [1.0, 2.0, 1.5])
    >>> enc.transform([["b", "z"]]).shape
    (1, 4)
    >>> list(enc.get_feature_names_out())
    ['x0_0', 'x0_1', 'x1_0', 'x1_1']
    """

    _parameter_constraints = {
        "embedding_dim": [Interval(numbers.Integral, 1, None, closed="left")],
        "handle_unknown": [StrOptions({"use_oov", "error"})],
        "max_norm": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "epochs": [Interval(numbers.Integral, 0, None, closed="left")],
        "lr": [Interval(numbers.Real, 0, None, closed="neither")],
        "random_state": ["random_state"],
        "target_type": [StrOptions({"auto", "continuous", "binary", "multiclass"})],
    }

    # a numeric target "auto" reads as classes warns past this many of them
    _MANY_CLASSES = 100

    _batch_size = 128

    def __init__(self, embedding_dim=8, *, handle_unknown="use_oov", max_norm=None,
                 epochs=10, lr=0.05, random_state=None, target_type="auto"):
        self.embedding_dim = embedding_dim
        self.handle_unknown = handle_unknown
        self.max_norm = max_norm
        self.epochs = epochs
        self.lr = lr
        self.random_state = random_state
        self.target_type = target_type

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.categorical = True
        tags.input_tags.string = True
        tags.input_tags.allow_nan = True
        return tags

    def _codes(self, X, reset):
        """Validate ``X`` and return the table rows, int64 of shape (n_samples, n_columns)."""
        if getattr(X, "ndim", None) == 1 or (
                isinstance(X, (list, tuple)) and len(X) and np.ndim(X[0]) == 0):
            raise ValueError(
                "Expected a 2-dimensional container but got a 1-D one. Reshape your data "
                "either using array.reshape(-1, 1) if your data has a single feature or "
                "array.reshape(1, -1) if it contains a single sample.")
        X = _pandas_na_as_nan(validate_data(self, X, reset=reset, skip_check_array=True))
        if not reset:
            X = self._numbers_as_objects(X)
        if reset:
            unknown = "use_encoded_value" if self.handle_unknown == "use_oov" else "error"
            self._ordinal = OrdinalEncoder(
                handle_unknown=unknown,
                unknown_value=-1 if unknown == "use_encoded_value" else None,
                encoded_missing_value=-2,
                dtype=np.float64,
            )
            codes = self._ordinal.fit_transform(X)
        else:
            codes = self._ordinal.transform(X)
        codes = codes.astype(np.int64)
        for j, cats in enumerate(self._ordinal.categories_):
            col = codes[:, j]
            col[col == -1] = len(cats)  # unseen: the OOV row
            if (col == -2).any():  # missing, seen at fit: its own category (the last)
                col[col == -2] = len(cats) - 1
        return codes

    def _numbers_as_objects(self, X):
        """``X`` with the numeric columns whose fitted categories are not numbers (a
        column read as all-NaN floats, or given ints, where strings were fitted) as
        object columns: then their values are unseen categories (or missing), as
        ``handle_unknown`` says, where ``OrdinalEncoder`` raised a TypeError about
        ``isnan`` or failed to compare them."""
        text = [cats.dtype.kind not in "biuf" for cats in self._ordinal.categories_]
        if not any(text):
            return X
        pd = sys.modules.get("pandas")
        if pd is not None and isinstance(X, pd.DataFrame):
            numeric = [j for j, dtype in enumerate(X.dtypes)
                       if j < len(text) and text[j] and dtype.kind in "biuf"]
            if numeric:
                X = X.copy()
                for j in numeric:
                    X.isetitem(j, X.iloc[:, j].astype(object))
            return X
        if isinstance(X, np.ndarray) and X.dtype.kind in "biuf":
            return X.astype(object)
        return X

    def fit(self, X, y=None):
        """Learn the categories and the tables (trained on ``y`` when given).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_columns)
            Categorical columns (numpy array, list, or pandas DataFrame).
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), optional
            Target; None keeps the seeded random tables.

        Returns
        -------
        self
        """
        self._validate_params()
        codes = self._codes(X, reset=True)
        self.target_type_ = None
        if y is not None:
            kind, Y = self._prepare_target(y, codes.shape[0])
        rng = check_random_state(self.random_state)
        self.categories_ = self._ordinal.categories_
        dim = int(self.embedding_dim)
        self.embeddings_ = [
            Embedding(len(cats) + 1, dim, max_norm=self.max_norm, sparse=True,
                      weight=rng.standard_normal((len(cats) + 1, dim)), dtype=np.float64)
            for cats in self.categories_
        ]
        if y is not None:
            self._train(codes, kind, Y, rng)
        for j, table in enumerate(self.embeddings_):
            n_cat = len(self.categories_[j])
            counts = np.bincount(codes[:, j], minlength=n_cat + 1)[:n_cat]
            w = table.weight
            if self.max_norm is not None:
                F.embedding_renorm_(w, np.arange(n_cat, dtype=np.int64), self.max_norm)
            w[n_cat] = counts @ w[:n_cat] / max(counts.sum(), 1)
            table.zero_grad()
            table._saved = None  # do not keep the last training batch alive
        return self

    def _prepare_target(self, y, n_samples):
        y = check_array(y, ensure_2d=False, dtype=None, input_name="y",
                        ensure_all_finite=True, ensure_min_samples=0)
        if y.shape[0] != n_samples:
            raise ValueError(
                f"y has {y.shape[0]} samples, but X has {n_samples} samples")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        kind = type_of_target(y, input_name="y", raise_unknown=True)
        # np.unique of a 1-D y, worked out once for the checks and the one-hot below
        classes = inverse = None
        if self.target_type == "auto":
            if kind == "multiclass" and y.dtype.kind in "iuf":
                classes, inverse = np.unique(y, return_inverse=True)
                n_classes = classes.size
                if n_classes > self._MANY_CLASSES:
                    warnings.warn(
                        f"y holds {n_classes} distinct whole numbers, taken for classes "
                        f"(a softmax over {n_classes} outputs); pass "
                        f"target_type='continuous' for a numeric target, or "
                        f"target_type='multiclass' to keep the classes", UserWarning,
                        stacklevel=3)
        elif self.target_type == "continuous":
            if y.dtype.kind not in "iufb":
                raise ValueError(f"target_type='continuous' needs a numeric y, got dtype {y.dtype}")
            kind = "continuous-multioutput" if y.ndim == 2 else "continuous"
        else:
            if y.ndim != 1:
                raise ValueError(f"target_type={self.target_type!r} needs a 1-D y, got shape "
                                 f"{y.shape}")
            classes, inverse = np.unique(y, return_inverse=True)
            n_classes = classes.size
            if self.target_type == "binary" and n_classes > 2:
                raise ValueError(f"target_type='binary' needs at most 2 classes, y has "
                                 f"{n_classes}")
            kind = self.target_type
        self.target_type_ = kind
        if kind in ("continuous", "continuous-multioutput"):
            Y = np.asarray(y, dtype=np.float64).reshape(n_samples, -1)
            std = Y.std(axis=0)
            Y = (Y - Y.mean(axis=0)) / np.where(std > 0, std, 1.0)
            return "squared", Y
        if kind in ("binary", "multiclass") and classes is None:
            classes, inverse = np.unique(y, return_inverse=True)
        if kind == "binary":
            return "logistic", (y == classes[-1]).astype(np.float64).reshape(-1, 1)
        if kind == "multiclass":
            Y = np.zeros((n_samples, classes.size))
            Y[np.arange(n_samples), inverse.reshape(-1)] = 1.0
            return "softmax", Y
        if kind == "multilabel-indicator":
            return "logistic", np.asarray(y, dtype=np.float64)
        raise ValueError(
            f"EmbeddingEncoder cannot train on a target of type {kind!r}: expected a "
            f"continuous, binary, multiclass or multilabel-indicator target")

    def _train(self, codes, kind, Y, rng):
        """Entity-embedding training: linear head, minibatch sparse Adagrad."""
        n, m = codes.shape
        dim = int(self.embedding_dim)
        tables = self.embeddings_
        n_out = Y.shape[1]
        mean = Y.mean(axis=0)
        if kind == "squared":
            bias = mean.copy()
        elif kind == "logistic":
            p = np.clip(mean, 1e-6, 1 - 1e-6)
            bias = np.log(p / (1 - p))
        else:
            bias = np.log(np.clip(mean, 1e-12, None))
        head_w = _Param(np.zeros((m * dim, n_out)))
        head_b = _Param(bias.reshape(1, n_out))  # 2-D, as se.optim wants its tables
        opt = _adagrad(tables + [head_w, head_b], float(self.lr))
        bs = self._batch_size
        # minibatches of a hundred rows are far too small to split across threads (a
        # parallel region costs more than the work); for this Python thread only
        with _threads.limited_threads(1):
            self._epochs(codes, kind, Y, rng, tables, head_w, head_b, opt, bs, dim)

    def _epochs(self, codes, kind, Y, rng, tables, head_w, head_b, opt, bs, dim):
        n = codes.shape[0]
        for _ in range(self.epochs):
            perm = rng.permutation(n)
            for start in range(0, n, bs):
                idx = perm[start:start + bs]
                feats = np.concatenate([t.forward(codes[idx, j]) for j, t in enumerate(tables)],
                                       axis=1)
                z = feats @ head_w.weight + head_b.weight
                if kind == "squared":
                    g = z - Y[idx]
                elif kind == "logistic":
                    g = _sigmoid(z) - Y[idx]
                else:
                    g = _softmax(z) - Y[idx]
                g /= idx.size
                head_w.grad = feats.T @ g
                head_b.grad = g.sum(axis=0, keepdims=True)
                g_feats = g @ head_w.weight.T
                for j, t in enumerate(tables):
                    t.backward(np.ascontiguousarray(g_feats[:, j * dim:(j + 1) * dim]))
                opt.step()
                opt.zero_grad()

    def transform(self, X):
        """Look up each column's vectors and concatenate them.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_columns)

        Returns
        -------
        ndarray of shape (n_samples, n_columns * embedding_dim), float64

        Raises
        ------
        ValueError
            With ``handle_unknown="error"``, for a category not seen at ``fit``.
        """
        check_is_fitted(self)
        codes = self._codes(X, reset=False)
        dim = self.embeddings_[0].embedding_dim if self.embeddings_ else 0
        out = np.empty((codes.shape[0], len(self.embeddings_) * dim), dtype=np.float64)
        for j, table in enumerate(self.embeddings_):
            out[:, j * dim:(j + 1) * dim] = F.embedding(codes[:, j], table.weight)
        return out

    def get_feature_names_out(self, input_features=None):
        """``"{column}_{k}"`` for each column and each of its ``embedding_dim`` dimensions.

        Parameters
        ----------
        input_features : array-like of str, optional
            Column names; default ``feature_names_in_``, else ``x0, x1, ...``.

        Returns
        -------
        ndarray of str of shape (n_columns * embedding_dim,)
        """
        check_is_fitted(self)
        names = _check_feature_names_in(self, input_features)
        dim = int(self.embeddings_[0].embedding_dim) if self.embeddings_ else 0
        return np.asarray([f"{name}_{k}" for name in names for k in range(dim)], dtype=object)
