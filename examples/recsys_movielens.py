"""Rating prediction with sparsembed's MatrixFactorization (biased MF, compiled SGD).

By default it runs 5-fold cross-validation on the MovieLens-style sample bundled with
sparsembed (1,501 ratings). Point ``--data`` at a MovieLens 100K ``u.data`` (or
RecBole's ``ml-100k.inter``) to run the standard protocol: the ``u1.base/u1.test`` ..
``u5.base/u5.test`` splits when they sit next to the file, 5-fold cross-validation
otherwise. MovieLens 100K is not shipped (GroupLens' terms forbid redistribution).

    python examples/recsys_movielens.py
    python examples/recsys_movielens.py --data ~/ml-100k/u.data

Prints RMSE and MAE for each fold, their means, and the time of the whole run. The
default hyperparameters were tuned on MovieLens 100K (see benchmarks/README_recsys.md):
mean RMSE about 0.91 there, against 0.937 for Surprise's SVD with its defaults on the
same folds (Surprise's README gives 0.934). On
the bundled sample other defaults apply (it has only 30 users).
"""

import argparse
import os
import sys
import time

import numpy as np

import sparsembed as se
from sparsembed.sklearn import MatrixFactorization

# tuned on MovieLens 100K (benchmarks/README_recsys.md)
TUNED = dict(n_factors=50, epochs=20, lr=0.015, reg=0.08, init_std=0.05)
# tuned on the bundled sample (30 users: few factors, strong regularisation)
SAMPLE = dict(n_factors=5, epochs=100, lr=0.02, reg=0.1, init_std=0.1)


def standard_splits(path):
    """[(train, test)] from u1..u5 .base/.test next to ``path``, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    pairs = [(os.path.join(folder, f"u{k}.base"), os.path.join(folder, f"u{k}.test"))
             for k in range(1, 6)]
    if all(os.path.exists(a) and os.path.exists(b) for a, b in pairs):
        return [(se.datasets.load_movielens(a), se.datasets.load_movielens(b)) for a, b in pairs]
    return None


def kfold_splits(users, items, ratings, n_folds, seed):
    """Shuffled k-fold splits of the ratings (as Surprise's KFold)."""
    order = np.random.default_rng(seed).permutation(ratings.size)
    folds = np.array_split(order, n_folds)
    out = []
    for k in range(n_folds):
        test = folds[k]
        train = np.concatenate([folds[j] for j in range(n_folds) if j != k])
        out.append(((users[train], items[train], ratings[train]),
                    (users[test], items[test], ratings[test])))
    return out


def run(splits, params, seed, n_threads, out=sys.stdout):
    """Fit and evaluate on each split.

    Returns (rmses, maes, seconds, last model, RMSEs of the global-mean predictor).
    """
    rmses, maes, baseline = [], [], []
    model = None
    start = time.perf_counter()
    for k, ((u, i, r), (ut, it, rt)) in enumerate(splits, 1):
        t0 = time.perf_counter()
        model = MatrixFactorization(**params, random_state=seed, n_threads=n_threads)
        model.fit(np.column_stack([u, i]), r)
        err = model.predict(np.column_stack([ut, it])) - rt
        rmses.append(float(np.sqrt(np.mean(err ** 2))))
        maes.append(float(np.mean(np.abs(err))))
        baseline.append(float(np.sqrt(np.mean((rt - r.mean()) ** 2))))
        print(f"fold {k}: RMSE {rmses[-1]:.4f}  MAE {maes[-1]:.4f}  "
              f"({time.perf_counter() - t0:.2f} s, {u.size} train / {ut.size} test ratings)",
              file=out)
    seconds = time.perf_counter() - start
    return rmses, maes, seconds, model, baseline


def main(argv=None, out=sys.stdout):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data",
                        help="MovieLens 100K u.data or ml-100k.inter (default: the bundled sample)")
    parser.add_argument("--folds", type=int, default=5, help="folds when no u1..u5 splits exist")
    for flag, key, kind in (("--factors", "n_factors", int), ("--epochs", "epochs", int),
                            ("--lr", "lr", float), ("--reg", "reg", float),
                            ("--init-std", "init_std", float)):
        parser.add_argument(flag, type=kind, dest=key,
                            help=f"default {TUNED[key]} ({SAMPLE[key]} on the sample)")
    parser.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=5, help="recommendations shown for the first user")
    args = parser.parse_args(argv)

    if args.data:
        users, items, ratings = se.datasets.load_movielens(args.data)
        splits = standard_splits(args.data)
        protocol = "u1..u5 base/test splits" if splits else f"{args.folds}-fold cross-validation"
        name = args.data
    else:
        users, items, ratings = se.datasets.load_sample_ratings()
        splits = None
        protocol = f"{args.folds}-fold cross-validation"
        name = "bundled MovieLens-style sample"
    if splits is None:
        splits = kfold_splits(users, items, ratings, args.folds, args.seed)
    params = dict(TUNED if args.data else SAMPLE)
    params.update({k: getattr(args, k) for k in params if getattr(args, k) is not None})
    print(f"{name}: {ratings.size} ratings, {np.unique(users).size} users, "
          f"{np.unique(items).size} items; {protocol}", file=out)
    print(f"MatrixFactorization({', '.join(f'{k}={v}' for k, v in params.items())}), "
          f"threads={args.threads or se.get_num_threads()}", file=out)
    rmses, maes, seconds, model, baseline = run(splits, params, args.seed, args.threads, out=out)
    print(f"mean RMSE {np.mean(rmses):.4f}  mean MAE {np.mean(maes):.4f}  "
          f"total {seconds:.2f} s  (predicting the training mean: RMSE {np.mean(baseline):.4f})",
          file=out)
    if args.top > 0:
        user = users[0]
        print(f"top {args.top} unseen items for user {user}: "
              f"{model.recommend(user, k=args.top).tolist()}", file=out)
    return {"rmse": rmses, "mae": maes, "seconds": seconds, "baseline_rmse": baseline}


if __name__ == "__main__":
    main()
