#!/usr/bin/env bash
# The main job: install the package (if needed) and replay the embedded sample workload through the
# real C++ prefix cache and pool on the CPU. Extra arguments go to `sagellm-kv replay`; relative paths
# in them (traces, --json, --plot, --disk-dir) are taken from the directory the script is run from.
# Usage: bash scripts/run.sh [TRACE ...] [--capacity-blocks 1000,10000,inf] [--json out.json] [--plot out.png]
set -euo pipefail
PYTHON=${PYTHON:-python3}
case $PYTHON in */*) PYTHON=$(realpath -s "$PYTHON") ;; esac  # a path relative to the caller's directory
here=$PWD
cd "$(dirname "$0")/.."
SAGELLM_KV_WITH_TORCH=0
. scripts/bootstrap.sh  # may switch PYTHON to a venv (an externally managed python3)
"$PYTHON" -c "import sagellm_kv_cache._core" 2>/dev/null || "$PYTHON" -m pip install -q --disable-pip-version-check ".[visualization]"
cd "$here"
exec "$PYTHON" -m sagellm_kv_cache.replay_cli replay "$@"
