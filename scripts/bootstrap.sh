#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine with Python 3.11, skipping
# whatever is already there. Sourced by scripts/test.sh and scripts/run.sh (from the repository root).
#
# An interpreter that pip may not install into (Debian's own python3 is "externally managed", PEP 668)
# is replaced by a venv made from it, build/venv (SAGELLM_KV_VENV names another): PYTHON and PATH then
# point into that venv for the rest of the calling script.
set -euo pipefail

PYTHON=${PYTHON:-python3}

externally_managed() {
  "$1" - <<'PY'
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.isfile(marker) else 1)
PY
}
use_venv=0
externally_managed "$PYTHON" && use_venv=1

need_apt=()
[ -f /usr/include/openssl/evp.h ] || need_apt+=(libssl-dev)
[ -f /usr/include/xxhash.h ] || need_apt+=(libxxhash-dev)
if [ "${SAGELLM_KV_NEED_GTEST:-0}" = 1 ]; then
  [ -d /usr/include/gtest ] || need_apt+=(libgtest-dev)
fi
command -v g++ >/dev/null || need_apt+=(g++)
# Python.h for the extension module (Debian: python3-dev); venv with pip for an externally managed python.
"$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need_apt+=(python3-dev)
if [ "$use_venv" = 1 ] && ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if [ "$use_venv" = 1 ]; then
  venv=$(realpath -m "${SAGELLM_KV_VENV:-build/venv}")  # absolute: run.sh goes back to the caller's directory
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  echo "bootstrap: $PYTHON is externally managed (PEP 668): installing into the venv $venv" \
       "(. $venv/bin/activate puts sagellm-kv and sage-kv-stats on the PATH)"
  PYTHON=$venv/bin/python
  PATH=$venv/bin:$PATH
  export PYTHON PATH
fi

pip_quiet() { "$PYTHON" -m pip install -q --disable-pip-version-check "$@"; }
"$PYTHON" -c "import cmake, ninja" 2>/dev/null || pip_quiet cmake ninja
# torch first and pinned, so nothing later can pull a CUDA build through a dependency. PyPI's Linux
# torch is the CUDA build (it requires the nvidia-* wheels); the CPU build comes from PyTorch's own index.
SAGELLM_KV_TORCH_INDEX=${SAGELLM_KV_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if [ "${SAGELLM_KV_WITH_TORCH:-1}" = 1 ]; then
  "$PYTHON" -c "import torch" 2>/dev/null || pip_quiet "torch==2.13.0" --index-url "$SAGELLM_KV_TORCH_INDEX"
fi
