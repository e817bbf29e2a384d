#!/usr/bin/env bash
# One-shot GPU verification, for a machine with an NVIDIA GPU (e.g. a session that is
# lent one through the device tool). From the repository root:
#
#     bash benchmarks/gpu_check.sh            # results under $OUT (default benchmarks/results/gpu)
#
# 1. makes sure CuPy is importable (installs cupy-cuda12x when missing and a package
#    index is reachable; offline, put wheels in ./wheels first);
# 2. builds the kernels in place and checks the package imports and sees the device;
# 3. runs the GPU tests (tests/test_gpu.py, marked gpu) and the CPU-side GPU tests,
#    then the kernels' error paths under compute-sanitizer memcheck where it is installed
#    (benchmarks/gpu_memcheck.py);
# 4. runs the benchmark at V=1e7, D=128, B=2**20 (float32), uniform and Zipf ids, against
#    torch on the same GPU, with the per-piece breakdown (BENCH_ARGS adds arguments to
#    both runs).
# Each step runs under a time limit (TEST_TIMEOUT / BENCH_TIMEOUT seconds), so a hung
# kernel cannot eat a lease.
# Logs and bench_gpu_{uniform,zipf}.json land in $OUT (8 files). The exit status is the
# tests' and memcheck's (0: all passed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

echo "== machine"
nvidia-smi -L || echo "nvidia-smi not found"
$PY --version

echo "== CuPy"
if ! $PY -c "import cupy" 2>/dev/null; then
    if [ -d wheels ]; then
        $PY -m pip install --no-index --find-links wheels cupy-cuda12x || $PY -m pip install --no-index --find-links wheels cupy-cuda13x
    else
        $PY -m pip install --retries 0 --timeout 10 "cupy-cuda12x>=13"
    fi
fi
$PY -c "import cupy; print('cupy', cupy.__version__, 'devices:', cupy.cuda.runtime.getDeviceCount())" \
    || { echo "CuPy is not usable here: nothing to check"; exit 2; }

echo "== build"
$PY setup.py build_ext --inplace -j "$(nproc 2>/dev/null || echo 4)" > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; echo "build failed"; exit 3; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import sparsembed as se, sparsembed._cuda as c; print(se.show_config()); print('cupy_available:', c.cupy_available())"

echo "== GPU tests"
timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rfE --tb=short 2>&1 \
    | tee "$OUT/test_gpu.log"
status=${PIPESTATUS[0]}
echo "== CPU-side GPU tests"
timeout "${TEST_TIMEOUT:-300}" $PY -m pytest tests/test_gpu_cpu_side.py -q -p no:cacheprovider -rfE --tb=short 2>&1 \
    | tee "$OUT/test_gpu_cpu_side.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== memcheck (the kernels' error paths under compute-sanitizer)"
if command -v compute-sanitizer > /dev/null; then
    timeout "${TEST_TIMEOUT:-300}" compute-sanitizer --tool memcheck --error-exitcode 9 \
        $PY benchmarks/gpu_memcheck.py > "$OUT/memcheck.log" 2>&1
    mc=$?
    tail -5 "$OUT/memcheck.log"
    [ "$mc" -eq 0 ] || { echo "memcheck failed ($mc)"; status=1; }
else
    echo "compute-sanitizer not found: skipped"
fi

echo "== benchmark"
for dist in uniform zipf; do
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-240}" $PY benchmarks/bench_gpu.py --dist $dist --breakdown ${BENCH_ARGS:-} \
        --json "$OUT/bench_gpu_$dist.json" 2>&1 | tee "$OUT/bench_gpu_$dist.txt"
done
exit "$status"
