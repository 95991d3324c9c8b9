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

echo "=== binding-level CUDA checks (also where isagellm-protocol cannot import: it ships 3.11 bytecode)"
PYTHONPATH=/tmp/pkg/sagellm_kv_cache python3 - <<'PY'
import time, numpy as np
import _core  # the binding module alone
try:
    import torch
except ImportError:
    torch = None

class View:  # the package's LayerView, reduced to the DLPack protocol
    def __init__(self, pool, layer, value):
        self.pool, self.layer, self.value = pool, layer, value
    def __dlpack__(self, **_):
        return self.pool.dlpack_capsule(self.layer, self.value)
    def __dlpack_device__(self):
        return self.pool.dlpack_device()

pool = _core.PagedKVPool(2, 4, 64, "bf16", 16, 32, "cuda:0")
ids = pool.allocate(2)
if torch is not None:
    t = torch.from_dlpack(View(pool, 1, True))
    assert t.is_cuda and t.dtype == torch.bfloat16 and tuple(t.shape) == (32, 16, 4, 64), (t.device, t.dtype, t.shape)
    t[int(ids[1])].fill_(2.0)
    torch.cuda.synchronize()
    staged = pool.gather(ids).view(np.uint16)
    per = 16 * 4 * 64
    assert (staged[staged.size // 2 + 3 * per: staged.size // 2 + 4 * per] == 0x4000).all()
    del pool
    t.add_(1.0); torch.cuda.synchronize()
    assert float(t[int(ids[1])].float().mean()) == 3.0
    print("torch.from_dlpack on a cuda:0 bf16 pool: ok (writes visible to gather; view outlives the pool)")

pool = _core.PagedKVPool(4, 8, 128, "fp16", 16, 2048, "cuda:0")
ids = np.random.default_rng(0).permutation(2048)[:1000].astype(np.int32)
buf = np.empty(1000 * pool.block_nbytes, dtype=np.uint8)
buf[:] = np.random.default_rng(1).integers(0, 255, buf.size, dtype=np.uint8)
pool.scatter(buf, ids)
back = np.empty_like(buf)
pool.gather_into(ids, back)
assert np.array_equal(buf, back), "cuda gather/scatter round trip differs"
print("cuda gather/scatter round trip of", buf.nbytes >> 20, "MiB: byte-exact")
src = np.ones_like(buf)
for name, fn in (("gather", lambda: pool.gather_into(ids, back)), ("scatter", lambda: pool.scatter(buf, ids)),
                 ("host memcpy", lambda: np.copyto(back, src))):
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
    print(f"{name}: {buf.nbytes / best / 1e9:.2f} GB/s ({best * 1e3:.1f} ms)")
try:
    _core.PagedKVPool(1, 1, 8, "fp16", 16, 4, "cuda:7")
except Exception as e:
    print("cuda:7 ->", type(e).__name__, e)
PY

echo "=== vLLM tier's GPU copy path (ChunkCopier: streams, events, pinned slots); needs torch with CUDA"
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  python3 -m pytest tests/python/test_chunk_copies.py -q -p no:cacheprovider -o filterwarnings= -rA 2>&1 | tail -6
  # transfers between two processes' CUDA pools (pinned staging); needs isagellm-comm's gloo
  python3 -m pytest tests/python/test_transfer_multiprocess.py -q -p no:cacheprovider -o filterwarnings= -m cuda -rA 2>&1 | tail -4
  (cd benchmarks && python3 w9_gpu_copies.py --blocks 512 --bpc 1,16 --repeats 5) 2>&1 | tail -8
else
  echo "skipped: torch with CUDA is not importable here"
fi
