"""Thread count used by the compiled kernels."""

import contextlib
import os
import sys
import threading
import warnings

from sparsembed._kernels._openmp_helpers import openmp_enabled, openmp_max_threads

_num_threads = None  # None: follow OpenMP's default (OMP_NUM_THREADS, else all cores)

# The most threads a kernel is given. libgomp does not survive some team sizes
# (100,000 threads crash it here, 2**31 - 1 aborts allocating the team), and no
# kernel gains from more threads than the machine has cores; 1024 leaves room for
# the largest machines while keeping every team small enough to start.
MAX_THREADS = 1024
_warned_no_openmp = False


def _warn_once_without_openmp():
    global _warned_no_openmp
    if not openmp_enabled() and not _warned_no_openmp:
        _warned_no_openmp = True
        warnings.warn(
            "sparsembed was built without OpenMP: kernels run on one thread. "
            "Rebuild with an OpenMP-capable compiler for parallel kernels.",
            RuntimeWarning,
            stacklevel=3,
        )


# libgomp (GCC's OpenMP runtime, which the Linux builds use) keeps the workers of
# a thread's parallel regions in a pool that fork() does not copy: in a child of a
# process that ran a region of several threads, the first such region waits forever
# for them (torch 2.13 hangs the same way; LLVM's libomp, macOS's, starts afresh).
# Such a child runs its kernels on one thread. Set when a kernel may have run on
# more than one thread (whenever more than one was handed out to a kernel).
_team_started = False
_single_after_fork = False
_warned_after_fork = False

# a limit for the kernels the current Python thread calls (see limited_threads)
_local = threading.local()


def _gnu_openmp():
    """Whether the OpenMP runtime in this process is GCC's libgomp (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return True  # cannot tell: take the safe side


def _after_fork_in_child():
    global _single_after_fork
    if _team_started and openmp_enabled() and _gnu_openmp():
        _single_after_fork = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def kernel_threads(n=None):
    """The threads a kernel about to run may use: ``n`` (default
    :func:`get_num_threads`), but 1 in a forked child of a process that ran OpenMP
    regions of several threads (see above). Every thread count handed to a kernel
    comes from here, so that a fork afterwards knows whether a team was started."""
    global _team_started
    if n is None:
        n = get_num_threads()
    elif n > 1 and _single_after_fork:
        n = 1
    if n > 1:
        _team_started = True
    return n


def get_num_threads():
    """Number of threads the kernels use.

    Returns
    -------
    int
        The value given to :func:`set_num_threads`, or OpenMP's default
        (``omp_get_max_threads()``, which honours ``OMP_NUM_THREADS``) capped at
        :data:`MAX_THREADS`; always 1 when the package was built without OpenMP,
        and 1 in a process made by ``fork()`` from one whose kernels ran on
        several threads with GCC's OpenMP (the Linux builds): its worker threads
        do not survive the fork, and a parallel region would wait for them forever
        (use the "spawn" or "forkserver" start method for parallel workers).
    """
    if not openmp_enabled():
        return 1
    limit = getattr(_local, "limit", None)
    n = _num_threads
    if n is None:
        n = min(max(1, openmp_max_threads()), MAX_THREADS)
    if limit is not None and limit < n:
        n = limit
    return 1 if _single_after_fork else n


@contextlib.contextmanager
def limited_threads(n):
    """Inside the block, kernels called from this Python thread use at most ``n``
    threads; other threads and the global setting are left alone."""
    saved = getattr(_local, "limit", None)
    _local.limit = n if saved is None else min(n, saved)
    try:
        yield
    finally:
        _local.limit = saved


def set_num_threads(n):
    """Set the number of threads the kernels use.

    Parameters
    ----------
    n : int or None
        A thread count in ``[1, MAX_THREADS]`` (1024), or None to go back to
        OpenMP's default. Results do not depend on this number: every kernel is
        deterministic. (torch accepts any positive count; OpenMP itself fails on
        some huge teams, so larger counts are a ValueError here.)
    """
    global _num_threads
    if n is None:
        _num_threads = None
        return
    if isinstance(n, bool) or not isinstance(n, (int,)) and not hasattr(n, "__index__"):
        raise TypeError(f"n must be a positive int or None, got {n!r}")
    n = int(n)
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n must be an int in [1, {MAX_THREADS}] or None, got {n}")
    _num_threads = n
    _warn_if_single_after_fork(n)


def _warn_if_single_after_fork(n):
    global _warned_after_fork
    if n > 1 and _single_after_fork and not _warned_after_fork:
        _warned_after_fork = True
        warnings.warn(
            "this process was forked from one whose kernels ran on several OpenMP "
            "threads; GCC's OpenMP cannot start them again here, so the kernels stay "
            "on one thread (start workers with the 'spawn' or 'forkserver' method "
            "for parallel kernels)", RuntimeWarning, stacklevel=3)


# Below about this many element operations a parallel region costs more than it
# saves (and on a busy machine a second thread may not even get a core in time).
PARALLEL_GRAIN = 1 << 16


def workers_spin(environ=None):
    """Whether idle OpenMP workers spin a while before they sleep, as libgomp reads
    the environment at start-up: ``GOMP_SPINCOUNT`` above 0 (or ``INFINITE``), or
    without it any ``OMP_WAIT_POLICY`` but ``PASSIVE`` (libgomp's default spins;
    LLVM's libomp spins too unless told PASSIVE). A spinning worker starts a
    parallel region in microseconds; a sleeping one, on a virtual machine, in ~0.1
    ms, which decides how small a job is still worth a second thread.
    """
    environ = os.environ if environ is None else environ
    count = environ.get("GOMP_SPINCOUNT", "").strip().upper()
    if count.startswith("INF"):
        return True
    digits = count.rstrip("KMGT")  # libgomp's suffixes: thousands, millions, ...
    if digits.isdigit():
        return int(digits) > 0
    return environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


# When set, the grain of every threads_for() call: the tests set it small so that
# tiny inputs run on the threads asked for (results never depend on it).
GRAIN_OVERRIDE = None


def threads_for(work, grain=None):
    """Threads worth using for ``work`` element operations: one for small jobs, at
    most :func:`get_num_threads`, and at least ``grain`` (default
    :data:`PARALLEL_GRAIN`; :data:`GRAIN_OVERRIDE` when set) operations per thread.

    The kernels are deterministic, so this changes speed only, never results.
    """
    if GRAIN_OVERRIDE is not None:
        grain = GRAIN_OVERRIDE
    elif grain is None:
        grain = PARALLEL_GRAIN
    if work < 2 * grain:  # before get_num_threads(): the common tiny call pays less
        return 1
    n = get_num_threads()
    if n <= 1:
        return 1
    return kernel_threads(int(min(n, work // grain)))


# The lookup and the bag pooling only move rows (~0.1 ns an element), so a second
# thread is worth waking (~0.1 ms on a virtual machine with passive waiting) only
# for about 2 MB of rows or more per thread. Measured, lookup of uniform ids, V =
# 1e6, D = 64, 1 vs 2 threads: 8,192 ids 0.16 vs 0.19-0.28 ms, 16,384 ids 0.32 vs
# 0.28-0.43, 32,768 ids 0.63 vs 0.41. Workers that spin before sleeping (libgomp's
# default: see workers_spin) start at once, and since the kernels claim their work
# from a shared counter (no barrier at the start of a parallel region) a second
# thread pays from 1 MB of rows on (AMD EPYC, D = 64, 4,096 ids, 1 vs 2 threads, in
# us, back to back / with 20 ms of other work between calls: row sums 27 vs 16 /
# 60 vs 86 at V = 1e4, 23 vs 14 / 57 vs 72 at V = 1e6; lookup 26 vs 17 / 86 vs
# 112 and 34 vs 23 / 110 vs 102; bag sum 18 vs 13 / 64 vs 101 and 23 vs 15 / 92
# vs 103). Calls 20 ms apart lose up to ~40 us (the worker has gone to sleep by
# then: libgomp spins for 4-8 ms here), calls in a loop gain a third.
ROW_MOVE_GRAIN = 1 << 17 if workers_spin() else 1 << 19

# The lookup and the bag forward read table rows that are often in cache (a small
# table, hot ids), where a row costs less than the row sums' reads and the wake-up
# weighs more: with passive waiting a second thread pays from 8 MB of rows on, so
# their grain counts 4-byte words, 2 M of them for two threads (AMD EPYC, 1 vs 2
# threads, D = 64 float32: lookup of 16,384 ids 0.093 vs 0.116 ms at V = 1e4, 0.122
# vs 0.128 at V = 1e6; 32,768 ids 0.178 vs 0.162 and 0.337 vs 0.245; bag sum of
# 16,384 rows 0.065 vs 0.118 and 0.103 vs 0.117 ms; float64: 8,192 ids 0.096 vs
# 0.129 and 0.121 vs 0.127, 16,384 ids 0.193 vs 0.165 and 0.321 vs 0.237). With
# spinning workers as ROW_MOVE_GRAIN (1 MB of rows: figures above).
ROW_GATHER_GRAIN = 1 << 17 if workers_spin() else 1 << 20

# The lookup also writes each row it reads, and on the benchmark VM a core writes
# ~17 GB/s even from cache, so with passive waiting its second thread pays from a
# quarter of ROW_GATHER_GRAIN, whether the table is cached or not. Measured there,
# V = 1e4 / 1e6, D = 64, a new batch each call, 1 vs 2 threads (us): 4,096 ids 87 vs
# 98 / 172 vs 174; 8,192 ids 232 vs 176 / 364 vs 276; 16,384 ids 382 vs 222 / 625
# vs 398. (The bag sums, which write a row per bag, stay at ROW_GATHER_GRAIN there:
# V = 1e4, 16,384 ids 100 vs 142 us, 32,768 180 vs 191.) The AMD EPYC had measured
# one thread faster for 16,384 cached ids (figures above): a machine's write speed
# decides, and this is the machine the benchmarks run on.
ROW_WRITE_GRAIN = 1 << 17 if workers_spin() else 1 << 18


def threads_for_rows_read(nbytes, writes_rows=False):
    """Threads for a pass that reads ``nbytes`` of table rows and moves them (the
    lookup, the sum and mean bag forward): ROW_GATHER_GRAIN counts 4-byte words,
    ROW_WRITE_GRAIN for a pass that also writes a row per row read."""
    return threads_for(nbytes >> 2, ROW_WRITE_GRAIN if writes_rows else ROW_GATHER_GRAIN)
