"""scikit-learn estimators built on sparsembed's tables.

``EmbeddingEncoder`` turns categorical columns into learned dense features;
``MatrixFactorization`` is a biased matrix-factorization regressor for explicit
ratings. This module needs scikit-learn (``pip install sparsembed[sklearn]``);
``import sparsembed`` itself never imports scikit-learn.
"""

import numbers

import numpy as np

try:
    import sklearn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(
        "sparsembed.sklearn needs scikit-learn: pip install 'sparsembed[sklearn]' "
        "(or pip install scikit-learn)"
    ) from exc

from sklearn.base import BaseEstimator, RegressorMixin, TransformerMixin
from sklearn.preprocessing import OrdinalEncoder
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import (
    _check_feature_names_in,
    check_array,
    check_is_fitted,
    validate_data,
)

from sparsembed import functional as F
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

    def __init__(self, values):
        self.ids, codes = np.unique(values, return_inverse=True)
        self.codes = codes.reshape(-1).astype(np.int32 if self.ids.size < 2**31 else np.int64)

    def __len__(self):
        return self.ids.size


def _lookup_ids(ids, values):
    """Rows of ``values`` in the sorted ``ids`` (-1 where absent)."""
    values = np.asarray(values)
    if ids.size == 0:
        return np.full(values.shape, -1, dtype=np.int64)
    try:
        pos = np.searchsorted(ids, values)
    except TypeError:  # ids of a type that cannot be compared with the fitted ones
        return np.full(values.shape, -1, dtype=np.int64)
    pos = np.minimum(pos, ids.size - 1)
    found = ids[pos] == values
    return np.where(found, pos, -1).astype(np.int64)


def _effective_n_threads(n_threads):
    if n_threads is None:
        return get_num_threads()
    return int(n_threads)


def _dsgd_blocks(codes, counts, n_blocks):
    """Block of each row: rows sorted by count (descending) dealt in a snake order.

    Gives blocks with nearly equal numbers of ratings; deterministic.
    """
    order = np.argsort(-counts, kind="stable")
    pos = np.empty(counts.size, dtype=np.int64)
    pos[order] = np.arange(counts.size)
    rnd, off = np.divmod(pos, n_blocks)
    block = np.where(rnd % 2 == 0, off, n_blocks - 1 - off)
    return block[codes]


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

    Parallelism and determinism: with ``n_threads`` = 1 an epoch is plain serial SGD.
    With ``B = n_threads > 1`` the epoch follows DSGD's stratified schedule (Gemulla
    et al., KDD 2011): users and items are dealt into ``B`` blocks each (balanced by
    rating counts); the ``B`` blocks of a stratum ``{(t, (t + s) mod B)}`` share no
    user and no item, so ``B`` threads update them at once without races, and the
    strata run one after another. The visiting order changes (grouped by block) but
    not the update rule. The fitted model is a deterministic function of the data,
    ``random_state`` and the thread count: bitwise identical from run to run for the
    same ``n_threads``, different (statistically equivalent) across thread counts.

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
        User factors, a table of shape (n_users_, n_factors), float64.
    item_embedding_ : sparsembed.Embedding
        Item factors, a table of shape (n_items_, n_factors), float64.
    user_bias_ : ndarray of shape (n_users_,)
    item_bias_ : ndarray of shape (n_items_,)
    user_ids_ : ndarray of shape (n_users_,)
        Original user ids, sorted; row ``r`` of the user table is ``user_ids_[r]``.
    item_ids_ : ndarray of shape (n_items_,)
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
    ``X`` holds ids, not features, so several generic checks of
    ``sklearn.utils.estimator_checks`` cannot apply; they are listed, with the
    reason for each, in ``MatrixFactorization._expected_failed_checks()`` and in
    ``tests/test_sklearn.py``:

    - checks that fit data with a number of columns other than 2
      (``check_fit2d_1sample``, ``check_fit2d_1feature``, ...): X must be
      (user id, item id) pairs;
    - checks that expect a good fit on continuous features
      (``check_regressors_train``, ``check_regressor_data_not_an_array``...):
      every row of such data is a new (user, item) pair, so there is nothing to
      factorize.

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
        """``{check name: reason}`` for ``check_estimator``'s ``expected_failed_checks``."""
        two = "X must hold exactly two id columns (user, item)"
        ids = ("X holds ids: continuous features make every row a new (user, item) pair, "
               "so there is nothing to factorize and the fit is poor by construction")
        return {
            "check_fit2d_1sample": two,
            "check_fit2d_1feature": two,
            "check_fit2d_predict1d": two,
            "check_regressors_train": ids,
            "check_regressor_data_not_an_array": ids,
            "check_regressors_int": ids,
            "check_regressors_no_decision_function": two,
            "check_supervised_y_2d": two,
            "check_regressor_multioutput": two,
            "check_regressors_train(readonly_memmap=True)": ids,
            "check_regressors_train(readonly_memmap=True,X_dtype=float32)": ids,
        }

    def _validate_X(self, X, reset, y=None):
        kwargs = dict(dtype=None, ensure_all_finite=True, reset=reset)
        if y is None:
            X = validate_data(self, X, **kwargs)
        else:
            X, y = validate_data(self, X, y, y_numeric=True, **kwargs)
        if X.shape[1] != 2:
            raise ValueError(
                f"X must have 2 columns (user id, item id), got {X.shape[1]} columns")
        return X, y

    def fit(self, X, y):
        """Learn biases and factors from ratings.

        Parameters
        ----------
        X : array-like of shape (n_ratings, 2)
            (user id, item id) pairs; ids may be any ints, floats or strings.
        y : array-like of shape (n_ratings,)
            Ratings.

        Returns
        -------
        self
        """
        self._validate_params()
        X, y = self._validate_X(X, reset=True, y=y)
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D ratings, got shape {y.shape}")
        rng = check_random_state(self.random_state)
        users = _IdIndex(X[:, 0])
        items = _IdIndex(X[:, 1])
        n_users, n_items, k = len(users), len(items), int(self.n_factors)
        self.user_ids_, self.item_ids_ = users.ids, items.ids
        self.global_mean_ = float(y.mean())
        self.rating_range_ = (float(y.min()), float(y.max()))
        # Surprise's order of draws: user factors, then item factors
        P = rng.normal(0.0, self.init_std, (n_users, k))
        Q = rng.normal(0.0, self.init_std, (n_items, k))
        bu = np.zeros(n_users)
        bi = np.zeros(n_items)
        u, i = users.codes, items.codes
        n = y.size
        B = _effective_n_threads(self.n_threads)
        if B > 1:
            ub = _dsgd_blocks(u, np.bincount(u, minlength=n_users), B)
            ib = _dsgd_blocks(i, np.bincount(i, minlength=n_items), B)
            key = (((ib - ub) % B) * B + ub).astype(np.int16 if B * B < 2**15 else np.int64)
        else:
            key = np.zeros(n, dtype=np.int16)
        starts = np.zeros(B * B + 1, dtype=np.int64)
        np.cumsum(np.bincount(key, minlength=B * B), out=starts[1:])
        sse = np.zeros(B * B)
        history = np.empty(self.epochs)
        from sparsembed._kernels._mf import sgd_epoch

        for epoch in range(self.epochs):
            order = rng.permutation(n)
            if B > 1:
                order = order[np.argsort(key[order], kind="stable")]
            sgd_epoch(u[order], i[order], y[order], starts, P, Q, bu, bi,
                      self.global_mean_, float(self.lr), float(self.reg), bool(self.biased),
                      sse, B)
            history[epoch] = np.sqrt(sse.sum() / max(n, 1))
        self.train_rmse_ = history
        self.user_bias_, self.item_bias_ = bu, bi
        self.user_embedding_ = Embedding(n_users, k, weight=P, dtype=np.float64)
        self.item_embedding_ = Embedding(n_items, k, weight=Q, dtype=np.float64)
        # (user row, item row) pairs seen in training, for recommend(exclude_seen=True)
        seen = np.unique(u.astype(np.int64) * n_items + i)
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
        X, _ = self._validate_X(X, reset=False)
        urow = _lookup_ids(self.user_ids_, X[:, 0])
        irow = _lookup_ids(self.item_ids_, X[:, 1])
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
        urow = int(_lookup_ids(self.user_ids_, np.asarray([user]))[0])
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
