"""Build the compiled kernels of sparsembed.

The extension list is every ``.pyx`` under ``sparsembed/``. OpenMP is probed by
compiling and linking a tiny program; set ``SPARSEMBED_NO_OPENMP=1`` to force the
serial fallback, ``SPARSEMBED_BOUNDSCHECK=1`` to turn Cython's bounds checks back on
for debugging, ``SPARSEMBED_DEBUG_INFO=1`` to compile with debug information (-g).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d", n > 0);
        return 0;
    }
    """
)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _openmp_flags(compiler):
    """Return (compile_args, link_args) for OpenMP, or None when it does not work."""
    if _env_flag("SPARSEMBED_NO_OPENMP"):
        print("sparsembed: SPARSEMBED_NO_OPENMP is set, building without OpenMP")
        return None
    if sys.platform == "win32":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        for cflags, lflags in candidates:
            try:
                objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                exe = os.path.join(tmp, "probe")
                compiler.link_executable(objs, exe, extra_postargs=lflags)
                out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
                if out.returncode == 0 and out.stdout.strip() == "1":
                    return cflags, lflags
            except Exception:  # noqa: BLE001 - any failure means "no OpenMP"
                continue
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("sparsembed: WARNING: the compiler cannot build OpenMP code, building serial kernels")
    return None


def _settings_changed(stamp, settings):
    """True when the build that last wrote ``stamp`` used other ``settings``.

    setuptools and cythonize decide what to rebuild from file timestamps only, so a
    build folder (or generated C file) left by a build with other settings, e.g. with
    OpenMP before a ``SPARSEMBED_NO_OPENMP=1`` build, would be reused as it is.
    """
    try:
        with open(stamp) as f:
            return f.read() != settings
    except OSError:
        return True


def _record_settings(stamp, settings):
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as f:
        f.write(settings)


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        # compile the extensions in parallel (one per core) unless --parallel / -j
        # says otherwise: pip builds with the defaults, and a serial build waits on
        # each module in turn (see SLOWEST_FIRST)
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        flags = _openmp_flags(self.compiler)
        debug_info = _env_flag("SPARSEMBED_DEBUG_INFO")
        settings = repr((flags, self.compiler.compiler_type, debug_info))
        stamp = os.path.join(self.build_temp, "sparsembed-build-settings")
        if _settings_changed(stamp, settings):
            self.force = self.compiler.force = True  # rebuild every extension
        for ext in self.extensions:
            if self.compiler.compiler_type == "msvc":
                ext.extra_compile_args += ["/O2"]
            else:
                # -fno-math-errno: sqrt never sets errno here, so the compiler may
                # vectorise it (sqrtps) instead of calling libm per element (the
                # optimizers' inner loops); results are the same, sqrt is exact.
                # -ffp-contract=off: kernels built for several SIMD levels (see
                # _simd_pool.h) must give the same bits, so no level may fuse a
                # multiply-add that the baseline build rounds twice
                ext.extra_compile_args += ["-O3", "-fno-math-errno", "-ffp-contract=off"]
                # no debug information unless asked for: the -g of Python's own
                # flags made GCC take 37% longer on the SIMD pooling (_sum_pooling
                # at once: 199 s vs 145) and tripled the modules' size
                if not debug_info:
                    ext.extra_compile_args += ["-g0"]
            if flags is not None:
                ext.extra_compile_args += flags[0]
                ext.extra_link_args += flags[1]
        super().build_extensions()
        _record_settings(stamp, settings)


# The modules that keep the compiler busiest, in that order (seconds of GCC -O3 -g0,
# one compile at a time, Intel Xeon VM): the SIMD pooling's baseline and AVX2 bodies
# (~80), the bag kernels with the max and float16 poolings (72), the pooling's AVX-512
# bodies (~70); every other module 1-9 s. build_ext hands the extensions to its
# workers in list order, so these go first and the small ones fill the other cores
# around them. In name order _sum_pooling came last and then compiled alone for some
# 3 of the 4.5 minutes a clean 2-core build took (2.6 minutes now, with -g0).
SLOWEST_FIRST = ("sparsembed._kernels._sum_pooling", "sparsembed._kernels._bag",
                 "sparsembed._kernels._sum_pooling_avx512")


def _compile_order(module):
    return (SLOWEST_FIRST.index(module) if module in SLOWEST_FIRST else len(SLOWEST_FIRST), module)


def extensions():
    exts = []
    paths = glob.glob(os.path.join("sparsembed", "**", "*.pyx"), recursive=True)
    path_of = {os.path.splitext(path)[0].replace(os.sep, "."): path for path in paths}
    for module in sorted(path_of, key=_compile_order):
        path = path_of[module]
        exts.append(
            Extension(
                module,
                [path],
                include_dirs=[numpy.get_include()],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    checks = _env_flag("SPARSEMBED_BOUNDSCHECK")
    directives = {
        "language_level": 3,
        "boundscheck": checks,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": checks,
        "cpow": True,
    }
    # C files generated with other directives (bounds checks on/off) are regenerated
    stamp = os.path.join("build", "sparsembed-cython-directives")
    settings = repr(sorted(directives.items()))
    exts = cythonize(exts, compiler_directives=directives, force=_settings_changed(stamp, settings))
    _record_settings(stamp, settings)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
