#!/usr/bin/env bash
# Runs every test: lint, C++ (plain, ASan+UBSan, TSan stress), the native consumer example,
# pytest against the installed package, the sageLLM engine end to end on it (tests/integration),
# and a smoke test of the wheel in a clean venv.
# Usage: bash scripts/test.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS

step() { printf '\n=== %s\n' "$*"; }

step "bootstrap"
SAGELLM_KV_NEED_GTEST=1
. scripts/bootstrap.sh  # may switch PYTHON (and PATH) to a venv (an externally managed python3)

step "install the package with its dev extra"
"$PYTHON" -m pip install -q --disable-pip-version-check ".[dev]"

step "lint: ruff + mypy"
"$PYTHON" -m ruff check .
"$PYTHON" -m mypy

for preset in dev asan tsan; do
  step "C++ build + ctest: $preset"
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset"
  ctest --preset "$preset"
done

step "native consumer: install the core, find_package it, run the example"
prefix=$(mktemp -d)
cmake --install build/dev --prefix "$prefix" --component dev >/dev/null
cmake -S examples/native -B build/native-example -G Ninja -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build build/native-example
./build/native-example/native_example
rm -rf "$prefix"

step "pytest"
"$PYTHON" -m pytest tests/python -q -p no:cacheprovider

step "engine integration: the sageLLM engine (isagellm-core, pinned) on this package"
# Our version (0.5.5.x) satisfies the engine's isagellm-kv-cache>=0.5.4.1,<0.6, so pip keeps the
# build installed above; torch is already the pinned CPU build, so no CUDA wheels are pulled.
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q --disable-pip-version-check "torch==2.13.0" \
  --index-url "$SAGELLM_KV_TORCH_INDEX"
"$PYTHON" -m pip install -q --disable-pip-version-check "isagellm-core==0.5.4.26"
"$PYTHON" - <<'PY'
from importlib import metadata
import sagellm_kv_cache
from sagellm_kv_cache import _core  # the C++ build, not the pure-Python original
assert metadata.version("isagellm-kv-cache") == sagellm_kv_cache.__version__ == _core.__version__
nvidia = sorted(d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
assert not nvidia, f"CUDA packages were pulled in: {nvidia}"
print("engine", metadata.version("isagellm-core"), "on isagellm-kv-cache", sagellm_kv_cache.__version__)
PY
SAGELLM_KV_REQUIRE_ENGINE=1 "$PYTHON" -m pytest tests/integration -q -p no:cacheprovider

# --- KV events against NVIDIA Dynamo's standalone KV indexer -----------------------------------------
# ai-dynamo-runtime (a 75 MB wheel, ~40 s to install) pins pydantic<=2.13.5, so it gets its own venv
# instead of the test environment; the test starts `python -m dynamo.indexer` from there.
step "KV events: NVIDIA Dynamo's indexer reproduces the prefix cache's matches"
dynamo_venv=build/dynamo-venv
if ! "$dynamo_venv/bin/python" -c 'import importlib.metadata as m, dynamo.indexer
assert m.version("ai-dynamo-runtime") == "1.6.1"' 2>/dev/null; then
  rm -rf "$dynamo_venv"
  "$PYTHON" -m venv "$dynamo_venv"
  "$dynamo_venv/bin/pip" install -q --disable-pip-version-check ai-dynamo-runtime==1.6.1
fi
SAGELLM_KV_DYNAMO_PYTHON="$PWD/$dynamo_venv/bin/python" SAGELLM_KV_REQUIRE_DYNAMO=1 \
  "$PYTHON" -m pytest tests/python/test_kv_events_routers.py -q -p no:cacheprovider -k dynamo
# --- end of the Dynamo block ------------------------------------------------------------------------

# --- the seed API against the original isagellm-kv-cache, call by call ---------------------------------
# The original imports only pydantic and isagellm-protocol (its backend and comm dependencies, and
# their torch, are never imported), so it gets a small venv of its own with --no-deps: nothing there
# can replace this build in the test environment. The test runs the same seeded calls under both.
step "seed API: the same random calls on the original isagellm-kv-cache 0.5.4.15 and on this package"
original_venv=build/original-venv
if ! "$original_venv/bin/python" -c 'import importlib.metadata as m
assert m.version("isagellm-kv-cache") == "0.5.4.15"' 2>/dev/null; then
  rm -rf "$original_venv"
  "$PYTHON" -m venv "$original_venv"
  "$original_venv/bin/pip" install -q --disable-pip-version-check "pydantic>=2"
  "$original_venv/bin/pip" install -q --disable-pip-version-check --no-deps isagellm-kv-cache==0.5.4.15 \
    isagellm-protocol==0.5.4.16
fi
SAGELLM_KV_ORIGINAL_PYTHON="$PWD/$original_venv/bin/python" SAGELLM_KV_REQUIRE_ORIGINAL=1 \
  "$PYTHON" -m pytest tests/python/test_seed_diff.py -q -p no:cacheprovider
# --- end of the original block -----------------------------------------------------------------------

# --- vLLM 0.33.0 OffloadingSpec against vLLM's real scheduler and connector --------------------------
# vLLM goes into a venv of its own that sees this environment's packages (torch 2.13.0 CPU, this
# package) and adds vLLM without its CUDA dependencies (--no-deps) plus the pure-Python modules its
# scheduler, KV-offload and connector code import; transformers is held in vLLM's range there.
step "vLLM 0.33.0: our prefix trie and host pool as its KV offloading tier (real Scheduler + OffloadingConnector)"
vllm_venv=build/vllm-venv
if ! "$vllm_venv/bin/python" -c 'import importlib.metadata as m; assert m.version("vllm") == "0.33.0"' 2>/dev/null; then
  rm -rf "$vllm_venv"
  "$PYTHON" -m venv --system-site-packages "$vllm_venv"
  # A venv's --system-site-packages are its base interpreter's; when PYTHON is itself a venv, its
  # packages (torch, this package) come in through a .pth file, ahead of the base interpreter's.
  "$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
    > "$("$vllm_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_sagellm_kv_parent.pth"
  vpip() { "$vllm_venv/bin/pip" install -q --disable-pip-version-check "$@"; }
  vpip --no-deps vllm==0.33.0 xgrammar==0.2.8 apache-tvm-ffi
  vpip msgspec pydantic cachetools cloudpickle blake3 psutil pyzmq regex "transformers>=5.16.1,<5.21" pyyaml \
    requests tqdm py-cpuinfo cbor2 aiohttp openai-harmony openai pybase64 uvloop fastapi partial-json-parser \
    llguidance einops prometheus_client pillow
fi
"$vllm_venv/bin/python" - <<'PY'
from importlib import metadata
nvidia = sorted(d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].lower().startswith(("nvidia-", "triton")))
assert not nvidia, f"CUDA packages were pulled in: {nvidia}"
assert metadata.version("torch").startswith("2.13.0"), metadata.version("torch")
PY
VLLM_TARGET_DEVICE=cpu SAGELLM_KV_REQUIRE_VLLM=1 "$vllm_venv/bin/python" -m pytest tests/python/test_vllm_offload.py -q -p no:cacheprovider
# --- end of the vLLM block ---------------------------------------------------------------------------

step "examples (run from a scratch directory, as a user would)"
scratch=$(mktemp -d)
for example in "$PWD"/examples/*.py; do
  echo "--- $example"
  (cd "$scratch" && "$PYTHON" "$example" >/dev/null)
done
rm -rf "$scratch"

step "wheel smoke test in a clean venv"
wheeldir=$(mktemp -d)
"$PYTHON" -m pip wheel -q --no-deps -w "$wheeldir" .
venv=$(mktemp -d)
"$PYTHON" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$wheeldir"/*.whl
(cd "$venv" && "$venv/bin/python" - <<'PY'
import sagellm_kv_cache as kv
spec = kv.KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="fp16", block_size=16)
pool = kv.PagedKVPool(spec, num_blocks=64)
ids = pool.allocate(4)
pool.key_cache(0)[ids] = 1.0
assert pool.gather(ids).nbytes == 4 * pool.block_nbytes
pool.free(ids)
print("wheel ok:", kv.__version__, pool)
PY
)
unzip -l "$wheeldir"/*.whl | grep -E '\.(a|hpp)$' && { echo "wheel ships headers or static libraries"; exit 1; }
rm -rf "$wheeldir" "$venv"

step "all tests passed"
