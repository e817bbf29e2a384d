"""The one place that maps a device (or an array) to the backend implementing it."""

import re

from sparsembed import _cpu

# "cpu" or "cuda" (any case; the caller lowers it), then an optional ":index"
_DEVICE_RE = re.compile(r"(cpu|cuda)(?::[0-9]+)?")


def normalize_device(device):
    """'cpu' or 'cuda', in any case, with an optional device index as torch writes
    it ('cuda:0', 'cpu:0'; sparsembed uses CuPy's current device whatever the
    index); anything else is a ValueError."""
    match = _DEVICE_RE.fullmatch(str(device).lower())
    if match is None:
        raise ValueError(f"device must be 'cpu' or 'cuda' (optionally with an index, "
                         f"'cuda:0'), got {device!r}")
    return match.group(1)


def get_backend(device):
    """The backend module for ``device``: ``sparsembed._cpu`` or the CuPy backend.

    Raises
    ------
    ImportError, RuntimeError
        ``device="cuda"`` without CuPy or without a usable GPU.
    """
    # every call of a CPU layer asks (some more than once): the common "cpu" is
    # answered before any parsing (0.6 us of a 5.5 us lookup of a few ids)
    if (type(device) is str and device == "cpu") or normalize_device(device) == "cpu":
        return _cpu
    from sparsembed._cuda import load_backend

    return load_backend()


def backend_of(array):
    """The backend owning ``array``: CPU for numpy arrays, CUDA for CuPy arrays."""
    module = type(array).__module__
    if module == "cupy" or module.startswith("cupy."):  # not split(): a step asks ~5 times
        return get_backend("cuda")
    return get_backend("cpu")
