"""The one place that maps a device (or an array) to the backend implementing it."""

import re

from sparsembed import _cpu

# "cpu" or "cuda" (any case; the caller lowers it), then an optional ":index"
_DEVICE_RE = re.compile(r"(cpu|cuda)(?::([0-9]+))?")


def normalize_device(device):
    """'cpu' or 'cuda', in any case, with an optional device index as torch writes
    it ('cuda:0', 'cpu:0'; see :func:`requested_device` for what the index of a
    GPU must be); anything else is a ValueError."""
    return _parse_device(device).group(1)


def _parse_device(device):
    match = _DEVICE_RE.fullmatch(str(device).lower())
    if match is None:
        raise ValueError(f"device must be 'cpu' or 'cuda' (optionally with an index, "
                         f"'cuda:0'), got {device!r}")
    return match


def requested_device(device):
    """:func:`normalize_device` of a device a user asks a layer for.

    sparsembed runs on CuPy's current device (its arrays and kernels go where CuPy
    puts them), so 'cuda:N' must name that device: another index is a ValueError
    that says how to select it, not a silent move to the current one. Without
    CuPy or a GPU, the backend's ImportError / RuntimeError comes first.
    """
    match = _parse_device(device)
    name, index = match.group(1), match.group(2)
    if name == "cuda" and index is not None:
        get_backend(name)
        import cupy

        current = int(cupy.cuda.runtime.getDevice())
        if int(index) != current:
            raise ValueError(f"device {device!r}: sparsembed runs on CuPy's current device, "
                             f"cuda:{current}; select device {int(index)} first with "
                             f"cupy.cuda.Device({int(index)}).use()")
    return name


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
