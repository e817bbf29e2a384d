"""A numpy stand-in for CuPy, to run the GPU backend's Python code without a GPU.

``fake_cupy_modules()`` builds modules named ``cupy``, ``cupyx``, ``cupyx.scipy`` and
``cupyx.scipy.sparse`` whose arrays are numpy arrays and whose ``RawModule`` runs
each CUDA kernel as a numpy emulation. Installed in ``sys.modules`` (with
``monkeypatch``), they let ``sparsembed._cuda.backend`` import and run unchanged.
Device arrays are a numpy subclass (:class:`FakeDeviceArray`) that the backend
selection and ``isinstance(a, cupy.ndarray)`` tell apart from host arrays, so a host
array reaching a kernel, or a device array handled as a host one, shows up here.

Each emulated launch first checks the launch against the kernel's C signature,
parsed from the CUDA source: the number of arguments, pointer arguments are
C-contiguous arrays of the pointee's dtype (writable when not const), scalar
arguments are numpy scalars of the exact C type, and the block is one warp wide.
So a launcher passing arguments in the wrong order or of the wrong type fails here,
on a machine without a GPU. The emulations follow the kernels' arithmetic (segment
sums in input order, in the table's dtype; norms in float64), not their thread
layout. :class:`CudaSourceOnCpu` runs the CUDA source itself instead: compiled by
the host C++ compiler against ``warp_emulator.h``, thread layout, vector loads and
warp shuffles included.
"""

import importlib.machinery
import re
import types

import numpy as np
import scipy.sparse

C_DTYPES = {"float": np.float32, "double": np.float64, "int": np.int32,
            "long long": np.int64, "i64": np.int64}


def parse_typedefs(source):
    """{alias: c type} of the source's typedefs (T, I, i64)."""
    return {alias: ctype for ctype, alias in re.findall(r"typedef ([\w ]+?) (\w+);", source)}


def parse_signatures(source):
    """{kernel name: [(c type, is_pointer, is_const, arg name), ...]}."""
    out = {}
    for m in re.finditer(r'extern "C" __global__ void (\w+)\(([^)]*)\)', source):
        params = []
        for decl in m.group(2).split(","):
            decl = " ".join(decl.split())
            is_const = decl.startswith("const ")
            body = decl[len("const "):] if is_const else decl
            is_ptr = "*" in body
            ctype = body.split("*")[0].strip() if is_ptr else " ".join(body.split()[:-1])
            params.append((ctype, is_ptr, is_const, decl.split()[-1]))
        out[m.group(1)] = params
    return out


class FakeKernel:
    def __init__(self, name, params, typedefs, runner=None):
        self.name, self.params, self.typedefs = name, params, typedefs
        self.runner = runner  # a CudaSourceOnCpu, or None: the numpy emulation
        self.launches = 0

    def _dtype(self, ctype):
        return np.dtype(C_DTYPES[self.typedefs.get(ctype, ctype)])

    def __call__(self, grid, block, args, **kwargs):
        assert len(block) == 2 and block[0] == 32, (
            f"{self.name}: block {block} is not one warp wide")
        assert all(int(g) >= 1 for g in grid), f"{self.name}: empty grid {grid}"
        assert len(args) == len(self.params), (
            f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        named = {}
        for arg, (ctype, is_ptr, is_const, pname) in zip(args, self.params):
            want = self._dtype(ctype)
            if is_ptr:
                assert isinstance(arg, FakeDeviceArray), (
                    f"{self.name}.{pname}: a {type(arg).__name__}, not a device array")
                assert arg.dtype == want, (
                    f"{self.name}.{pname}: dtype {arg.dtype}, kernel wants {want}")
                assert arg.flags.c_contiguous, f"{self.name}.{pname}: not C-contiguous"
                if not is_const:
                    assert arg.flags.writeable, f"{self.name}.{pname}: read-only output"
            else:
                assert type(arg) is want.type, (
                    f"{self.name}.{pname}: scalar {type(arg).__name__}, kernel wants {want}")
            named[pname] = arg
        self.launches += 1
        if self.runner is not None:
            self.runner.launch(self.name, grid, block, args)
        else:
            EMULATIONS[self.name](**named)


class FakeRawModule:
    """``cupy.RawModule(code=...)``: its functions run the numpy emulations, or, when
    ``on_cpu`` is set (``CudaSourceOnCpu.of``), the CUDA source itself on the CPU."""

    instances = []
    on_cpu = None

    def __init__(self, code, **kwargs):
        self.code = code
        self.typedefs = parse_typedefs(code)
        self.signatures = parse_signatures(code)
        self.runner = FakeRawModule.on_cpu(code) if FakeRawModule.on_cpu else None
        FakeRawModule.instances.append(self)

    def get_function(self, name):
        return FakeKernel(name, self.signatures[name], self.typedefs, self.runner)


class CudaSourceOnCpu:
    """A module's CUDA source, compiled by the host C++ compiler against
    ``tests/warp_emulator.h`` (the CUDA device environment: warps of 32 lanes run as
    cooperatively scheduled contexts, warp shuffles performed when all lanes reach
    them), so the kernels themselves run on a machine without a GPU.

    Each kernel gets a C wrapper ``run_<name>(grid_x, block_y, args...)``. A launch
    runs at most :attr:`GRID_CAP` blocks: the kernels loop grid-stride, so fewer
    blocks give the same result and go round their loops more often. A lane that
    diverges at a warp collective fails the launch (AssertionError), as it would be
    undefined on a GPU.
    """

    GRID_CAP = 3
    _built = {}
    _SCALARS = {"i64": "c_longlong", "long long": "c_longlong", "int": "c_int",
                "double": "c_double", "float": "c_float"}

    @classmethod
    def of(cls, code):
        """The compiled module of ``code`` (built once per source and process)."""
        if code not in cls._built:
            cls._built[code] = cls(code)
        return cls._built[code]

    @staticmethod
    def compiler():
        """A working host C++ compiler, or None."""
        import shutil
        import subprocess

        cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        # CI's installed-wheel step puts /bin/false where the compilers were
        if cxx is None or subprocess.run([cxx, "--version"], capture_output=True).returncode:
            return None
        return cxx

    @classmethod
    def asan_runtime(cls):
        """The compiler's AddressSanitizer runtime library (to LD_PRELOAD into a
        process whose kernels are built with ``CUDA_ON_CPU_CFLAGS=-fsanitize=address``:
        out-of-bounds reads and writes of the kernels are then caught, as
        compute-sanitizer's memcheck does on a GPU), or None."""
        import os
        import subprocess

        cxx = cls.compiler()
        if cxx is None:
            return None
        res = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True,
                             text=True)
        path = res.stdout.strip()
        return path if res.returncode == 0 and os.path.isabs(path) and os.path.exists(path) \
            else None

    def __init__(self, code):
        import ctypes
        import os
        import shutil
        import subprocess
        import tempfile

        header = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warp_emulator.h")
        self.typedefs = parse_typedefs(code)
        self.signatures = parse_signatures(code)
        wrappers = []
        for m in re.finditer(r'extern "C" __global__ void (\w+)\(([^)]*)\)', code):
            names = ", ".join(" ".join(d.split()).split()[-1] for d in m.group(2).split(","))
            wrappers.append(f'extern "C" const char* run_{m.group(1)}(unsigned gx, unsigned by, '
                            f'{m.group(2)}) {{\n    return se_emu::run(gx, by, [=] {{ '
                            f'{m.group(1)}({names}); }});\n}}')
        workdir = tempfile.mkdtemp(prefix="cuda_on_cpu_")
        src, lib = os.path.join(workdir, "kernels.cpp"), os.path.join(workdir, "kernels.so")
        with open(src, "w") as f:
            f.write(f'#include "{header}"\n{code}\n' + "\n".join(wrappers) + "\n")
        extra = os.environ.get("CUDA_ON_CPU_CFLAGS", "").split()  # e.g. -fsanitize=address
        res = subprocess.run([self.compiler(), "-std=c++17", "-O1", "-fPIC", "-shared", *extra,
                              "-ffp-contract=off", "-Wno-unknown-pragmas", "-o", lib, src],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        self.lib = ctypes.CDLL(lib)
        shutil.rmtree(workdir)  # the loaded library stays mapped
        for name, params in self.signatures.items():
            fn = getattr(self.lib, f"run_{name}")
            fn.restype = ctypes.c_char_p
            fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
                ctypes.c_void_p if is_ptr
                else getattr(ctypes, self._SCALARS[self.typedefs.get(ctype, ctype)])
                for ctype, is_ptr, _, _ in params]

    def launch(self, name, grid, block, args):
        values = [min(int(grid[0]), self.GRID_CAP), int(block[1])]
        values += [a.ctypes.data if is_ptr else a.item()
                   for a, (_, is_ptr, _, _) in zip(args, self.signatures[name])]
        error = getattr(self.lib, f"run_{name}")(*values)
        assert not error, f"{name} on the CPU: {error.decode()}"


# ----------------------------------------------------------------- emulations

def _flag_first_bad(idx, lo, hi, n, num_rows, bad):
    """``se_flag_bad`` over ``idx[lo:hi]``: bad[0] = max(bad[0], n - i) for the first
    position i there holding an id outside [0, num_rows)."""
    ids = np.asarray(idx[int(lo):int(hi)], dtype=np.int64)
    hit = np.flatnonzero((ids < 0) | (ids >= num_rows))
    if hit.size:
        bad[0] = max(int(bad[0]), int(n) - (int(lo) + int(hit[0])))


def _gather(weight, idx, out, n, dim, num_rows, bad):
    """Rows of the ids in range; a bad id's row is not read (zeros) and flagged."""
    ids = np.asarray(idx, dtype=np.int64)
    ok = (ids >= 0) & (ids < num_rows)
    o = out.reshape(int(n), int(dim))
    o[ok] = weight.reshape(-1, int(dim))[ids[ok]]
    o[~ok] = 0
    _flag_first_bad(idx, 0, n, n, num_rows, bad)


def _check_ids(idx, n, num_rows, bad):
    _flag_first_bad(idx, 0, n, n, num_rows, bad)


def _fill_columns(cols, n_rows, dim):
    cols.reshape(int(n_rows), int(dim))[...] = np.arange(int(dim))


def _plan_heads(ids, order, m, sorted_ids, head):
    sorted_ids[...] = ids[order]
    head[0] = 1
    head[1:] = sorted_ids[1:] != sorted_ids[:-1]


def _plan_segments(head, pos, sorted_ids, m, starts, rows):
    first = np.flatnonzero(head)
    starts[pos[first] - 1] = first
    rows[pos[first] - 1] = sorted_ids[first]
    starts[pos[int(m) - 1]] = m


def _row_pointer(rows, n_rows, num_rows, dim, indptr):
    indptr[...] = np.searchsorted(rows[:int(n_rows)], np.arange(int(num_rows) + 1)) * int(dim)


def _add_rows(a, src_a, b, src_b, n_rows, dim, out):
    d = int(dim)
    o = out.reshape(int(n_rows), d)
    o[...] = 0
    has_a, has_b = src_a >= 0, src_b >= 0
    o[has_a] += a.reshape(-1, d)[src_a[has_a]]
    o[has_b] += b.reshape(-1, d)[src_b[has_b]]


def _bag_starts(offsets, k, n, include_last, starts, result):
    k = int(k)
    starts[:k] = offsets
    if not include_last:
        starts[k] = n
    dec = np.flatnonzero(offsets[1:] < offsets[:-1])
    if dec.size:
        result[0] = max(int(result[0]), k - (int(dec[0]) + 1))
    result[1], result[2] = offsets[0], offsets[k - 1]


def row_norms(values, p):
    """Norms as the renorm kernel computes them (float64)."""
    a = np.abs(values.astype(np.float64))
    if p == 2.0:
        return np.sqrt((a * a).sum(axis=1))
    if p == 1.0:
        return a.sum(axis=1)
    if p == np.inf:
        return np.maximum(a.max(axis=1, initial=0.0), 0.0)
    if p == -np.inf:
        return a.min(axis=1, initial=np.inf)
    if p == 0.0:
        return (values != 0).sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore"):
        return (a ** p).sum(axis=1) ** (1.0 / p)


def _renorm(weight, rows, n_rows, dim, max_norm, p, kind):
    w = weight.reshape(-1, int(dim))
    norms = row_norms(w[rows], float(p))
    hit = norms > max_norm
    scale = (max_norm / (norms[hit] + 1e-7)).astype(w.dtype)
    w[rows[hit]] = w[rows[hit]] * scale[:, None]


def _segment_sum(grad, perm, starts, rows, dense, n_rows, dim, scale_by_count, out):
    """Each segment summed in input order, in the table's dtype (vectorised over the
    segments: the t-th term of every segment long enough is added at step t)."""
    g = grad.reshape(-1, int(dim))
    lo, hi = starts[:-1], starts[1:]
    acc = g[perm[lo]].copy()
    length = hi - lo
    for t in range(1, int(length.max()) if length.size else 0):
        live = length > t
        acc[live] += g[perm[lo[live] + t]]
    if scale_by_count:
        many = length > 1
        acc[many] /= length[many].astype(acc.dtype)[:, None]
    dst = out.reshape(-1, int(dim))
    if dense:
        dst[rows] = acc
    else:
        dst[...] = acc


def chunked_sum(terms, chunk, from_zero):
    """A long row's sum as the GPU backend computes it (``_ops.split_segments``):
    chunks of ``chunk`` terms summed in order (the first term copied, or added to 0
    when ``from_zero``, as the bag kernel does), then the chunk sums in order."""
    def in_order(ts, zero):
        acc = np.zeros_like(ts[0]) + ts[0] if zero else ts[0].copy()
        for t in ts[1:]:
            acc = acc + t
        return acc

    return in_order([in_order(terms[i:i + chunk], from_zero)
                     for i in range(0, len(terms), chunk)], False)


def _bag_forward(weight, idx, starts, pad, mode, psw, has_psw, n_bags, dim, out, argmax, counts,
                 n_ids, num_rows, bad):
    """Each bag pooled entry by entry, in order, in the table's dtype (a loop over the
    bags: the emulation runs on small test batches). A bag holding an id out of range
    gets its count, is flagged in ``bad`` and is not pooled; the ids past the last bag
    are checked too."""
    d = int(dim)
    w = weight.reshape(-1, d)
    o = out.reshape(-1, d)
    am = argmax.reshape(-1, d) if int(mode) == 2 else None
    _flag_first_bad(idx, starts[int(n_bags)], n_ids, n_ids, num_rows, bad)
    for b in range(int(n_bags)):
        ids = np.asarray(idx[int(starts[b]):int(starts[b + 1])], dtype=np.int64)
        counts[b] = int((ids != pad).sum())
        if ((ids < 0) | (ids >= num_rows)).any():
            _flag_first_bad(idx, starts[b], starts[b + 1], n_ids, num_rows, bad)
            continue
        acc = np.zeros(d, dtype=w.dtype)
        won = np.full(d, -1, dtype=np.int64)
        seen = 0
        for e in range(int(starts[b]), int(starts[b + 1])):
            r = int(idx[e])
            if r == pad:
                continue
            row = w[r]
            if mode == 2:
                better = np.ones(d, bool) if seen == 0 else row > acc
                acc = np.where(better, row, acc)
                won = np.where(better, e, won)
            elif has_psw:
                acc = acc + psw[e] * row
            else:
                acc = acc + row
            seen += 1
        if mode == 1 and seen > 1:
            acc = acc / w.dtype.type(seen)
        o[b] = acc
        counts[b] = seen
        if am is not None:
            am[b] = won


def _psw_grad(grad, weight, idx, entry_bag, pad, m, dim, out):
    d = int(dim)
    e = np.arange(int(m))
    dots = (grad.reshape(-1, d)[entry_bag[e]].astype(np.float64)
            * weight.reshape(-1, d)[idx[e]].astype(np.float64)).sum(axis=1)
    dots[idx[e] == pad] = 0
    out[e] = dots.astype(out.dtype)


def _bag_segment_sum(grad, perm, starts, rows, dense, entry_bag, scale, has_scale, argmax,
                     has_argmax, n_rows, dim, scale_by_count, out):
    d = int(dim)
    g = grad.reshape(-1, d)
    dst = out.reshape(-1, d)
    for u in range(int(n_rows)):
        acc = np.zeros(d, dtype=g.dtype)
        for k in range(int(starts[u]), int(starts[u + 1])):
            e = int(perm[k])
            b = int(entry_bag[e])
            if has_argmax:
                acc = acc + np.where(argmax.reshape(-1, d)[b] == e, g[b], g.dtype.type(0))
            elif has_scale:
                acc = acc + scale[e] * g[b]
            else:
                acc = acc + g[b]
        count = int(starts[u + 1] - starts[u])
        if scale_by_count and count > 1:
            acc = acc / g.dtype.type(count)
        dst[rows[u] if dense else u] = acc


def _update_rows(kind, h_lr, h_momentum, h_weight_decay, h_eps, h_c1, h_c2, h_c3, weight, rows,
                 all_rows, values, s1, has_s1, s2, n_rows, dim):
    """The optimizer update, vectorised over the rows, with the kernel's roundings."""
    d_ = int(dim)
    W = weight.reshape(-1, d_)
    T = W.dtype.type
    lr, mom, wd, eps, c1, c2 = (T(h) for h in (h_lr, h_momentum, h_weight_decay, h_eps,
                                                h_c1, h_c2))
    r = np.arange(int(n_rows)) if all_rows else rows
    w = W[r]
    g = values.reshape(-1, d_)[: int(n_rows)]

    def sqrt_t(x):
        return np.sqrt(x.astype(np.float64)).astype(W.dtype)

    def decayed():
        return g + wd * w if wd != 0 else g.copy()

    if kind == 3:
        d = decayed()
        acc = (d.astype(np.float64) ** 2).sum(axis=1)
        S = s1.reshape(-1)
        s_new = S[r] + (acc / d_).astype(W.dtype)
        S[r] = s_new
        W[r] = w - lr * (d / (sqrt_t(s_new) + eps)[:, None])
        return
    if kind == 0:
        d = decayed()
        if has_s1:
            M = s1.reshape(-1, d_)
            if h_c2 != 0:
                M[r] = d
            elif h_c1 == 1.0:
                M[r] = mom * M[r] + d
            else:
                M[r] = mom * M[r] + c1 * d
            d = d + mom * M[r] if h_c3 != 0 else M[r]
        W[r] = w - lr * d
    elif kind == 1:
        d = decayed()
        M = s1.reshape(-1, d_)
        M[r] = M[r] + d * d
        W[r] = w - lr * (d / (sqrt_t(M[r]) + eps))
    else:
        M, V = s1.reshape(-1, d_), s2.reshape(-1, d_)
        m_old, v_old = M[r], V[r]
        um = (g - m_old) * c1
        uv = (g * g - v_old) * c2
        M[r] = m_old + um
        V[r] = v_old + uv
        W[r] = w + (-lr) * ((um + m_old) / (sqrt_t(uv + v_old) + eps))


EMULATIONS = {"se_update_rows": _update_rows, "se_gather": _gather, "se_renorm": _renorm,
              "se_segment_sum": _segment_sum,
              "se_bag_forward": _bag_forward, "se_psw_grad": _psw_grad,
              "se_bag_segment_sum": _bag_segment_sum, "se_check_ids": _check_ids,
              "se_bag_starts": _bag_starts, "se_fill_columns": _fill_columns,
              "se_row_pointer": _row_pointer, "se_add_rows": _add_rows,
              "se_plan_heads": _plan_heads, "se_plan_segments": _plan_segments}


# ----------------------------------------------------------------- the fake modules

class FakeDeviceArray(np.ndarray):
    """numpy memory standing for GPU memory.

    Its type's module is "cupy", so ``sparsembed._backend.backend_of`` sends it to the
    CUDA backend; it has ``__cuda_array_interface__`` and ``get()`` like a CuPy array.
    Host arrays (plain ndarrays) are not instances, so ``isinstance(a, cupy.ndarray)``
    tells host from device as it does with CuPy, and the emulated kernels refuse host
    arrays, as CuPy's kernels do.
    """

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str,
                "data": (self.ctypes.data, False), "version": 3}

    def get(self):
        """A host copy (CuPy's device-to-host transfer)."""
        return np.array(self, subok=False)


FakeDeviceArray.__module__ = "cupy"


def to_device(x):
    """Plain ndarrays (host) as device arrays (copied, as a transfer would)."""
    if isinstance(x, FakeDeviceArray):
        return x
    if isinstance(x, np.ndarray):
        return np.array(x, subok=False).view(FakeDeviceArray)
    if isinstance(x, tuple):
        return tuple(to_device(v) for v in x)
    if isinstance(x, list):
        return [to_device(v) for v in x]
    return x


def _device_result(x):
    """A numpy function's result on "the device": arrays viewed, not copied."""
    if isinstance(x, np.ndarray) and not isinstance(x, FakeDeviceArray):
        return x.view(FakeDeviceArray)
    if isinstance(x, tuple):
        return tuple(_device_result(v) for v in x)
    return x


def _wrap(fn):
    def wrapped(*args, **kwargs):
        return _device_result(fn(*args, **kwargs))

    wrapped.__name__ = getattr(fn, "__name__", "fn")
    return wrapped


def _transfer(fn):
    """asarray & co: a host array is copied to the device, a device array passes."""
    def wrapped(a, *args, **kwargs):
        if isinstance(a, np.ndarray) and not isinstance(a, FakeDeviceArray):
            a = to_device(a)
        return _device_result(fn(a, *args, **kwargs))

    return wrapped


class FakeCsr(scipy.sparse.csr_matrix):
    """``cupyx.scipy.sparse.csr_matrix``: its data/indices/indptr are device arrays,
    ``get()`` gives scipy's csr_matrix on the host."""

    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        if name in ("data", "indices", "indptr") and isinstance(value, np.ndarray) \
                and not isinstance(value, FakeDeviceArray):
            # kept as the device view, so that the attribute is one array object from
            # read to read, as a CuPy matrix's is (the backend keys on that identity)
            value = value.view(FakeDeviceArray)
            object.__setattr__(self, name, value)
        return value

    def get(self):
        return scipy.sparse.csr_matrix((np.array(self.data, subok=False),
                                        np.array(self.indices, subok=False),
                                        np.array(self.indptr, subok=False)), shape=self.shape)


FakeCsr.__module__ = "cupyx.scipy.sparse._csr"


def _cupy_searchsorted(a, v, side="left", sorter=None):
    # CuPy takes no Python numbers for v (NotImplementedError), unlike numpy
    if not isinstance(v, np.ndarray):
        raise NotImplementedError("Only int or ndarray are supported for v")
    return np.searchsorted(a, v, side=side, sorter=sorter)


def fake_cupy_modules(device_count=1):
    """{module name: module} for a numpy-backed ``cupy`` and ``cupyx.scipy.sparse``.

    ``device_count`` is what ``cupy.cuda.runtime.getDeviceCount()`` returns; an
    exception instance is raised instead.
    """
    cp = types.ModuleType("cupy")
    for key in dir(np):
        if key.startswith("__"):
            continue
        obj = getattr(np, key)
        if callable(obj) and not isinstance(obj, (type, np.ufunc)):
            obj = _wrap(obj)
        setattr(cp, key, obj)
    for key in ("asarray", "array", "ascontiguousarray"):
        setattr(cp, key, _transfer(getattr(np, key)))
    # CuPy sorts stably, always (thrust's stable sort; kind=None means "stable")
    cp.argsort = _wrap(lambda a, axis=-1, kind=None: np.argsort(a, axis=axis, kind="stable"))
    cp.sort = _wrap(lambda a, axis=-1, kind=None: np.sort(a, axis=axis, kind="stable"))
    cp.searchsorted = _wrap(_cupy_searchsorted)
    cp.ndarray = FakeDeviceArray
    cp.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    cp.RawModule = FakeRawModule
    cp.asnumpy = lambda a: np.array(a, subok=False)

    def get_device_count():
        if isinstance(device_count, BaseException):
            raise device_count
        return device_count

    cp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=get_device_count, getDevice=lambda: 0))  # the current device
    cupyx = types.ModuleType("cupyx")
    cupyx.__spec__ = importlib.machinery.ModuleSpec("cupyx", None)
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    cupyx_sparse = types.ModuleType("cupyx.scipy.sparse")
    cupyx_sparse.csr_matrix = FakeCsr
    cupyx_sparse.issparse = lambda a: isinstance(a, FakeCsr)
    cupyx.scipy = cupyx_scipy
    cupyx_scipy.sparse = cupyx_sparse
    return {"cupy": cp, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy,
            "cupyx.scipy.sparse": cupyx_sparse}


# ----------------------------------------------------------------- NVRTC

def nvrtc_compiler():
    """CUDA's runtime compiler from the ``nvidia-cuda-nvrtc`` wheel (a test extra on
    Linux), as ``compile(source, options) -> (ok, log, ptx)``; None where the wheel is
    not installed. NVRTC needs no GPU: it compiles CUDA C++ to PTX, as CuPy does on
    a machine with one."""
    import ctypes
    import glob
    import os

    try:
        import nvidia
    except ImportError:
        return None
    found = None
    for base in nvidia.__path__:  # nvidia/cu13/lib (13.x), nvidia/cuda_nvrtc/lib (12.x)
        libs = sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so.*")))
        builtins = sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc-builtins.so.*")))
        if libs and builtins:
            found = libs[-1], builtins[-1]
    if found is None:
        return None
    # libnvrtc opens its builtins by name at compile time: loaded first, globally
    ctypes.CDLL(found[1], mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(found[0])

    def compile_(source, options):
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu",
                                      0, None, None) == 0
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            ok = lib.nvrtcCompileProgram(prog, len(options), opts) == 0
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            ptx = b""
            if ok:
                lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
                buf = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetPTX(prog, buf)
                ptx = buf.value
            return ok, log.value.decode(errors="replace"), ptx.decode(errors="replace")
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))

    return compile_


# ----------------------------------------------------------------- shared error cases

BAG_CHECK_ROWS = 20


def bag_check_cases():
    """``(ids, offsets, include_last_offset)`` batches an EmbeddingBag forward over a
    table of :data:`BAG_CHECK_ROWS` rows must refuse (the GPU with the CPU's error, word
    for word): bad offsets (ValueError; they win over bad ids, as on the CPU), and ids
    out of range (IndexError naming the first) in a bag or past the last bag."""
    ids = np.arange(12) % BAG_CHECK_ROWS
    cases = [
        (ids, [1, 4], False),            # offsets[0] != 0
        (ids, [0, 5, 3, 8], False),      # decreasing
        (ids, [0, 2, 3, 1, 0], True),    # decreasing twice: the first is named
        (ids, [0, -2], False),           # decreasing below 0
        (ids, [0, 5, 13], False),        # past the end of input
        (ids, [0, 4, 13], True),
        (ids, [], True),                 # include_last_offset needs an entry
    ]
    for pos, value in ((0, BAG_CHECK_ROWS), (5, -1), (11, 25)):
        bad = ids.copy()
        bad[pos] = value
        cases.append((bad, [0, 4, 4, 9], False))
    bad = ids.copy()
    bad[[3, 10]] = [-7, 99]
    cases += [
        (bad, [0, 6, 9], True),          # in bag 0, and one past the last bag
        (bad, [0, 2], True),             # both past the last bag
        (bad, [0, 5, 3], False),         # bad offsets win over bad ids
    ]
    past = ids.copy()
    past[10] = BAG_CHECK_ROWS
    cases.append((past, [0, 4, 8], True))  # only past the last bag
    return [(i, np.array(o, dtype=np.int64), last) for i, o, last in cases]


def assert_same_error(cpu_call, gpu_call, context=None):
    """Both calls raise a ValueError or IndexError, of one type and one message (the
    GPU path's validation words its errors as the CPU's)."""
    def raised(call):
        try:
            call()
        except (ValueError, IndexError) as e:
            return e
        raise AssertionError(f"no ValueError or IndexError raised ({context})")

    e_cpu, e_gpu = raised(cpu_call), raised(gpu_call)
    assert type(e_gpu) is type(e_cpu) and str(e_gpu) == str(e_cpu), (context, e_cpu, e_gpu)


def ids_with_bad(rng, n, num_rows, n_bad=40):
    """``n`` ids with ``n_bad`` out of range (negative or >= num_rows) at random
    positions, and the first such position (the one an error must name)."""
    ids = rng.integers(0, num_rows, size=n)
    where = rng.choice(n, size=n_bad, replace=False)
    ids[where] = np.where(rng.random(n_bad) < 0.5, -1 - rng.integers(0, 5, n_bad),
                          num_rows + rng.integers(0, 5, n_bad))
    return ids, int(where.min())
