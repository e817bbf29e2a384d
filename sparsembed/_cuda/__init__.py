"""GPU side of sparsembed (CuPy). Imported only when ``device="cuda"`` is asked for."""


def cupy_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001
        return False


def load_backend():
    """Return the CuPy backend module, or raise a clear error naming the fix."""
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "device='cuda' needs CuPy: pip install cupy-cuda12x (cupy-cuda13x for "
            "CUDA 13), or pip install '.[gpu]' in a sparsembed checkout"
        ) from exc
    if not cupy_available():
        raise RuntimeError(
            "device='cuda' was asked for, but CuPy sees no CUDA device; "
            "check the driver, or use device='cpu'"
        )
    from sparsembed._cuda import backend

    return backend
