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


# sparsembed._cpu once imported (it cannot be imported at the top: modules it imports
# import this one). Every call of a CPU layer asks for its backend, and parsing the
# device string and running the import statement each time cost ~0.6 us of a 5.5 us
# lookup of a few ids.
_cpu_backend = None


def get_backend(device):
    """The backend module for ``device``: ``sparsembed._cpu`` or the CuPy backend.

    Raises
    ------
    ImportError, RuntimeError
        ``device="cuda"`` without CuPy or without a usable GPU.
    """
    global _cpu_backend
    if _cpu_backend is not None and device == "cpu":
        return _cpu_backend
    dev = normalize_device(device)
    if dev == "cpu":
        from sparsembed import _cpu

        _cpu_backend = _cpu
        return _cpu
    from sparsembed._cuda import load_backend

    return load_backend()


def backend_of(array):
    """The backend owning ``array``: CPU for numpy arrays, CUDA for CuPy arrays."""
    module = type(array).__module__
    if module == "cupy" or module.startswith("cupy."):  # not split(): a step asks ~5 times
        return get_backend("cuda")
    return get_backend("cpu")
