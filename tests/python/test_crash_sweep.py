"""Crashes found by a sweep of the public Python API, each run in a fresh interpreter so that a
regression shows as a failed test with its signal, not as a dead test run.

* OffloadIndex calls read the caller's key list while they allocate Python objects; a garbage
  collection triggered there runs finalizers, and one that cleared or refilled the list freed the
  array the call was reading (SIGSEGV).
* ``_core.uuid4`` / ``_core.trusted_model`` (and the seed KVPool's native side) made instances with
  object.__new__ of any class: ``type``, ``numpy.ndarray`` or an exception class gave an object
  whose deallocator crashed (SIGSEGV / SIGABRT).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_isolated(body: str, timeout: float = 60.0) -> str:
    """Runs ``body`` in a fresh interpreter; fails the test on a non-zero exit (a crash included)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"subprocess exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


# A gc callback (Python code run inside any collection) replaces the key list's contents at the
# n-th collection after the call starts; gc.set_threshold(1) makes every allocation of a tracked
# object collect. Whatever collection hits inside the call, it must answer for the keys it was given.
OFFLOAD_GC = """
import gc, sys
from sagellm_kv_cache import _core

def attempt(n, method):
    idx = _core.OffloadIndex(8)
    pre = [b"pre%05d" % i for i in range(8)]
    idx.prepare_store(pre)
    idx.complete_store(pre)
    keys = [b"key%05d" % i for i in range(6)]
    state = {"count": 0, "armed": False}
    junk = []
    def callback(phase, info):
        if phase != "start" or not state["armed"]:
            return
        state["count"] += 1
        if state["count"] == n:
            keys.clear()
            junk.append([b"junk%07d" % i for i in range(3000)])
            keys.extend(b"new%07d" % i for i in range(3000))
    gc.callbacks.append(callback)
    gc.set_threshold(1)
    hold = [[] for _ in range(300)], [(i, i) for i in range(300)]  # empty the list and tuple free lists
    state["armed"] = True
    try:
        if method == "store":
            out = idx.prepare_store(keys)
        elif method == "load":
            out = idx.prepare_load(list(pre))
        elif method == "touch":
            out = idx.touch(list(pre))
        else:
            out = idx.complete_store(list(pre))
    finally:
        state["armed"] = False
        gc.set_threshold(700)
        gc.callbacks.remove(callback)
    del hold
    idx.check_invariants()
    return out

for n in (1, 2, 3):
    for method in ("store", "load", "touch", "complete"):
        out = attempt(n, method)
        if method == "store" and out is not None:
            assert list(out[0]) == [b"key%05d" % i for i in range(6)], out
print("ok")
"""


def test_offload_index_survives_a_gc_that_rewrites_the_key_list() -> None:
    assert run_isolated(OFFLOAD_GC).strip().endswith("ok")


def test_offload_index_takes_any_iterable_of_keys() -> None:
    from sagellm_kv_cache import _core

    idx = _core.OffloadIndex(4)
    out = idx.prepare_store(iter([b"a", b"b"]))
    assert list(out[0]) == [b"a", b"b"]
    assert idx.complete_store((b"a", b"b")) == [b"a", b"b"]
    idx.touch({b"a"})
    with pytest.raises(TypeError, match="collection of bytes"):
        idx.prepare_store(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at position 1"):
        idx.prepare_store([b"c", "d"])  # type: ignore[list-item]
    idx.check_invariants()


OBJECT_NEW = """
import numpy as np, uuid
from sagellm_kv_cache import _core
bad = [type, np.ndarray, BaseException, ValueError, int, dict, list, tuple, str, bytes,
       type("WithNew", (), {"__new__": lambda cls: object.__new__(cls)})]
for cls in bad:
    for call in (lambda: _core.uuid4(cls, None), lambda: _core.trusted_model(cls, {}, (), (), set(), {})):
        try:
            call()
        except TypeError as e:
            assert "object.__new__" in str(e), e
        else:
            raise AssertionError(f"{cls} accepted")
assert isinstance(_core.uuid4(uuid.UUID, uuid.SafeUUID.unknown), uuid.UUID)
print("ok")
"""


def test_object_new_is_refused_for_classes_that_have_their_own() -> None:
    assert run_isolated(OBJECT_NEW).strip().endswith("ok")


def test_seed_pool_refuses_classes_object_new_cannot_make() -> None:
    import uuid

    from sagellm_kv_cache import _core
    from sagellm_kv_cache.models.kv_handle import KVHandle

    def make(cls: type, uuid_cls: type) -> object:
        return _core.SeedPool(
            64, 16, None, cls=cls, defaults={}, names=(), fields_set=set(), fallback=None, uuid_cls=uuid_cls,
            uuid_safe=None, free_state=None, dtypes={}, layouts={}, devices={}, normalize=None, refusal=None,
        )

    with pytest.raises(TypeError, match="uuid_cls"):
        make(KVHandle, BaseException)
    with pytest.raises(TypeError, match="cls"):
        make(type, uuid.UUID)
    make(KVHandle, uuid.UUID)  # what KVPool passes
