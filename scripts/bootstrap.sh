#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine with Python 3.11, skipping
# whatever is already there. Sourced by scripts/test.sh and scripts/run.sh.
set -euo pipefail

PYTHON=${PYTHON:-python3}

need_apt=()
[ -f /usr/include/openssl/evp.h ] || need_apt+=(libssl-dev)
[ -f /usr/include/xxhash.h ] || need_apt+=(libxxhash-dev)
if [ "${SAGELLM_KV_NEED_GTEST:-0}" = 1 ]; then
  [ -d /usr/include/gtest ] || need_apt+=(libgtest-dev)
fi
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

pip_quiet() { "$PYTHON" -m pip install -q --disable-pip-version-check "$@"; }
"$PYTHON" -c "import cmake, ninja" 2>/dev/null || pip_quiet cmake ninja
# torch first and pinned, so nothing later can pull a CUDA build through a dependency.
if [ "${SAGELLM_KV_WITH_TORCH:-1}" = 1 ]; then
  "$PYTHON" -c "import torch" 2>/dev/null || pip_quiet "torch==2.13.0"
fi
