"""scripts/bootstrap.sh on a fresh Debian machine: its own python3 is externally managed (PEP 668)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"

_EXTERNALLY_MANAGED = """
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
include = os.path.join(sysconfig.get_paths()["include"], "Python.h")
import ensurepip  # python3-venv
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.isfile(marker) and os.path.isfile(include) else 1)
"""


def _system_python_is_externally_managed_and_complete() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    proc = subprocess.run([SYSTEM_PYTHON, "-c", _EXTERNALLY_MANAGED], capture_output=True, timeout=60)
    return proc.returncode == 0


@pytest.mark.slow
def test_bootstrap_installs_into_a_venv_when_the_python_is_externally_managed(tmp_path: Path) -> None:
    if not _system_python_is_externally_managed_and_complete():
        pytest.skip(f"{SYSTEM_PYTHON} is not an externally managed python with headers and venv")
    if not (all(Path(h).exists() for h in ("/usr/include/openssl/evp.h", "/usr/include/xxhash.h"))
            and shutil.which("g++")):
        pytest.skip("scripts/bootstrap.sh would run apt-get on this machine")
    venv = tmp_path / "venv"
    env = {**os.environ, "PYTHON": SYSTEM_PYTHON, "SAGELLM_KV_VENV": str(venv)}
    env.pop("VIRTUAL_ENV", None)
    script = ("set -euo pipefail; SAGELLM_KV_WITH_TORCH=0; . scripts/bootstrap.sh; "
              'echo "PYTHON=$PYTHON"; echo "CMAKE=$(command -v cmake)"')
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert f"PYTHON={venv}/bin/python" in lines
    assert f"CMAKE={venv}/bin/cmake" in lines  # what the presets in scripts/test.sh run
    assert any("externally managed" in line and str(venv) in line for line in lines)
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import cmake, ninja, sys; print(sys.prefix)"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.strip() == str(venv), check.stderr
