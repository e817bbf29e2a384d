"""sparsembed: sparse, trainable embedding tables for numpy and scipy.

``Embedding`` and ``EmbeddingBag`` layers, their stateless ``functional`` forms, and
sparse-aware optimizers, with Cython/OpenMP kernels for every hot loop.
"""

from sparsembed import functional, init, optim
from sparsembed._threads import _warn_once_without_openmp, get_num_threads, set_num_threads
from sparsembed._version import __version__
from sparsembed.embedding import Embedding, EmbeddingBag
from sparsembed import io
from sparsembed.vocabulary import Vocabulary
from sparsembed.serialization import load, save
from sparsembed.hashing import HashEmbedding

__all__ = [
    "Embedding",
    "EmbeddingBag",
    "functional",
    "init",
    "optim",
    "get_num_threads",
    "set_num_threads",
    "show_config",
    "__version__",
    "io",
    "Vocabulary",
    "save",
    "load",
    "HashEmbedding",
]


def show_config(print_out=False):
    """What this build of sparsembed can do.

    Parameters
    ----------
    print_out : bool, default False
        Also print the report.

    Returns
    -------
    dict
        ``version``, ``openmp`` (compiled with OpenMP), ``max_threads`` (what OpenMP
        would use), ``num_threads`` (what the kernels use now), ``simd`` (the vector
        instruction set EmbeddingBag's sum/mean pooling picked at run time:
        "baseline", "avx2" or "avx512"; the environment variable
        ``SPARSEMBED_SIMD`` caps it), ``cupy`` (CuPy importable), ``numpy`` and
        ``scipy`` versions.
    """
    import importlib.util

    import numpy
    import scipy

    from sparsembed._kernels._bag import simd_level
    from sparsembed._kernels._openmp_helpers import openmp_enabled, openmp_max_threads

    config = {
        "version": __version__,
        "openmp": openmp_enabled(),
        "max_threads": openmp_max_threads(),
        "num_threads": get_num_threads(),
        "simd": ("baseline", "avx2", "avx512")[simd_level()],
        "cupy": importlib.util.find_spec("cupy") is not None,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }
    if print_out:
        for key, value in config.items():
            print(f"{key:>12}: {value}")
    return config


_warn_once_without_openmp()


def __getattr__(name):
    # Submodules imported on first use: `se.sklearn` needs scikit-learn, which
    # `import sparsembed` must not require.
    if name in ("sklearn", "datasets"):
        import importlib

        return importlib.import_module(f"sparsembed.{name}")
    raise AttributeError(f"module 'sparsembed' has no attribute {name!r}")
