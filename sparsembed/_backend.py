"""The one place that maps a device (or an array) to the backend implementing it."""

from sparsembed import _cpu

_DEVICES = ("cpu", "cuda")


def normalize_device(device):
    """'cpu' or 'cuda' ('cuda:0' is accepted as 'cuda'); anything else is a ValueError."""
    dev = str(device).lower()
    if dev.startswith("cuda"):
        dev = "cuda"
    if dev not in _DEVICES:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


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
