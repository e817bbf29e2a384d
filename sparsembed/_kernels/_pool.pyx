"""A small cache of large output buffers, reused across calls.

A new numpy array of more than about 128 KiB can cost a page fault and a kernel
zero-fill per page the first time each page is written (see ``MIN_BYTES``); for
the lookup's output or a gradient that is often more than the kernel's own work
(it dominates on virtual machines). Training loops allocate the same sizes every
step, so sparsembed hands its large outputs out of this cache: when such an array
(and every view of it) is garbage, its memory goes back to the cache instead of to
the OS, and the next output of a similar size reuses it without faults. Arrays
from the cache are ordinary writable, C-contiguous numpy arrays (``base`` is a
private buffer object; they do not own their data, so ``ndarray.resize`` refuses
them, as it does any view).

The cache holds at most ``limit`` bytes of idle buffers (by default an eighth of the
memory, or of the container's or the process's (``ulimit -v`` / ``-d``) limit where
lower, from 1 GiB to 4 GiB: see
``default_limit``; environment variable ``SPARSEMBED_POOL_BYTES``; 0 turns it off),
oldest evicted first. All of this runs under the GIL.
"""

import os

import numpy as np

cimport numpy as cnp
from cpython.buffer cimport PyBUF_FORMAT
from cpython.ref cimport Py_INCREF

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # steals a reference to descr
    object PyArray_NewFromDescr(void* subtype, cnp.dtype descr, int nd, cnp.npy_intp* dims,
                                cnp.npy_intp* strides, void* data, int flags, void* obj)

cdef extern from "Python.h":
    int PyTraceMalloc_Track(unsigned int domain, size_t ptr, size_t size)
    int PyTraceMalloc_Untrack(unsigned int domain, size_t ptr)

# tracemalloc sees the buffers while arrays use them (as it sees numpy's own
# allocations), under this domain; idle buffers in the cache are not counted
cdef unsigned int TRACE_DOMAIN = 0x5E0B
from libc.stdint cimport int64_t

cdef extern from *:
    """
    #include <stdlib.h>
    #if defined(__linux__)
        #include <sys/mman.h>
    #endif
    #if defined(_WIN32)
        #include <malloc.h>
    #endif
    /* 2 MiB-aligned for large blocks (transparent huge pages where the OS has them) */
    static void* sparsembed_block_alloc(size_t n) {
        void* p = NULL;
    #if defined(_WIN32)
        p = _aligned_malloc(n, 64);
    #else
        size_t align = n >= ((size_t)4 << 20) ? ((size_t)2 << 20) : 64;
        if (posix_memalign(&p, align, n) != 0) return NULL;
        #if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (n >= ((size_t)4 << 20)) madvise(p, n, MADV_HUGEPAGE);
        #endif
    #endif
        return p;
    }
    static void sparsembed_block_free(void* p) {
    #if defined(_WIN32)
        _aligned_free(p);
    #else
        free(p);
    #endif
    }
    """
    void* block_alloc "sparsembed_block_alloc"(size_t n) nogil
    void block_free "sparsembed_block_free"(void* p) nogil

cdef enum:
    MAX_IDLE = 32

# Outputs below this size come from numpy's allocator as usual. Above glibc's
# initial mmap threshold (128 KiB) malloc may hand back memory that the OS has
# to fault in again on every call: glibc raises that threshold to the largest block
# freed so far and trims the top of its heap beyond twice it, so a block freed and
# allocated again each step can go back to the OS each time. Measured: a sparse
# step of 4,096 ids (V = 1e6, D = 64) took 479 page faults and 1.25 ms when its two
# ~1 MB outputs (row sums, column indices, each just under the old 1 MiB limit)
# came from numpy, 0 faults and 0.66 ms from here.
MIN_BYTES = 1 << 17

cdef void* _idle_ptr[MAX_IDLE]
cdef size_t _idle_size[MAX_IDLE]
cdef int _n_idle = 0
cdef size_t _idle_total = 0
cdef size_t _limit = 1 << 30
cdef size_t _align_big = 2 << 20
# Blocks under 4 MiB are rounded up to a multiple of a power of two between 1/32
# and 1/16 of their size (at least one 4 KiB page), not to 2 MiB: a caller may
# keep many small outputs alive, each holding its whole block, so the rounding
# wastes at most ~6%, and sizes that differ by less than that (the row sums of
# 4,080 or of 4,087 distinct ids) still share a block.
cdef size_t _small_block = 4 << 20


cdef inline size_t _granule(size_t nbytes) noexcept:
    cdef size_t g = 4096
    if nbytes >= _small_block:
        return _align_big
    while g * 32 <= nbytes:
        g *= 2
    return g


def default_limit(memory_bytes):
    """The idle bytes kept by default on a machine (or container) of ``memory_bytes``
    (None: unknown): an eighth of it, from 1 GiB to 4 GiB.

    One training step's outputs must fit, or each step evicts what the next needs
    and faults it in again: a dense layer's step at V = 1e6, D = 256 (float32) hands
    out a 256 MiB lookup and a 977 MiB gradient, and with the former limit of 1 GiB
    took 226 ms instead of ~60 (the page faults of 1.2 GB a step)."""
    if memory_bytes is None:
        return 1 << 30
    return min(max(memory_bytes // 8, 1 << 30), 4 << 30)


def _cgroup_limits():
    """The memory limits of this process's cgroup and its parents (v1 and v2), in
    bytes; those not set or not readable are left out."""
    limits = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return limits
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            root, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in parts[1].split(","):
            root, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        path = parts[2].rstrip("/")
        while True:
            try:
                with open(f"{root}{path}/{name}") as f:
                    limits.append(int(f.read().strip()))
            except (OSError, ValueError):  # not mounted there, or "max"
                pass
            if not path:
                break
            path = path.rsplit("/", 1)[0]
    return limits


def _address_space_limits():
    """The process's address-space and data-segment limits (``ulimit -v`` / ``-d``)
    where set: idle buffers count against them as live ones do."""
    try:
        import resource
    except ImportError:  # Windows
        return []
    limits = []
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        try:
            soft = resource.getrlimit(getattr(resource, name))[0]
        except (AttributeError, ValueError, OSError):
            continue
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(soft)
    return limits


def _memory_bytes():
    """Physical memory, or the container's or the process's limit where lower; None
    if unknown."""
    try:
        found = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None
    return min(found + [n for n in _cgroup_limits() if n > 0] + _address_space_limits())


# a limit past any memory (``SPARSEMBED_POOL_BYTES=1e30``) is taken as this
_MAX_LIMIT = 1 << 62


def _checked_limit(limit_bytes):
    return min(max(int(limit_bytes), 0), _MAX_LIMIT)


def _limit_from_env():
    raw = os.environ.get("SPARSEMBED_POOL_BYTES", "").strip()
    try:
        return _checked_limit(float(raw))
    except (ValueError, OverflowError):  # unset, or not a number of bytes
        return default_limit(_memory_bytes())


_limit = _limit_from_env()


cdef void _drop_idle(int i) noexcept:
    global _n_idle, _idle_total
    cdef int j
    block_free(_idle_ptr[i])
    _idle_total -= _idle_size[i]
    for j in range(i, _n_idle - 1):
        _idle_ptr[j] = _idle_ptr[j + 1]
        _idle_size[j] = _idle_size[j + 1]
    _n_idle -= 1


cdef void _release(void* ptr, size_t size) noexcept:
    global _n_idle, _idle_total
    if ptr == NULL:
        return
    if size > _limit:
        block_free(ptr)
        return
    while _n_idle > 0 and (_n_idle == MAX_IDLE or _idle_total + size > _limit):
        _drop_idle(0)
    _idle_ptr[_n_idle] = ptr
    _idle_size[_n_idle] = size
    _n_idle += 1
    _idle_total += size


cdef void* _acquire(size_t nbytes, size_t* size_out) noexcept:
    """A block of at least nbytes: the smallest idle one that is not much larger,
    else a new one (rounded up so that similar sizes can share it later)."""
    global _n_idle, _idle_total
    cdef int i, best = -1
    cdef size_t granule = _granule(nbytes)
    cdef size_t slack = nbytes // 4 + granule
    cdef void* p
    for i in range(_n_idle):
        if nbytes <= _idle_size[i] <= nbytes + slack:
            if best < 0 or _idle_size[i] < _idle_size[best]:
                best = i
    if best >= 0:
        p = _idle_ptr[best]
        size_out[0] = _idle_size[best]
        _idle_total -= _idle_size[best]
        for i in range(best, _n_idle - 1):
            _idle_ptr[i] = _idle_ptr[i + 1]
            _idle_size[i] = _idle_size[i + 1]
        _n_idle -= 1
        return p
    size_out[0] = (nbytes + granule - 1) // granule * granule
    p = block_alloc(size_out[0])
    if p == NULL and _n_idle > 0:
        while _n_idle > 0:
            _drop_idle(0)
        p = block_alloc(size_out[0])
    return p


cdef class _Block:
    """Owner of one cached buffer; exposes ``nbytes`` of it as a writable buffer."""
    cdef void* ptr
    cdef size_t size
    cdef Py_ssize_t nbytes
    cdef Py_ssize_t itemsize

    def __dealloc__(self):
        if self.ptr != NULL:
            PyTraceMalloc_Untrack(TRACE_DOMAIN, <size_t> self.ptr)
        _release(self.ptr, self.size)
        self.ptr = NULL

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        buffer.buf = self.ptr
        buffer.obj = self
        buffer.len = self.nbytes
        buffer.readonly = 0
        buffer.itemsize = 1
        if flags & PyBUF_FORMAT:
            buffer.format = "B"
        else:
            buffer.format = NULL
        buffer.ndim = 1
        buffer.shape = &self.nbytes
        buffer.strides = &self.itemsize
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer* buffer):
        pass


def empty(shape, dtype):
    """``numpy.empty(shape, dtype)``, from the cache when it is large."""
    cdef cnp.dtype descr = np.dtype(dtype)
    cdef int64_t count = 1
    cdef int64_t extent
    cdef int ndim = 0
    cdef cnp.npy_intp dims[cnp.NPY_MAXDIMS]
    for s in shape:
        extent = s  # any integer (numpy's too), through __index__
        if ndim == cnp.NPY_MAXDIMS:
            return np.empty(shape, dtype=descr)  # numpy's own error
        dims[ndim] = extent
        ndim += 1
        count *= extent
    cdef size_t nbytes = count * descr.itemsize
    if nbytes < MIN_BYTES or _limit == 0 or count < 0:
        return np.empty(shape, dtype=descr)
    cdef _Block block = _Block.__new__(_Block)
    cdef size_t size = 0
    block.ptr = _acquire(nbytes, &size)
    if block.ptr == NULL:
        raise MemoryError(f"cannot allocate {nbytes} bytes")
    block.size = size
    block.nbytes = nbytes
    PyTraceMalloc_Track(TRACE_DOMAIN, <size_t> block.ptr, nbytes)
    block.itemsize = 1
    # the array straight from numpy's C API over the block (not np.frombuffer and a
    # reshape: 0.7 -> 0.2 us, paid by every large output of every call)
    Py_INCREF(descr)  # PyArray_NewFromDescr steals a reference to it
    arr = PyArray_NewFromDescr(<void*> cnp.ndarray, descr, ndim, dims, NULL, block.ptr,
                               cnp.NPY_ARRAY_CARRAY, NULL)
    cnp.set_array_base(arr, block)
    return arr


def set_limit(limit_bytes):
    """Set the most bytes of idle buffers kept (0: no cache); returns the old limit."""
    global _limit
    old = _limit
    _limit = _checked_limit(limit_bytes)
    while _n_idle > 0 and _idle_total > _limit:
        _drop_idle(0)
    return old


def clear():
    """Give every idle buffer back to the OS."""
    while _n_idle > 0:
        _drop_idle(0)


def stats():
    """``{'idle_buffers', 'idle_bytes', 'limit'}``."""
    return {"idle_buffers": _n_idle, "idle_bytes": _idle_total, "limit": _limit}
