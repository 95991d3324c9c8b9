"""The README's Python snippets that run on their own, run as written (from a scratch directory)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet(containing: str) -> str:
    """The README's ```python block holding ``containing``."""
    text = README.read_text()
    at = text.index(containing)
    start = text.rindex("```python\n", 0, at) + len("```python\n")
    return text[start : text.index("```", at)]


def run(code: str, where: Path) -> str:
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(where)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    return out.getvalue()


def test_tiered_prefix_cache_snippet_serves_its_second_request_from_device_and_host(tmp_path: Path) -> None:
    printed = run(snippet("from sagellm_kv_cache.tiers import TieredPrefixCache"), tmp_path).splitlines()
    # As the snippet's comment says: nothing cached, then all 10 blocks, 8 kept on the device and the
    # 2 that were demoted to the host tier promoted back.
    assert printed == ["0 []", "10 [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]"]
