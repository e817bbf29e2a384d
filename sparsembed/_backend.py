"""The one place that maps a device (or an array) to the backend implementing it."""


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
    dev = normalize_device(device)
    if dev == "cpu":
        from sparsembed import _cpu

        return _cpu
    from sparsembed._cuda import load_backend

    return load_backend()


def backend_of(array):
    """The backend owning ``array``: CPU for numpy arrays, CUDA for CuPy arrays."""
    if type(array).__module__.split(".")[0] == "cupy":
        return get_backend("cuda")
    return get_backend("cpu")
