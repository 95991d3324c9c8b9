#!/usr/bin/env bash
# GPU check, run on a machine with an NVIDIA GPU: builds the core, its tests and the Python module
# with the machine's own toolchain, runs the CUDA allocator/pool tests (C++ and Python), and times
# gather/scatter of a CUDA pool. Optional inputs in .devdeps/ (headers, static libs and wheels for a
# machine without apt access): include/{openssl,gtest}, lib/{libgtest*.a,libcrypto.so.3}, whl/*.whl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
D=$PWD/.devdeps
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# The CUDA runtime is dlopen'ed: make sure the loader can find one (toolkit or pip wheel).
if ! ldconfig -p | grep -q 'libcudart.so'; then
  cudart=$(ls /usr/local/cuda*/lib64/libcudart.so* /usr/local/cuda*/targets/*/lib/libcudart.so* 2>/dev/null | head -1)
  [ -n "$cudart" ] || cudart=$(python3 -c "import glob, nvidia, os; print((glob.glob(os.path.join(list(nvidia.__path__)[0], '**', 'libcudart.so*'), recursive=True) or [''])[0])" 2>/dev/null)
  [ -n "$cudart" ] && export SAGELLM_KV_CUDART=$cudart
fi
echo "cuda runtime: ${SAGELLM_KV_CUDART:-from the loader path}"

extra=()
if [ ! -f /usr/include/openssl/evp.h ] && [ -d "$D/include/openssl" ]; then
  mkdir -p /tmp/ossl/lib && cp "$D/lib/libcrypto.so.3" /tmp/ossl/lib/ && ln -sf libcrypto.so.3 /tmp/ossl/lib/libcrypto.so
  ls /usr/lib/x86_64-linux-gnu/libcrypto.so.3 >/dev/null 2>&1 || export LD_LIBRARY_PATH=/tmp/ossl/lib
  extra+=(-DOPENSSL_INCLUDE_DIR="$D/include" -DOPENSSL_CRYPTO_LIBRARY=/tmp/ossl/lib/libcrypto.so)
fi
[ -d /usr/include/gtest ] || extra+=(-DGTEST_ROOT="$D")

cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DSAGELLM_KV_BUILD_TESTS=ON -DSAGELLM_KV_BUILD_PYTHON=ON \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" "${extra[@]}" > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
ninja -C /tmp/b > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "=== ctest (all, CUDA ones included)"
ctest --test-dir /tmp/b --output-on-failure 2>&1 | tail -15
/tmp/b/tests/cpp/device_test --gtest_filter='Cuda*' 2>&1 | tail -4
/tmp/b/tests/cpp/kv_pool_test --gtest_filter='*Cuda*' 2>&1 | tail -4

echo "=== pytest -m cuda"
if [ -d "$D/whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --ignore-requires-python --target /tmp/site "$D"/whl/*.whl && export PYTHONPATH=/tmp/site
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r python/sagellm_kv_cache /tmp/pkg/ && cp /tmp/b/cpp/bindings/_core*.so /tmp/pkg/sagellm_kv_cache/
export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
python3 -m pytest tests/python/test_paged_pool.py -q -p no:cacheprovider -o filterwarnings= -m cuda -rA 2>&1 | tail -8

echo "=== CUDA pool gather/scatter timing (1,000 blocks of 256 KiB, device -> pageable host)"
python3 - <<'PY'
import time, numpy as np
from sagellm_kv_cache import KVCacheSpec, PagedKVPool
spec = KVCacheSpec(num_layers=4, num_kv_heads=8, head_dim=128, dtype="fp16", block_size=16)
pool = PagedKVPool(spec, num_blocks=2048, device="cuda:0")
ids = np.random.default_rng(0).permutation(2048)[:1000].astype(np.int32)
buf = np.empty(1000 * pool.block_nbytes, dtype=np.uint8)
pool.gather_into(ids, buf)
for name, fn in (("gather", lambda: pool.gather_into(ids, buf)), ("scatter", lambda: pool.scatter(buf, ids))):
    best = min((lambda t0: (fn(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(5))
    print(f"cuda {name}: {buf.nbytes / best / 1e9:.2f} GB/s ({best * 1e3:.1f} ms for {buf.nbytes >> 20} MiB)")
PY
