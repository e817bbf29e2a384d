"""scikit-learn estimators: EmbeddingEncoder and MatrixFactorization (+ the MF kernel)."""

import copy
import io
import os
import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

sklearn = pytest.importorskip("sklearn")
pd = pytest.importorskip("pandas")

from sklearn.base import clone  # noqa: E402
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import sparsembed as se  # noqa: E402
from sparsembed._kernels._mf import sgd_epoch  # noqa: E402
from sparsembed.sklearn import EmbeddingEncoder, MatrixFactorization  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


# ----------------------------------------------------------------- check_estimator


def _expected_failed_checks(estimator):
    if isinstance(estimator, MatrixFactorization):
        return MatrixFactorization._expected_failed_checks()
    return {}


@parametrize_with_checks(
    [EmbeddingEncoder(epochs=3), MatrixFactorization(n_factors=4, epochs=5)],
    expected_failed_checks=_expected_failed_checks,
)
def test_check_estimator(estimator, check):
    check(estimator)


def test_mf_expected_failures_are_only_width_checks():
    reasons = set(MatrixFactorization._expected_failed_checks().values())
    assert len(reasons) == 1 and "two id columns" in reasons.pop()
    for name in MatrixFactorization._expected_failed_checks():
        assert name in MatrixFactorization.__doc__


def test_import_sparsembed_does_not_import_sklearn(run_python):
    run_python("import sys, sparsembed; assert 'sklearn' not in sys.modules; "
               "sparsembed.datasets; assert 'sklearn' not in sys.modules; "
               "sparsembed.sklearn; assert 'sklearn' in sys.modules")


# ----------------------------------------------------------------- the MF kernel


def _dot4(p, q):
    # the kernel's summation order: four partial sums, then (s0 + s1) + (s2 + s3)
    s = [0.0] * 4
    k4 = len(p) - len(p) % 4
    for f in range(k4):
        s[f % 4] += p[f] * q[f]
    for f in range(k4, len(p)):
        s[0] += p[f] * q[f]
    return (s[0] + s[1]) + (s[2] + s[3])


def sgd_reference(users, items, ratings, starts, P, Q, bu, bi, mu, lr, reg, biased):
    """Plain-Python SGD, block after block in index order (what the kernel must equal)."""
    P, Q, bu, bi = P.copy(), Q.copy(), bu.copy(), bi.copy()
    sse = np.zeros(len(starts) - 1)
    for b in range(len(starts) - 1):
        for n in range(starts[b], starts[b + 1]):
            u, i = users[n], items[n]
            est = _dot4(P[u], Q[i])
            if biased:
                est += mu + bu[u] + bi[i]
            err = ratings[n] - est
            sse[b] += err * err
            if biased:
                bu[u] += lr * (err - reg * bu[u])
                bi[i] += lr * (err - reg * bi[i])
            p, q = P[u].copy(), Q[i].copy()
            P[u] = p + lr * (err * q - reg * p)
            Q[i] = q + lr * (err * p - reg * q)
    return P, Q, bu, bi, sse


def _problem(dtype, n=300, n_users=13, n_items=17, k=6, seed=0, index_dtype=np.int32):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n).astype(index_dtype)
    items = rng.integers(0, n_items, n).astype(index_dtype)
    ratings = rng.integers(1, 6, n).astype(dtype)
    P = rng.normal(0, 0.1, (n_users, k)).astype(dtype)
    Q = rng.normal(0, 0.1, (n_items, k)).astype(dtype)
    bu = rng.normal(0, 0.1, n_users).astype(dtype)
    bi = rng.normal(0, 0.1, n_items).astype(dtype)
    return users, items, ratings, P, Q, bu, bi


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("biased", [True, False])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_sgd_epoch_serial_matches_reference(dtype, biased, index_dtype):
    users, items, ratings, P, Q, bu, bi = _problem(dtype, index_dtype=index_dtype, k=7)
    starts = np.array([0, ratings.size], dtype=np.int64)
    want = sgd_reference(users, items, ratings.astype(np.float64), starts, P.astype(np.float64),
                         Q.astype(np.float64), bu.astype(np.float64), bi.astype(np.float64),
                         3.0, 0.01, 0.05, biased)
    sse = np.empty(1)
    sgd_epoch(users, items, ratings, starts, P, Q, bu, bi, 3.0, 0.01, 0.05, biased, sse, 1)
    for got, ref in zip((P, Q, bu, bi, sse), want):
        assert_allclose(got, ref, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)


def _dsgd_layout(users, items, B):
    ub, ib = users % B, items % B
    key = ((ib - ub) % B) * B + ub
    order = np.argsort(key, kind="stable")
    starts = np.zeros(B * B + 1, dtype=np.int64)
    np.cumsum(np.bincount(key, minlength=B * B), out=starts[1:])
    return order, starts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [2, 3])
def test_sgd_epoch_dsgd_matches_reference_and_thread_counts(dtype, B):
    users, items, ratings, P, Q, bu, bi = _problem(dtype, n=500)
    order, starts = _dsgd_layout(users, items, B)
    users, items, ratings = users[order], items[order], ratings[order]
    # the blocks of one stratum share no user and no item
    for s in range(B):
        blocks = [slice(starts[s * B + t], starts[s * B + t + 1]) for t in range(B)]
        for a in range(B):
            for b in range(a + 1, B):
                assert not set(users[blocks[a]]) & set(users[blocks[b]])
                assert not set(items[blocks[a]]) & set(items[blocks[b]])
    want = sgd_reference(users, items, ratings.astype(np.float64), starts, P.astype(np.float64),
                         Q.astype(np.float64), bu.astype(np.float64), bi.astype(np.float64),
                         3.0, 0.02, 0.03, True)
    outs = []
    for n_threads in (1, 2, B):
        arrays = [a.copy() for a in (P, Q, bu, bi)]
        sse = np.empty(B * B)
        sgd_epoch(users, items, ratings, starts, *arrays, 3.0, 0.02, 0.03, True, sse, n_threads)
        outs.append(arrays + [sse])
    for got, ref in zip(outs[0], want):
        assert_allclose(got, ref, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
    for other in outs[1:]:  # bitwise equal whatever the number of threads
        for a, b in zip(outs[0], other):
            assert_array_equal(a, b)


def test_sgd_epoch_readonly_inputs_and_bad_layout():
    users, items, ratings, P, Q, bu, bi = _problem(np.float64, n=50)
    for a in (users, items, ratings):
        a.flags.writeable = False
    starts = np.array([0, 50], dtype=np.int64)
    sse = np.empty(1)
    sgd_epoch(users, items, ratings, starts, P, Q, bu, bi, 3.0, 0.01, 0.0, True, sse, 1)
    assert np.isfinite(P).all()
    before = [a.copy() for a in (P, Q, bu, bi)]
    with pytest.raises(ValueError, match="B\\*B"):
        sgd_epoch(users, items, ratings, np.array([0, 10, 50], dtype=np.int64), P, Q, bu, bi,
                  3.0, 0.01, 0.0, True, np.empty(2), 1)
    with pytest.raises(ValueError, match="end at the number of ratings"):
        sgd_epoch(users, items, ratings, np.array([0, 49], dtype=np.int64), P, Q, bu, bi,
                  3.0, 0.01, 0.0, True, sse, 1)
    for a, b in zip(before, (P, Q, bu, bi)):
        assert_array_equal(a, b)


# ----------------------------------------------------------------- MatrixFactorization


@pytest.fixture(scope="module")
def sample():
    users, items, ratings = se.datasets.load_sample_ratings()
    order = np.random.default_rng(0).permutation(ratings.size)
    test, train = order[:300], order[300:]
    X = np.column_stack([users, items])
    return X[train], ratings[train], X[test], ratings[test]


def _rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def test_load_movielens_formats(tmp_path):
    rows = [(196, 242, 3, 881250949), (186, 302, 3, 891717742), (22, 377, 1, 878887116)]
    udata = tmp_path / "u.data"
    udata.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    inter = tmp_path / "ml-100k.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    dat = tmp_path / "ratings.dat"
    dat.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    for path in (udata, inter, dat):
        users, items, ratings = se.datasets.load_movielens(path)
        assert_array_equal(users, [196, 186, 22])
        assert_array_equal(items, [242, 302, 377])
        assert_array_equal(ratings, [3.0, 3.0, 1.0])
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2\n")
    with pytest.raises(ValueError, match="at least 3"):
        se.datasets.load_movielens(bad)
    # a fractional id was truncated (1.7 -> user 1) without a word
    bad.write_text("5\t2\t4.0\t0\n1.7\t3\t4.5\t0\n")
    with pytest.raises(ValueError, match="rating 2: user and item ids must be integers, "
                                         "got user 1.7, item 3.0"):
        se.datasets.load_movielens(bad)


SAMPLE_PARAMS = dict(n_factors=5, epochs=100, lr=0.02, reg=0.1, init_std=0.1)


def test_mf_rmse_on_sample_beats_baselines(sample):
    X, y, Xt, yt = sample
    mf = MatrixFactorization(**SAMPLE_PARAMS, random_state=0, n_threads=1).fit(X, y)
    rmse = _rmse(mf.predict(Xt), yt)
    mean_rmse = _rmse(np.full_like(yt, y.mean()), yt)
    untrained = _rmse(MatrixFactorization(**dict(SAMPLE_PARAMS, epochs=0), random_state=0)
                      .fit(X, y).predict(Xt), yt)
    bias_only = _rmse(MatrixFactorization(**dict(SAMPLE_PARAMS, init_std=0.0), random_state=0)
                      .fit(X, y).predict(Xt), yt)
    # held-out RMSE is ~0.78 (0.78..0.85 over seeds); predicting the mean gives 1.06, so
    # do untrained factors, and biases alone 1.08 (factors that never move)
    assert min(mean_rmse, untrained, bias_only) > 1.0
    assert rmse < 0.9
    # training error decreases over the epochs
    assert mf.train_rmse_.shape == (100,)
    assert mf.train_rmse_[-1] < 0.8 * mf.train_rmse_[0]


def test_mf_fitted_attributes(sample):
    X, y, _, _ = sample
    mf = MatrixFactorization(n_factors=3, epochs=2, random_state=0).fit(X, y)
    n_users, n_items = np.unique(X[:, 0]).size, np.unique(X[:, 1]).size
    assert isinstance(mf.user_embedding_, se.Embedding)
    assert isinstance(mf.item_embedding_, se.Embedding)
    assert mf.user_embedding_.weight.shape == (n_users, 3)
    assert mf.item_embedding_.weight.shape == (n_items, 3)
    assert mf.user_bias_.shape == (n_users,) and mf.item_bias_.shape == (n_items,)
    assert mf.global_mean_ == pytest.approx(y.mean())
    assert_array_equal(mf.user_ids_, np.unique(X[:, 0]))
    assert mf.n_features_in_ == 2
    assert mf.rating_range_ == (y.min(), y.max())


def test_mf_predict_formula_and_clipping(sample):
    X, y, Xt, _ = sample
    mf = MatrixFactorization(n_factors=4, epochs=5, random_state=0).fit(X, y)
    u = np.searchsorted(mf.user_ids_, Xt[:, 0])
    i = np.searchsorted(mf.item_ids_, Xt[:, 1])
    P, Q = mf.user_embedding_.weight.astype(np.float64), mf.item_embedding_.weight.astype(np.float64)
    raw = mf.global_mean_ + mf.user_bias_[u] + mf.item_bias_[i] + np.sum(P[u] * Q[i], axis=1)
    assert_allclose(mf.predict(Xt), np.clip(raw, y.min(), y.max()), rtol=1e-6)
    assert mf.predict(Xt).dtype == np.float64


def test_mf_unseen_users_and_items_fall_back():
    X = np.array([[10, 100], [10, 200], [20, 100], [20, 300], [30, 200]])
    y = np.array([4.0, 3.0, 5.0, 2.0, 3.0])
    mf = MatrixFactorization(n_factors=2, epochs=20, lr=0.05, random_state=0).fit(X, y)
    mu = mf.global_mean_
    bu = dict(zip(mf.user_ids_, mf.user_bias_))
    bi = dict(zip(mf.item_ids_, mf.item_bias_))
    pred = mf.predict(np.array([[99, 100], [10, 999], [99, 999]]))
    assert_allclose(pred, [mu + bi[100], mu + bu[10], mu], rtol=1e-6)
    # unbiased model: unseen pairs predict the global mean
    mf0 = MatrixFactorization(n_factors=2, biased=False, epochs=3, random_state=0).fit(X, y)
    assert_allclose(mf0.predict(np.array([[99, 100], [10, 999]])), [mu, mu])


def test_mf_string_and_float_ids():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 20, 400), rng.integers(0, 30, 400)
    y = rng.integers(1, 6, 400).astype(float)
    Xs = np.column_stack([[f"u{u}" for u in users], [f"item-{i}" for i in items]]).astype(object)
    Xi = np.column_stack([users, items])
    Xf = Xi.astype(np.float64) + 0.5
    kw = dict(n_factors=3, epochs=5, random_state=0, n_threads=1)
    p_int = MatrixFactorization(**kw).fit(Xi, y).predict(Xi)
    p_float = MatrixFactorization(**kw).fit(Xf, y).predict(Xf)
    assert_array_equal(p_int, p_float)  # same ids up to renaming, same sorted order
    mf = MatrixFactorization(**kw).fit(Xs, y)
    assert mf.predict(Xs).shape == (400,)
    assert mf.recommend("u3", k=4).dtype == object
    assert mf.predict(np.array([["nobody", "item-1"]], dtype=object))[0] == pytest.approx(
        mf.global_mean_ + mf.item_bias_[list(mf.item_ids_).index("item-1")], rel=1e-6)


def test_mf_recommend(sample):
    X, y, _, _ = sample
    mf = MatrixFactorization(**SAMPLE_PARAMS, random_state=0, n_threads=1).fit(X, y)
    user = 7
    rec = mf.recommend(user, k=5)
    seen = set(X[X[:, 0] == user, 1])
    assert rec.shape == (5,) and not set(rec) & seen
    candidates = np.array(sorted(set(mf.item_ids_) - seen))
    scores = mf._score(np.full(candidates.size, np.searchsorted(mf.user_ids_, user)),
                       np.searchsorted(mf.item_ids_, candidates))
    assert_array_equal(rec, candidates[np.argsort(-scores, kind="stable")[:5]])
    everything = mf.recommend(user, k=1000, exclude_seen=False)
    assert everything.size == mf.item_ids_.size
    assert set(mf.recommend(user, k=1000)) == set(candidates)
    # an unseen user gets the items with the highest bias (a string among int ids
    # cannot be one of them: said)
    with pytest.warns(UserWarning, match="user ids given as strings, but the fitted user "
                                         "ids are numbers"):
        assert_array_equal(mf.recommend("nobody", k=3),
                           mf.item_ids_[np.argsort(-mf.item_bias_, kind="stable")[:3]])
    assert_array_equal(mf.recommend(10**9, k=3), mf.recommend(-1, k=3))
    for bad in (None, {}, [[1]]):
        with pytest.raises((TypeError, ValueError), match="user"):
            mf.recommend(bad)
    assert mf.recommend(user, k=0).size == 0
    with pytest.raises(ValueError, match="k must be"):
        mf.recommend(user, k=-1)
    with pytest.raises(ValueError, match=r"user must be a single user id .* got an array of "
                                         r"shape \(2,\)"):
        mf.recommend(np.array([user, 8]))
    assert_array_equal(mf.recommend(np.int64(user), k=5), rec)  # a numpy scalar is one id


def test_mf_deterministic_per_seed_and_thread_count(sample, monkeypatch):
    X, y, Xt, _ = sample
    # let the 1,201 training ratings use DSGD blocks (normally >= 10,000 per block)
    monkeypatch.setattr(MatrixFactorization, "_min_ratings_per_block", 100)
    kw = dict(n_factors=4, epochs=10, lr=0.02)

    def fit(**extra):
        mf = MatrixFactorization(**kw, **extra).fit(X, y)
        return mf.user_embedding_.weight.copy(), mf.item_embedding_.weight.copy(), mf.predict(Xt)

    for n_threads in (1, 2, 3):
        a, b = fit(random_state=0, n_threads=n_threads), fit(random_state=0, n_threads=n_threads)
        for x, z in zip(a, b):
            assert_array_equal(x, z)
    # other seeds and other thread counts (another DSGD schedule) give other models
    assert not np.array_equal(fit(random_state=0, n_threads=1)[0], fit(random_state=1, n_threads=1)[0])
    one, two = fit(random_state=0, n_threads=1), fit(random_state=0, n_threads=2)
    assert not np.array_equal(one[0], two[0])
    # ... of the same quality
    assert abs(_rmse(one[2], sample[3]) - _rmse(two[2], sample[3])) < 0.1
    # the thread count used when n_threads=None is sparsembed's (1 in a serial build)
    se.set_num_threads(2)
    try:
        expected = two if se.get_num_threads() == 2 else one
        for x, z in zip(fit(random_state=0), expected):
            assert_array_equal(x, z)
    finally:
        se.set_num_threads(None)


@pytest.mark.parametrize("n_threads", [2, 3])
def test_mf_dsgd_quality_and_row_order(sample, monkeypatch, n_threads):
    """DSGD trains on renumbered rows; the fitted tables must be back in id order."""
    X, y, Xt, yt = sample
    monkeypatch.setattr(MatrixFactorization, "_min_ratings_per_block", 100)
    mf = MatrixFactorization(**SAMPLE_PARAMS, random_state=0, n_threads=n_threads).fit(X, y)
    assert _rmse(mf.predict(Xt), yt) < 0.9
    assert mf.train_rmse_[-1] < 0.8 * mf.train_rmse_[0]
    # a user's own training ratings are fitted better by its own row than by others'
    P, Q = mf.user_embedding_.weight, mf.item_embedding_.weight
    u = np.searchsorted(mf.user_ids_, X[:, 0])
    i = np.searchsorted(mf.item_ids_, X[:, 1])
    fit = mf.global_mean_ + mf.user_bias_[u] + mf.item_bias_[i] + np.sum(P[u] * Q[i], axis=1)
    shuffled = np.roll(np.arange(P.shape[0]), 1)[u]
    wrong = (mf.global_mean_ + mf.user_bias_[shuffled] + mf.item_bias_[i]
             + np.sum(P[shuffled] * Q[i], axis=1))
    assert _rmse(fit, y) < 0.7 * _rmse(wrong, y)


def test_mf_input_validation(sample):
    X, y, _, _ = sample
    with pytest.raises(ValueError, match="2 columns .*got 3 feature"):
        MatrixFactorization().fit(np.zeros((5, 3)), np.ones(5))
    with pytest.raises(ValueError, match="optimizer"):
        MatrixFactorization(optimizer="adam").fit(X, y)
    with pytest.raises(ValueError, match="n_factors"):
        MatrixFactorization(n_factors=0).fit(X, y)
    with pytest.raises(ValueError, match="n_threads"):
        MatrixFactorization(n_threads=0).fit(X, y)
    with pytest.raises(ValueError, match="NaN|infinity"):
        MatrixFactorization().fit(np.array([[0.0, np.nan], [1.0, 2.0]]), [1.0, 2.0])
    with pytest.raises(ValueError, match="requires y"):
        MatrixFactorization().fit(X, None)
    with pytest.raises(NotFittedError):
        MatrixFactorization().predict(X)
    mf = MatrixFactorization(n_factors=2, epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="2 columns|features"):
        mf.predict(np.zeros((3, 4)))


def test_mf_checks_on_two_columns(sample):
    """What the width-bound generic checks test, on (user, item) data."""
    X, y, Xt, _ = sample
    mf = MatrixFactorization(n_factors=3, epochs=5, random_state=0, n_threads=1)
    params = mf.get_params()
    mf.fit(X, y)
    assert mf.get_params() == params  # check_dont_overwrite_parameters
    state = {k: copy.deepcopy(v) for k, v in mf.__dict__.items() if not isinstance(v, se.Embedding)}
    weights = mf.user_embedding_.weight.copy()
    pred = mf.predict(Xt)
    for k, v in state.items():  # check_dict_unchanged
        assert type(v) is type(mf.__dict__[k])
        if isinstance(v, np.ndarray):
            assert_array_equal(v, mf.__dict__[k])
    assert_array_equal(weights, mf.user_embedding_.weight)
    # check_methods_sample_order_invariance / subset_invariance
    perm = np.random.default_rng(1).permutation(len(Xt))
    assert_array_equal(mf.predict(Xt[perm]), pred[perm])
    assert_array_equal(mf.predict(Xt[:10]), pred[:10])
    # check_estimators_dtypes / f-contiguous / data not an array
    for Xd in (Xt.astype(np.int32), Xt.astype(np.float32), np.asfortranarray(Xt), Xt.tolist()):
        assert_array_equal(mf.predict(Xd), pred)
    # check_estimators_pickle, clone, fit on a pandas frame with column names
    for restored in (pickle.loads(pickle.dumps(mf)), copy.deepcopy(mf)):
        assert_array_equal(restored.predict(Xt), pred)
    assert clone(mf).get_params() == params
    frame = pd.DataFrame(X, columns=["user", "item"])
    mf_df = clone(mf).fit(frame, y)
    assert list(mf_df.feature_names_in_) == ["user", "item"]
    assert_array_equal(mf_df.predict(pd.DataFrame(Xt, columns=["user", "item"])), pred)
    # check_regressors_train in spirit: better than the mean on its own training data
    assert _rmse(mf.predict(X), y) < _rmse(np.full_like(y, y.mean()), y)
    # a regressor: score is R^2
    assert mf.score(X, y) > 0


def test_mf_dataframe_columns_keep_their_ids():
    # sklearn's check made one float64 array of an int64 column beside a float or
    # nullable one: ids past 2**53 merged (998 users became 886), ids came back floats
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    users = 2 ** 60 + np.arange(0, 600, 2, dtype=np.int64)  # neighbours merge in float64
    frame = pd.DataFrame({"user": np.repeat(users, 3),
                          "item": np.tile([7, 8, 9], users.size)})
    y = rng.uniform(1, 5, len(frame))
    for X in (frame, frame.convert_dtypes(),
              frame.assign(item=frame["item"].astype(float)),
              frame.assign(item=frame["item"].astype("UInt64"))):
        mf = MatrixFactorization(n_factors=2, epochs=2, random_state=0).fit(X, y)
        assert_array_equal(mf.user_ids_, users)
        assert mf.user_ids_.dtype.kind == "i"
        assert mf.predict(X).shape == (len(frame),)
        assert mf.recommend(int(users[1]), k=3, exclude_seen=False).size == 3
    with pytest.raises(ValueError, match=r"user ids \(column 'user'\) hold a missing value "
                                         r"at row 4"):
        MatrixFactorization().fit(frame.convert_dtypes().assign(
            user=pd.array([1, 2, 3, 4, None, 6] * 150, dtype="Int64")), y)


def test_mf_ids_of_mixed_kinds_are_named():
    with pytest.raises(TypeError, match="user ids must be all numbers or all strings .* "
                                        "got a mix of NoneType, str"):
        MatrixFactorization().fit(np.array([["a", 1], [None, 2]], dtype=object), [1.0, 2.0])
    with pytest.raises(TypeError, match="item ids .* a mix of int, str"):
        MatrixFactorization().fit(np.array([[1, "x"], [2, 3]], dtype=object), [1.0, 2.0])


def test_mf_divergence_is_an_error_and_keeps_nothing(sample):
    # lr = 0.3 gave NaN factors silently: every prediction NaN, score() blaming the input
    X, y, _, _ = sample
    mf = MatrixFactorization(n_factors=4, epochs=3, lr=10.0, random_state=0)
    with pytest.raises(ValueError, match=r"diverged: the training RMSE is (nan|inf) after "
                                         r"epoch \d+ \(lr=10.0\); lower lr"):
        mf.fit(X, y)
    assert not hasattr(mf, "user_embedding_") and not hasattr(mf, "global_mean_")


def test_mf_in_pipeline(sample):
    X, y, Xt, yt = sample
    pipe = make_pipeline(MatrixFactorization(**SAMPLE_PARAMS, random_state=0, n_threads=1))
    pipe.fit(X, y)
    restored = pickle.loads(pickle.dumps(pipe))
    assert_array_equal(restored.predict(Xt), pipe.predict(Xt))


# ----------------------------------------------------------------- EmbeddingEncoder


def _frame(n=400, seed=0):
    rng = np.random.default_rng(seed)
    colors = np.array(["red", "green", "blue", "black"])
    effect_color = np.array([1.0, -1.0, 0.5, -0.5])
    shop = rng.integers(0, 30, n)
    effect_shop = rng.normal(0, 1, 30)
    c = rng.integers(0, 4, n)
    X = pd.DataFrame({
        "color": colors[c],
        "shop": shop,
        "size": pd.Categorical(rng.choice(["S", "M", "L"], n)),
    })
    y = effect_color[c] + effect_shop[shop] + rng.normal(0, 0.1, n)
    return X, y


def test_encoder_transform_layout_and_names():
    X, _ = _frame()
    enc = EmbeddingEncoder(embedding_dim=3, random_state=0).fit(X)
    out = enc.transform(X)
    assert out.shape == (len(X), 9) and out.dtype == np.float64
    assert list(enc.get_feature_names_out()) == [
        f"{c}_{k}" for c in ("color", "shop", "size") for k in range(3)]
    assert [len(c) for c in enc.categories_] == [4, 30, 3]
    assert [t.weight.shape for t in enc.embeddings_] == [(5, 3), (31, 3), (4, 3)]
    # each block is the row of the value's category
    for j, col in enumerate(X.columns):
        rows = np.searchsorted(enc.categories_[j], X[col].to_numpy())
        assert_array_equal(out[:, 3 * j:3 * j + 3], enc.embeddings_[j].weight[rows])


def test_encoder_fit_without_y_keeps_seeded_tables():
    X, _ = _frame()
    a = EmbeddingEncoder(4, random_state=0).fit(X)
    b = EmbeddingEncoder(4, random_state=0).fit(X)
    c = EmbeddingEncoder(4, random_state=1).fit(X)
    assert_array_equal(a.transform(X), b.transform(X))
    assert not np.array_equal(a.transform(X), c.transform(X))
    rng = np.random.RandomState(0)
    first = rng.standard_normal((5, 4))  # the first table, drawn first
    assert_array_equal(a.embeddings_[0].weight[:4], first[:4])
    assert a.target_type_ is None


def test_encoder_unseen_categories():
    X, y = _frame()
    enc = EmbeddingEncoder(3, random_state=0).fit(X, y)
    new = pd.DataFrame({"color": ["purple", "red"], "shop": [7, 999],
                        "size": pd.Categorical(["XL", "M"])})
    out = enc.transform(new)
    # the OOV row is the frequency-weighted mean of the column's rows
    for j, col in enumerate(X.columns):
        table = enc.embeddings_[j].weight
        counts = X[col].value_counts().reindex(enc.categories_[j]).to_numpy()
        assert_allclose(table[-1], counts @ table[:-1] / counts.sum(), rtol=1e-12)
    assert_array_equal(out[0, :3], enc.embeddings_[0].weight[-1])
    assert_array_equal(out[1, 3:6], enc.embeddings_[1].weight[-1])
    assert_array_equal(out[0, 6:], enc.embeddings_[2].weight[-1])
    assert_array_equal(out[1, :3], enc.transform(X.iloc[[int(np.flatnonzero(X.color == "red")[0])]])[0, :3])
    strict = EmbeddingEncoder(3, handle_unknown="error", random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="unknown categor"):
        strict.transform(new)


def test_encoder_missing_values_are_a_category():
    X = np.array([["a"], [None], ["b"], ["a"], [None]], dtype=object)
    enc = EmbeddingEncoder(2, random_state=0).fit(X)
    out = enc.transform(X)
    assert len(enc.categories_[0]) == 3
    assert_array_equal(out[1], out[4])
    assert not np.array_equal(out[1], out[0]) and not np.array_equal(out[1], enc.embeddings_[0].weight[-1])
    Xf = np.array([[1.0], [np.nan], [2.0]])
    assert np.isfinite(EmbeddingEncoder(2, random_state=0).fit_transform(Xf)).all()


@pytest.mark.parametrize("dtype,values", [
    ("string", ["a", None, "b", "a", None]),
    ("Int64", [1, None, 2, 1, None]),
    ("boolean", [True, None, False, True, None]),
])
def test_encoder_pandas_na_is_the_missing_category(dtype, values):
    # sklearn's encoders refuse pd.NA beside strings ("uniformly strings or numbers")
    pd = pytest.importorskip("pandas")
    X = pd.DataFrame({"c": pd.array(values, dtype=dtype), "d": [1, 2, 3, 4, 5]})
    enc = EmbeddingEncoder(2, random_state=0).fit(X)
    full = enc.transform(X)
    out = full[:, :2]  # column "c"
    assert len(enc.categories_[0]) == 3
    assert_array_equal(out[1], out[4])
    assert_array_equal(out[0], out[3])
    assert not np.array_equal(out[1], out[0])
    assert not np.array_equal(out[1], enc.embeddings_[0].weight[-1])  # not the OOV row
    assert list(enc.get_feature_names_out())[:2] == ["c_0", "c_1"]
    # the same column with the same values in plain object form encodes the same
    plain = pd.DataFrame({"c": np.array([None if v is None else v for v in values],
                                        dtype=object), "d": X["d"]})
    assert_array_equal(EmbeddingEncoder(2, random_state=0).fit(plain).transform(plain), full)
    # NA only at transform: an unseen category, the OOV row
    seen = EmbeddingEncoder(2, random_state=0).fit(X.iloc[[0, 2]])
    assert_array_equal(seen.transform(X.iloc[[1]])[0, :2], seen.embeddings_[0].weight[-1])


def test_encoder_training_learns_category_effects():
    X, y = _frame(n=2000)
    X_train, y_train = X.iloc[:1500], y[:1500]
    X_test, y_test = X.iloc[1500:], y[1500:]
    trained = EmbeddingEncoder(4, epochs=20, lr=0.05, random_state=0).fit(X_train, y_train)
    assert trained.target_type_ == "continuous"
    random = EmbeddingEncoder(4, random_state=0).fit(X_train)
    scores = {}
    for name, enc in (("trained", trained), ("random", random)):
        reg = LinearRegression().fit(enc.transform(X_train), y_train)
        scores[name] = reg.score(enc.transform(X_test), y_test)
    # a linear model on 12 trained features recovers the additive effects (R^2 0.994
    # for seeds 0..2); on random 4-d codes of 30 shops it cannot (0.35..0.43)
    assert scores["trained"] > 0.97
    assert scores["trained"] > scores["random"] + 0.3


def test_encoder_binary_and_multiclass_targets():
    X, y = _frame(n=1500)
    labels = np.where(y > 0, "yes", "no")
    enc = EmbeddingEncoder(4, epochs=15, random_state=0).fit(X, labels)
    assert enc.target_type_ == "binary"
    clf = LogisticRegression().fit(enc.transform(X), labels)
    assert clf.score(enc.transform(X), labels) > 0.93  # 0.97..0.98 for seeds 0..2
    three = np.digitize(y, np.quantile(y, [1 / 3, 2 / 3]))
    enc3 = EmbeddingEncoder(4, epochs=15, random_state=0).fit(X, three)
    assert enc3.target_type_ == "multiclass"
    clf3 = LogisticRegression(max_iter=500).fit(enc3.transform(X), three)
    assert clf3.score(enc3.transform(X), three) > 0.85  # 0.94..0.95
    with pytest.raises(ValueError, match="Unknown label type|unknown"):
        EmbeddingEncoder().fit(X, np.array([{"a": 1}] * len(X), dtype=object))


def test_encoder_target_type():
    # whole-number prices were read as classes: a softmax over every price seen
    rng = np.random.default_rng(0)
    X = rng.integers(0, 5, (3000, 1))
    y = X[:, 0] * 100 + rng.integers(0, 300, 3000)
    with pytest.warns(UserWarning, match=r"y holds \d+ distinct whole numbers, taken for "
                                         r"classes .* target_type='continuous'"):
        assert EmbeddingEncoder(epochs=1).fit(X, y).target_type_ == "multiclass"
    enc = EmbeddingEncoder(epochs=3, target_type="continuous", random_state=0).fit(X, y)
    assert enc.target_type_ == "continuous"
    # the learned first coordinate... a linear model on the features explains y
    r2 = LinearRegression().fit(enc.transform(X), y).score(enc.transform(X), y)
    assert r2 > 0.7
    with pytest.raises(ValueError, match="at most 2 classes, y has"):
        EmbeddingEncoder(target_type="binary").fit(X, y)
    with pytest.raises(ValueError, match="numeric y"):
        EmbeddingEncoder(target_type="continuous").fit(X, np.array(["a", "b", "c"] * 1000))
    labels = rng.integers(0, 150, 3000)  # many classes, said to be classes: no warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EmbeddingEncoder(epochs=1, target_type="multiclass").fit(
            X, labels).target_type_ == "multiclass"


def test_encoder_numbers_where_strings_were_fitted_are_unseen():
    # a column read as all-NaN floats (an empty CSV column), or given ints, where
    # strings were fitted: OrdinalEncoder raised a TypeError about isnan
    pd = pytest.importorskip("pandas")
    fit = pd.DataFrame({"city": ["paris", "rome", "paris"], "n": [1, 2, 3]})
    enc = EmbeddingEncoder(embedding_dim=2, random_state=0).fit(fit)
    oov = enc.transform(pd.DataFrame({"city": ["nowhere"], "n": [1]}))
    for city in (np.array([np.nan, np.nan]), np.array([5, 6])):
        got = enc.transform(pd.DataFrame({"city": city, "n": [1, 1]}))
        assert_array_equal(got, np.repeat(oov, 2, axis=0))
    strict = EmbeddingEncoder(embedding_dim=2, handle_unknown="error").fit(fit)
    with pytest.raises(ValueError, match=r"unknown categories \[5, 6\]"):
        strict.transform(pd.DataFrame({"city": [5, 6], "n": [1, 1]}))
    arr = EmbeddingEncoder(embedding_dim=2, random_state=0).fit(np.array([["a"], ["b"]]))
    assert arr.transform(np.array([[np.nan]])).shape == (1, 2)


def test_encoder_nullable_ints_and_object_na():
    # sklearn reads nullable Int64 as float64 (ids past 2**53 merged); pd.NA in an
    # object column was refused ("uniformly strings or numbers")
    pd = pytest.importorskip("pandas")
    ids = 2 ** 60 + np.arange(0, 40, 2, dtype=np.int64)
    enc = EmbeddingEncoder(embedding_dim=2).fit(pd.DataFrame({"u": pd.array(ids, "Int64")}))
    assert_array_equal(enc.categories_[0], ids)
    with_na = pd.DataFrame({"u": pd.array([1, None, 2], dtype="Int64").astype(object),
                            "s": pd.array(["x", None, "y"], dtype="string").astype(object)})
    enc = EmbeddingEncoder(embedding_dim=2).fit(with_na)
    assert [c.size for c in enc.categories_] == [3, 3]
    assert np.isnan(enc.categories_[0][-1]) and np.isnan(enc.categories_[1][-1])


def test_encoder_max_norm():
    X, y = _frame()
    enc = EmbeddingEncoder(4, max_norm=0.5, epochs=5, random_state=0).fit(X, y)
    for table in enc.embeddings_:
        assert (np.linalg.norm(table.weight, axis=1) <= 0.5 + 1e-9).all()
    before = [t.weight.copy() for t in enc.embeddings_]
    enc.transform(X)
    for a, t in zip(before, enc.embeddings_):
        assert_array_equal(a, t.weight)  # transform never renorms


def test_encoder_deterministic_and_thread_independent(threads):
    X, y = _frame()
    threads(2)
    a = EmbeddingEncoder(4, epochs=3, random_state=0).fit(X, y).transform(X)
    b = EmbeddingEncoder(4, epochs=3, random_state=0).fit(X, y).transform(X)
    assert_array_equal(a, b)
    threads(1)
    c = EmbeddingEncoder(4, epochs=3, random_state=0).fit(X, y).transform(X)
    assert_array_equal(a, c)
    assert se.get_num_threads() >= 1  # the training's one-thread block restored the setting


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # torch's own sparse ops
def test_encoder_adagrad_matches_torch():
    torch = pytest.importorskip("torch")
    import scipy.sparse as sparse

    from sparsembed.sklearn import _Adagrad, _Param

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(6, 3))
    grads = [(np.array([1, 4]), rng.normal(size=(2, 3))), (np.array([0, 1]), rng.normal(size=(2, 3)))]
    p = _Param(w0.copy())
    opt = _Adagrad([p], lr=0.1)
    tw = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.Adagrad([tw], lr=0.1)
    for rows, vals in grads:
        g = np.zeros((6, 3))
        g[rows] = vals
        p.grad = sparse.csr_array(g)
        opt.step()
        opt.zero_grad()
        tw.grad = torch.sparse_coo_tensor(torch.tensor(rows)[None], torch.tensor(vals), (6, 3),
                                          check_invariants=True)
        topt.step()
        topt.zero_grad()
    assert_allclose(p.weight, tw.detach().numpy(), rtol=1e-12)
    # dense gradients too
    p2, tw2 = _Param(w0.copy()), torch.nn.Parameter(torch.tensor(w0))
    opt2, topt2 = _Adagrad([p2], lr=0.1), torch.optim.Adagrad([tw2], lr=0.1)
    for _ in range(2):
        g = rng.normal(size=(6, 3))
        p2.grad, tw2.grad = g, torch.tensor(g)
        opt2.step()
        topt2.step()
    assert_allclose(p2.weight, tw2.detach().numpy(), rtol=1e-12)


def test_encoder_in_column_transformer_with_pandas_output():
    X, y = _frame()
    X = X.assign(price=np.linspace(1, 2, len(X)))
    ct = ColumnTransformer([("emb", EmbeddingEncoder(2, random_state=0), ["color", "shop", "size"]),
                            ("num", "passthrough", ["price"])])
    pipe = Pipeline([("ct", ct), ("ridge", Ridge())]).fit(X, y)
    assert pipe.score(X, y) > 0.5
    names = list(pipe[:-1].get_feature_names_out())
    assert names[:3] == ["emb__color_0", "emb__color_1", "emb__shop_0"] and names[-1] == "num__price"
    ct.set_output(transform="pandas")
    out = ct.fit_transform(X, y)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == names
    enc = EmbeddingEncoder(2, random_state=0).set_output(transform="pandas")
    frame = enc.fit_transform(X[["color", "size"]])
    assert list(frame.columns) == ["color_0", "color_1", "size_0", "size_1"]
    assert (frame.dtypes == np.float64).all()


def test_encoder_pickle_clone_and_string_categories():
    X = np.array([["paris", "a"], ["rome", "b"], ["oslo", "a"], ["rome", "c"]] * 10, dtype=object)
    y = np.arange(len(X), dtype=float) % 3
    enc = EmbeddingEncoder(3, epochs=2, random_state=0).fit(X, y)
    out = enc.transform(X)
    restored = pickle.loads(pickle.dumps(enc))
    assert_array_equal(restored.transform(X), out)
    assert_array_equal(clone(enc).fit(X, y).transform(X), out)
    assert list(enc.categories_[0]) == ["oslo", "paris", "rome"]
    assert_array_equal(enc.transform(np.array([["rome", "b"]], dtype=object)), out[[1]])


def test_encoder_preserves_float64_and_rejects_bad_input():
    X = np.random.default_rng(0).integers(0, 5, (50, 2)).astype(np.float64)
    enc = EmbeddingEncoder(2, random_state=0).fit(X)
    assert enc.transform(X).dtype == np.float64
    assert enc.transform(X.astype(np.float32)).dtype == np.float64
    with pytest.raises(ValueError, match="Reshape your data"):
        enc.transform(X[:, 0])
    with pytest.raises(ValueError, match="features"):
        enc.transform(X[:, :1])
    with pytest.raises(ValueError, match="handle_unknown"):
        EmbeddingEncoder(handle_unknown="ignore").fit(X)
    with pytest.raises(ValueError, match="max_norm"):
        EmbeddingEncoder(max_norm=0).fit(X)
    with pytest.raises(ValueError, match="samples"):
        EmbeddingEncoder().fit(X, np.ones(3))


# ----------------------------------------------------------------- examples


@pytest.fixture
def run_example(load_example):
    def run(name, argv):
        out = io.StringIO()
        return load_example(name).main(argv, out=out), out.getvalue()

    return run


def test_example_recsys_on_sample(run_example):
    results, text = run_example("recsys_movielens", ["--threads", "1"])
    assert len(results["rmse"]) == 5 and "mean RMSE" in text and "top 5" in text
    # about 0.94 against 1.19 for the training mean
    assert np.mean(results["rmse"]) < 0.85 * np.mean(results["baseline_rmse"])


def test_example_recsys_with_data_and_splits(tmp_path, run_example):
    users, items, ratings = se.datasets.load_sample_ratings()
    lines = [f"{u}\t{i}\t{int(r)}\t0\n" for u, i, r in zip(users, items, ratings)]
    (tmp_path / "u.data").write_text("".join(lines))
    results, text = run_example("recsys_movielens", ["--data", str(tmp_path / "u.data"), "--folds", "2", "--epochs", "3",
                                "--factors", "4", "--threads", "1"])
    assert len(results["rmse"]) == 2 and "2-fold" in text
    for k in range(1, 6):  # the standard u1..u5 splits take precedence when present
        (tmp_path / f"u{k}.base").write_text("".join(lines[j] for j in range(len(lines)) if j % 5 != k - 1))
        (tmp_path / f"u{k}.test").write_text("".join(lines[j] for j in range(len(lines)) if j % 5 == k - 1))
    results, text = run_example("recsys_movielens", ["--data", str(tmp_path / "u.data"), "--epochs", "3",
                                "--factors", "4", "--threads", "1"])
    assert len(results["rmse"]) == 5 and "u1..u5" in text


def test_example_sklearn_pipeline_tiny(run_example):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):  # tiny data: OpenMP regions only cost time
        results, text = run_example("sklearn_pipeline", ["--n-samples", "1500", "--n-stores", "50", "--n-products", "20"])
    assert results["embedding"]["width"] == 13
    assert results["one-hot"]["width"] == 50 + 20 + 4 + 1
    assert results["embedding"]["r2"] > results["one-hot"]["r2"]
