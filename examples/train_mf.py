"""Matrix factorization on the bundled MovieLens-style sample, from sparsembed primitives.

The model predicts ``rating(u, i) = mean + <U[u], V[i]>`` with two ``se.Embedding``
tables (users and items, ``sparse=True``). Each mini-batch: look up both tables, take
the row-wise dot product, compute the mean squared error, push its gradient back
through each table, and update only the rows the batch touched with ``SparseAdam`` or
``Adagrad`` (``--fused`` does backward and update in one pass).

Data: ``sparsembed.datasets.load_sample_ratings()`` (1,501 ratings, 30 users, 100
items; Apache Spark's sample, Apache License 2.0). A random 80/20 split; the
training and held-out RMSE are printed after every epoch; the held-out RMSE of
always predicting the training mean is printed first.

Run: python examples/train_mf.py [--epochs 20] [--optimizer adagrad] [--fused]
"""

import argparse

import numpy as np

import sparsembed as se
from sparsembed.datasets import load_sample_ratings


def rmse(pred, target):
    return float(np.sqrt(np.mean((pred - target) ** 2)))


def predict(user_emb, item_emb, mean, users, items):
    """``mean + <U[u], V[i]>`` for each (user, item) pair (no gradient kept)."""
    u = se.functional.embedding(users, user_emb.weight)
    v = se.functional.embedding(items, item_emb.weight)
    return mean + np.einsum("nd,nd->n", u, v)


def main(epochs=20, dim=8, batch_size=64, lr=0.05, reg=0.2, optimizer="sparse_adam",
         fused=False, test_fraction=0.2, seed=0, verbose=True):
    """Train and return the per-epoch history.

    Returns
    -------
    dict
        ``train_rmse``, ``test_rmse`` (lists, one value per epoch) and ``baseline_rmse``
        (held-out RMSE of predicting the training mean).
    """
    rng = np.random.default_rng(seed)
    users, items, ratings = load_sample_ratings()
    order = rng.permutation(ratings.size)
    n_test = int(round(test_fraction * ratings.size))
    test, train = order[:n_test], order[n_test:]
    mean = float(ratings[train].mean())
    baseline = rmse(np.full(n_test, mean), ratings[test])

    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    user_emb = se.Embedding(n_users, dim, sparse=True,
                            weight=rng.normal(0.0, 0.1, (n_users, dim)).astype(np.float32))
    item_emb = se.Embedding(n_items, dim, sparse=True,
                            weight=rng.normal(0.0, 0.1, (n_items, dim)).astype(np.float32))
    if optimizer == "sparse_adam":
        opt = se.optim.SparseAdam([user_emb, item_emb], lr=lr)
    elif optimizer == "adagrad":
        opt = se.optim.Adagrad([user_emb, item_emb], lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sparse_adam' or 'adagrad', got {optimizer!r}")

    history = {"train_rmse": [], "test_rmse": [], "baseline_rmse": baseline}
    if verbose:
        print(f"{n_users} users, {n_items} items, {train.size} training / {n_test} held-out "
              f"ratings; predict-the-mean held-out RMSE {baseline:.4f}")
    for epoch in range(epochs):
        rng.shuffle(train)
        for start in range(0, train.size, batch_size):
            b = train[start:start + batch_size]
            u = user_emb(users[b])                      # (B, dim)
            v = item_emb(items[b])                      # (B, dim)
            err = mean + np.einsum("nd,nd->n", u, v) - ratings[b]
            # d/d(u, v) of mean(err**2) + reg * (|u|**2 + |v|**2) per rating
            scale = (2.0 / b.size) * err[:, None]
            grad_u = scale * v + (2.0 * reg / b.size) * u
            grad_v = scale * u + (2.0 * reg / b.size) * v
            if fused:
                user_emb.backward(grad_u, optimizer=opt)
                item_emb.backward(grad_v, optimizer=opt)
            else:
                opt.zero_grad()
                user_emb.backward(grad_u)
                item_emb.backward(grad_v)
                opt.step()
        tr = rmse(predict(user_emb, item_emb, mean, users[train], items[train]), ratings[train])
        te = rmse(predict(user_emb, item_emb, mean, users[test], items[test]), ratings[test])
        history["train_rmse"].append(tr)
        history["test_rmse"].append(te)
        if verbose:
            print(f"epoch {epoch + 1:3d}: train RMSE {tr:.4f}   held-out RMSE {te:.4f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--reg", type=float, default=0.2)
    parser.add_argument("--optimizer", choices=["sparse_adam", "adagrad"], default="sparse_adam")
    parser.add_argument("--fused", action="store_true", help="fused backward + update")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.epochs, args.dim, args.batch_size, args.lr, args.reg, args.optimizer,
         args.fused, seed=args.seed)
