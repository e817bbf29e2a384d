"""MatrixFactorization vs Surprise's SVD on MovieLens 100K, 5-fold cross-validation.

Both libraries get the same folds (shuffled 5-fold split of the ratings with
``--seed``) and are timed on the same machine, interleaved run by run: the time of a
run is fit + predict over all folds (data loading excluded for both). Reports mean
RMSE/MAE over the folds, the median and the best time over ``--repeat`` runs and
the speed-ups over Surprise's SVD (median over median, best over best: on a shared
machine the best of several runs is the least disturbed one, as ``timeit`` reports).

MovieLens 100K is not redistributable: get ``ml-100k.inter`` with
``pip download recbole==1.2.1 --no-deps -d /tmp/recbole`` and unzip
``recbole/dataset_example/ml-100k/ml-100k.inter`` from the wheel, or use GroupLens'
``u.data``. Surprise installs with ``pip install scikit-surprise``.

    python benchmarks/bench_recsys.py --data /tmp/ml-100k.inter --repeat 3 --json results/recsys.json
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

import sparsembed as se
from sparsembed.sklearn import MatrixFactorization

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from recsys_movielens import TUNED, kfold_splits  # noqa: E402

SURPRISE_DEFAULTS = dict(n_factors=100, epochs=20, lr=0.005, reg=0.02, init_std=0.1)


def run_sparsembed(splits, params, seed, n_threads):
    rmse, mae, seconds = [], [], 0.0
    for (u, i, r), (ut, it, rt) in splits:
        X, Xt = np.column_stack([u, i]), np.column_stack([ut, it])
        t0 = time.perf_counter()
        model = MatrixFactorization(**params, random_state=seed, n_threads=n_threads).fit(X, r)
        pred = model.predict(Xt)
        seconds += time.perf_counter() - t0
        rmse.append(float(np.sqrt(np.mean((pred - rt) ** 2))))
        mae.append(float(np.mean(np.abs(pred - rt))))
    return rmse, mae, seconds


def surprise_folds(splits):
    from surprise import Dataset, Reader

    lo = min(float(r.min()) for (_, _, r), _ in splits)
    hi = max(float(r.max()) for (_, _, r), _ in splits)
    reader = Reader(rating_scale=(lo, hi))
    data = Dataset(reader)
    out = []
    for (u, i, r), (ut, it, rt) in splits:
        train = data.construct_trainset(list(zip(u.tolist(), i.tolist(), r.tolist(), [None] * u.size)))
        test = data.construct_testset(list(zip(ut.tolist(), it.tolist(), rt.tolist(), [None] * ut.size)))
        out.append((train, test))
    return out


def run_surprise(folds, seed):
    from surprise import SVD

    rmse, mae, seconds = [], [], 0.0
    for train, test in folds:
        t0 = time.perf_counter()
        algo = SVD(random_state=seed)  # Surprise's defaults: 100 factors, 20 epochs...
        algo.fit(train)
        predictions = algo.test(test)
        seconds += time.perf_counter() - t0
        err = np.array([p.est - p.r_ui for p in predictions])
        rmse.append(float(np.sqrt(np.mean(err ** 2))))
        mae.append(float(np.mean(np.abs(err))))
    return rmse, mae, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="ml-100k.inter or u.data")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="thread counts for sparsembed (default: 1 and all usable cores)")
    parser.add_argument("--no-surprise", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    users, items, ratings = se.datasets.load_movielens(args.data)
    splits = kfold_splits(users, items, ratings, args.folds, args.seed)
    threads = args.threads or sorted({1, se.get_num_threads()})
    configs = []
    if not args.no_surprise:
        folds = surprise_folds(splits)
        configs.append(("surprise SVD (defaults)", lambda: run_surprise(folds, args.seed)))
    for nt in threads:
        configs.append((f"sparsembed MF, Surprise's defaults, {nt} thread(s)",
                        lambda nt=nt: run_sparsembed(splits, SURPRISE_DEFAULTS, args.seed, nt)))
        configs.append((f"sparsembed MF, tuned, {nt} thread(s)",
                        lambda nt=nt: run_sparsembed(splits, TUNED, args.seed, nt)))
    results = {name: {"times": []} for name, _ in configs}
    for rep in range(args.repeat):  # interleaved, so load changes hit every method alike
        for name, fn in configs:
            rmse, mae, seconds = fn()
            res = results[name]
            res["times"].append(seconds)
            res["rmse_folds"], res["mae_folds"] = rmse, mae
            res["rmse"], res["mae"] = float(np.mean(rmse)), float(np.mean(mae))
            print(f"run {rep + 1}: {name}: RMSE {res['rmse']:.4f}  {seconds:.2f} s", flush=True)
    ref = results.get("surprise SVD (defaults)")
    ref_time = float(np.median(ref["times"])) if ref else None
    print()
    ref_best = float(np.min(ref["times"])) if ref else None
    print(f"{'method':52s} {'RMSE':>7s} {'MAE':>7s} {'median s':>9s} {'speed-up':>9s} "
          f"{'best s':>7s} {'speed-up':>9s}")
    for name, res in results.items():
        res["median_time"] = float(np.median(res["times"]))
        res["best_time"] = float(np.min(res["times"]))
        res["speedup_vs_surprise"] = ref_time / res["median_time"] if ref_time else None
        res["best_speedup_vs_surprise"] = ref_best / res["best_time"] if ref_best else None
        sp = f"{res['speedup_vs_surprise']:.1f}x" if ref_time else "-"
        bsp = f"{res['best_speedup_vs_surprise']:.1f}x" if ref_best else "-"
        print(f"{name:52s} {res['rmse']:7.4f} {res['mae']:7.4f} {res['median_time']:9.2f} {sp:>9s} "
              f"{res['best_time']:7.2f} {bsp:>9s}")
    meta = {
        "data": os.path.basename(args.data), "n_ratings": int(ratings.size),
        "folds": args.folds, "repeat": args.repeat, "seed": args.seed,
        "tuned": TUNED, "surprise_defaults": SURPRISE_DEFAULTS,
        "machine": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "sparsembed": se.show_config(),
    }
    try:
        import surprise
        meta["surprise"] = surprise.__version__
    except ImportError:
        pass
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
