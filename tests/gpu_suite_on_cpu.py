"""pytest plugin: run the GPU test suite (tests/test_gpu.py) without a GPU.

``pytest -p gpu_suite_on_cpu tests/test_gpu.py`` (tests/ on sys.path) installs the
numpy stand-in for CuPy (``reference_gpu.fake_cupy_modules``), whose kernels are the
CUDA source itself compiled for the CPU (``reference_gpu.CudaSourceOnCpu``: each
warp's lanes in lockstep, tests/warp_emulator.h), and tells sparsembed that CuPy
sees a device. Every GPU test then checks the kernels' code against the CPU path on
any machine with a C++ compiler; ``test_gpu_cpu_side`` runs it in a subprocess. What
stays for a real GPU: speed, CuPy itself and the hardware.
"""

import sys

import reference_gpu

for _name, _module in reference_gpu.fake_cupy_modules(1).items():
    sys.modules[_name] = _module
reference_gpu.FakeRawModule.on_cpu = reference_gpu.CudaSourceOnCpu.of

import sparsembed._cuda as _cuda  # noqa: E402  (after the stand-in is in place)

_cuda.cupy_available = lambda: True
