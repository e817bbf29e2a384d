"""se.init, thread control and show_config."""

import math
import os
import sys

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import sparsembed as se
from sparsembed import init


@pytest.mark.parametrize("fn,kwargs", [
    (init.normal_, dict(mean=1.0, std=2.0)),
    (init.uniform_, dict(a=-1.0, b=3.0)),
    (init.xavier_uniform_, dict(gain=2.0)),
    (init.xavier_normal_, dict(gain=0.5)),
    (init.trunc_normal_, dict(std=0.5, a=-0.4, b=0.6)),
])
def test_initializers_are_seeded_and_in_place(fn, kwargs, dtype):
    a = np.empty((400, 50), dtype=dtype)
    b = np.empty((400, 50), dtype=dtype)
    assert fn(a, random_state=3, **kwargs) is a
    fn(b, random_state=3, **kwargs)
    assert_array_equal(a, b)
    c = fn(np.empty((400, 50), dtype=dtype), random_state=4, **kwargs)
    assert not np.array_equal(a, c)
    fn(b, random_state=np.random.default_rng(3), **kwargs)
    assert_array_equal(a, b)
    assert a.dtype == dtype


ONE_DRAW = {  # what each initializer draws, as one float64 draw of the whole array
    "normal_": (dict(mean=1.0, std=2.0), lambda r, s: r.normal(1.0, 2.0, size=s)),
    "uniform_": (dict(a=-1.0, b=3.0), lambda r, s: r.uniform(-1.0, 3.0, size=s)),
    "xavier_uniform_": (dict(), None), "xavier_normal_": (dict(), None),
    "trunc_normal_": (dict(std=0.5), None),
}


@pytest.mark.parametrize("name", sorted(ONE_DRAW))
@pytest.mark.parametrize("make_rng", [np.random.default_rng, np.random.RandomState])
def test_large_arrays_drawn_in_blocks_equal_one_draw(name, make_rng, monkeypatch):
    # drawn in blocks of rows so that a table's float64 draws are never all in
    # memory at once; the values must not depend on the block size
    fn, (kw, reference) = getattr(init, name), ONE_DRAW[name]
    shape = (1001, 7)
    whole = fn(np.empty(shape, np.float32), random_state=make_rng(3), **kw)
    monkeypatch.setattr(init, "BLOCK_DRAWS", 50)  # blocks of 7 rows, the last short
    blocks = fn(np.empty(shape, np.float32), random_state=make_rng(3), **kw)
    assert_array_equal(blocks, whole)
    if reference is not None:
        assert_array_equal(whole, reference(make_rng(3), shape).astype(np.float32))
    columns = fn(np.empty((3, 4, 200), np.float64), random_state=make_rng(4), **kw)
    assert_array_equal(columns, fn(np.empty((3, 4, 200)), random_state=make_rng(4), **kw))


@pytest.mark.parametrize("cls", [se.Embedding, se.EmbeddingBag, se.HashEmbedding])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_default_initialisation_takes_about_the_table_s_memory(cls, dtype):
    # one float64 draw of the whole table, then its cast, took 4 x a float32 table
    # (6 x a float16 one) while torch takes 1 x
    import tracemalloc

    V, D = 600_000, 16
    tracemalloc.start()
    try:
        layer = cls(V, D, dtype=dtype, random_state=7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < layer.weight.nbytes + (12 << 20)
    expected = np.random.default_rng(7).standard_normal((V, D)).astype(dtype)
    assert_array_equal(layer.weight, expected)


def test_initializer_statistics():
    a = init.normal_(np.empty((1000, 100)), mean=1.0, std=2.0, random_state=0)
    assert abs(a.mean() - 1.0) < 0.02 and abs(a.std() - 2.0) < 0.02
    u = init.uniform_(np.empty((1000, 100)), -1.0, 3.0, random_state=0)
    assert u.min() >= -1.0 and u.max() < 3.0 and abs(u.mean() - 1.0) < 0.02
    x = init.xavier_uniform_(np.empty((300, 100)), random_state=0)
    bound = math.sqrt(6.0 / 400)
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
    xn = init.xavier_normal_(np.empty((300, 100)), gain=2.0, random_state=0)
    assert abs(xn.std() - 2.0 * math.sqrt(2.0 / 400)) < 0.003
    t = init.trunc_normal_(np.empty((1000, 100)), mean=0.1, std=1.0, a=-0.5, b=1.0, random_state=0)
    assert t.min() >= -0.5 and t.max() <= 1.0 and t.min() < -0.49 and t.max() > 0.99
    z = init.zeros_(np.ones((3, 2)))
    assert_array_equal(z, 0)


def test_trunc_normal_matches_torch_moments():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    t = torch.nn.init.trunc_normal_(torch.empty(200_000), mean=0.0, std=1.0, a=-0.5, b=2.0).numpy()
    ours = init.trunc_normal_(np.empty(200_000), mean=0.0, std=1.0, a=-0.5, b=2.0, random_state=0)
    assert abs(ours.mean() - t.mean()) < 0.01 and abs(ours.std() - t.std()) < 0.01


def test_initializer_errors():
    with pytest.raises(ValueError, match="a <= b, got a=2, b=1"):
        init.uniform_(np.empty(3), 2, 1)
    with pytest.raises(ValueError, match="at least 2 dimensions, got shape \\(3,\\)"):
        init.xavier_uniform_(np.empty(3))
    with pytest.raises(ValueError, match="std must be > 0, got 0"):
        init.trunc_normal_(np.empty(3), std=0)
    with pytest.raises(ValueError, match="std must be >= 0, got -1"):
        init.normal_(np.empty(3), std=-1)


@pytest.mark.parametrize("fn", [init.normal_, init.uniform_, init.xavier_uniform_,
                                init.xavier_normal_, init.trunc_normal_])
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.complex64])
def test_random_initializers_refuse_integer_arrays_like_torch(fn, dtype):
    # numpy would store the draws truncated (all zeros for N(0, 1) into int8 ...);
    # torch raises for integer tensors
    a = np.full((4, 3), 7, dtype=dtype)
    with pytest.raises(TypeError, match=f"{fn.__name__} fills floating-point arrays, "
                                        f"got dtype {np.dtype(dtype)}"):
        fn(a, random_state=0)
    assert_array_equal(a, np.full((4, 3), 7, dtype=dtype))
    assert_array_equal(init.zeros_(a), 0)  # zeros fit any dtype (torch agrees)


def test_set_and_get_num_threads(threads):
    default = se.get_num_threads()
    assert default >= 1
    threads(1)
    assert se.get_num_threads() == 1
    if se.show_config()["openmp"]:
        threads(3)
        assert se.get_num_threads() == 3
    se.set_num_threads(None)
    assert se.get_num_threads() == default
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"got {bad}"):
            se.set_num_threads(bad)
    with pytest.raises(TypeError):
        se.set_num_threads(1.5)


FORK_CHILD = """
import os, sys, time, warnings
import numpy as np
import sparsembed as se
se.set_num_threads(2)
W = np.random.default_rng(0).standard_normal((200_000, 64)).astype(np.float32)
ids = np.random.default_rng(1).integers(0, 200_000, 300_000)
if {parent_runs}:
    expected = se.functional.embedding(ids, W)  # a team of two threads starts
else:
    expected = W[ids]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        threads = se.get_num_threads()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            se.set_num_threads(2)
        same = np.array_equal(se.functional.embedding(ids, W), expected)
        g = se.functional.embedding_backward(np.ones((ids.size, 64), np.float32), ids,
                                             200_000, sparse=True)
        same = same and g.data.shape[0] == np.unique(ids).size * 64
        os.write(w, f"{{threads}} {{se.get_num_threads()}} {{len(caught)}} {{same}}".encode())
        code = 0
    finally:
        os._exit(code)
deadline = time.time() + 60
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    sys.exit("the forked child hung")
print(os.read(r, 100).decode(), status)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.parametrize("parent_runs", [True, False])
def test_forked_child_runs_kernels_after_the_parent_did(run_python, parent_runs):
    # libgomp's workers do not survive fork: a child whose parent ran a parallel
    # region waited forever at its first one (multiprocessing's default start method
    # on Linux, joblib's multiprocessing backend); the child now runs on one thread
    if not se.show_config()["openmp"]:
        pytest.skip("serial build: no OpenMP threads to lose")
    out = run_python(FORK_CHILD.format(parent_runs=parent_runs), timeout=180).stdout.split()
    before, after, warned, same, status = out
    assert same == "True" and status == "0"
    gnu = sys.platform.startswith("linux")
    if parent_runs and gnu:
        assert (before, after, warned) == ("1", "1", "1")
    else:  # no team to lose: the child keeps its threads
        assert (before, after, warned) == ("2", "2", "0")


def test_limited_threads_is_per_python_thread(threads):
    import threading

    from sparsembed import _threads

    if not se.show_config()["openmp"]:
        pytest.skip("serial build: always one thread")
    threads(3)
    seen, inside, release = {}, threading.Event(), threading.Event()

    def worker():
        with _threads.limited_threads(1):
            seen["worker"] = se.get_num_threads()
            with _threads.limited_threads(2):  # a limit only ever lowers
                seen["nested"] = se.get_num_threads()
            inside.set()
            release.wait(10)
        seen["after"] = se.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    seen["main"] = se.get_num_threads()
    release.set()
    t.join()
    assert seen == {"worker": 1, "nested": 1, "main": 3, "after": 3}


def test_encoder_fits_in_threads_leave_the_thread_count_alone(threads):
    # EmbeddingEncoder.fit set the global count to 1 and put it back, so two fits
    # in threads could leave it at 1 for good, and slowed every other thread meanwhile
    pytest.importorskip("sklearn")
    from concurrent.futures import ThreadPoolExecutor

    from sparsembed.sklearn import EmbeddingEncoder

    if not se.show_config()["openmp"]:
        pytest.skip("serial build: always one thread")
    threads(2)
    rng = np.random.default_rng(0)
    X = rng.integers(0, 50, (20_000, 2))
    y = rng.standard_normal(20_000)
    fits = [EmbeddingEncoder(embedding_dim=4, epochs=2, random_state=i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda enc: enc.fit(X, y), fits))
    assert se.get_num_threads() == 2
    serial = EmbeddingEncoder(embedding_dim=4, epochs=2, random_state=3).fit(X, y)
    assert_array_equal(serial.transform(X[:50]), fits[3].transform(X[:50]))


def test_show_config(capsys):
    config = se.show_config()
    assert config["version"] == se.__version__
    assert isinstance(config["openmp"], bool) and isinstance(config["cupy"], bool)
    assert isinstance(config["max_threads"], int) and config["max_threads"] >= 1
    se.show_config(print_out=True)
    assert "openmp" in capsys.readouterr().out


def test_omp_num_threads_is_the_default(run_python):
    code = "import sparsembed as se; print(se.get_num_threads(), se.show_config()['openmp'])"
    out = run_python(code, env={"OMP_NUM_THREADS": "3"}).stdout.split()
    assert out[0] == ("3" if out[1] == "True" else "1")


def test_quickstart_example_runs(load_example):
    losses = load_example("quickstart").main(steps=4)
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]
