"""Crashes found by a sweep of the public Python API, each run in a fresh interpreter so that a
regression shows as a failed test with its signal, not as a dead test run.

* OffloadIndex calls read the caller's key list while they allocate Python objects; a garbage
  collection triggered there runs finalizers, and one that cleared or refilled the list freed the
  array the call was reading (SIGSEGV).
* ``_core.uuid4`` / ``_core.trusted_model`` (and the seed KVPool's native side) made instances with
  object.__new__ of any class: ``type``, ``numpy.ndarray`` or an exception class gave an object
  whose deallocator crashed (SIGSEGV / SIGABRT).
* Calls that read or write a caller's numpy array with the GIL released (gather_into, scatter, the
  summed variants, segment_sums, block_checksum, block_tables' ``out``): another thread's
  ``ndarray.resize(refcheck=False)`` freed the memory under them (SIGSEGV).
* The first call that used numpy's C API initialised pybind11's view of it there, running Python
  code under a once-only lock; a signal handler or profile hook that called the module again from
  that code hung the process.
* The seed PrefixCache's "nested call gets a RuntimeError" promise had windows (lock taken, holder not
  yet recorded; holder cleared, lock not yet released) where a signal handler's call waited for its
  own thread forever.
* The seed PrefixCache's insert_objects and compute_block_hashes sliced the caller's list (blocks,
  token ids); a finaliser run by the slice's allocation that emptied the list made CPython read its
  freed item array (SIGSEGV).
* ``_core.PrefixCache.__new__(_core.PrefixCache)`` (any bound class) gave an instance whose C++ value
  was never constructed; pybind11 ran methods on raw storage: garbage from ``num_layers``, SIGSEGV
  from ``len()``.
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


# Shared by the scripts below: a gc callback (Python code run inside any collection) runs ``action``
# at the start of the n-th collection after ``call`` starts; gc.set_threshold(1) makes every
# allocation of a tracked object collect, and the list and tuple free lists are emptied first, so
# that each such allocation is a fresh one. Returns (call's result, or the ``refusal`` exception it
# raised when one is named; whether action ran).
GC_AT_NTH = """
import gc

def call_with_gc_at(n, action, call, refusal=()):
    state = {"count": 0, "armed": False, "ran": False}
    def callback(phase, info):
        if phase != "start" or not state["armed"]:
            return
        state["count"] += 1
        if state["count"] == n:
            action()
            state["ran"] = True
    gc.callbacks.append(callback)
    gc.set_threshold(1)
    hold = [[] for _ in range(300)], [(i, i) for i in range(300)]  # empty the list and tuple free lists
    state["armed"] = True
    try:
        out = call()
    except refusal as e:
        out = e
    finally:
        state["armed"] = False
        gc.set_threshold(700)
        gc.callbacks.remove(callback)
    del hold
    return out, state["ran"]
"""


# A gc callback (Python code run inside any collection) replaces the key list's contents at the
# n-th collection after the call starts; gc.set_threshold(1) makes every allocation of a tracked
# object collect. Whatever collection hits inside the call, it must answer for the keys it was given.
OFFLOAD_GC = GC_AT_NTH + """
from sagellm_kv_cache import _core

def attempt(n, method):
    idx = _core.OffloadIndex(8)
    pre = [b"pre%05d" % i for i in range(8)]
    idx.prepare_store(pre)
    idx.complete_store(pre)
    keys = [b"key%05d" % i for i in range(6)]
    junk = []
    def rewrite():
        keys.clear()
        junk.append([b"junk%07d" % i for i in range(3000)])
        keys.extend(b"new%07d" % i for i in range(3000))
    calls = {"store": lambda: idx.prepare_store(keys), "load": lambda: idx.prepare_load(list(pre)),
             "touch": lambda: idx.touch(list(pre)), "complete": lambda: idx.complete_store(list(pre))}
    out, _ = call_with_gc_at(n, rewrite, calls[method])
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


# Every method and property of every bound class, on an instance made by __new__ alone: the right
# number of placeholder arguments gets past pybind11's count check, so the instance is what refuses
# (a method that takes the instance's shared_ptr cannot name the class; the others do).
BARE_INSTANCES = """
import inspect
from sagellm_kv_cache import _core
classes = [c for c in vars(_core).values() if isinstance(c, type) and type(c).__name__.startswith("pybind11")]
assert len(classes) >= 7, classes
for cls in classes:
    bare = cls.__new__(cls)
    for name in dir(cls):
        if name.startswith("__") and name not in ("__len__", "__contains__"):
            continue
        if name == "_pybind11_conduit_v1_" or "static" in type(inspect.getattr_static(cls, name)).__name__:
            continue  # a static property or method needs no instance
        for nargs in range(8):
            try:
                attr = getattr(bare, name)
                if not callable(attr):
                    raise AssertionError(f"{cls.__name__}.{name} read {attr!r} from an unconstructed instance")
                attr(*([0] * nargs))
            except TypeError as e:
                if "incompatible function arguments" in str(e):
                    continue
                assert "object was made without running __init__" in str(e), (cls.__name__, name, e)
                break
            raise AssertionError(f"{cls.__name__}.{name} ran on an unconstructed instance")
        else:
            raise AssertionError(f"{cls.__name__}.{name}: no argument count reached the instance")
try:
    _core.PrefixCache.__new__(_core.PrefixCache).__len__()
except TypeError as e:
    assert str(e).startswith("PrefixCache object was made without running __init__"), e
late = _core.BlockAllocator.__new__(_core.BlockAllocator)
late.__init__(4)  # __init__ on a bare instance still builds it
assert late.num_blocks == 4 and len(late.allocate(2)) == 2
print("ok")
"""


def test_methods_of_an_instance_whose_init_never_ran_are_refused() -> None:
    assert run_isolated(BARE_INSTANCES).strip().endswith("ok")


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


# ndarray.resize(refcheck=False) reallocates an array whatever buffers it exported: a call writing
# into (or reading from) the caller's array without the GIL would touch freed memory. Each call
# must either work on the array as it was or make the resize fail (numpy's ValueError). (Resizing
# the base of a live view frees the view's memory whatever anyone does: numpy's own hazard, not run.)
RESIZE_RACE = """
import threading, time
import numpy as np
from sagellm_kv_cache import _core

pool = _core.PagedKVPool(2, 8, 128, "fp32", 16, 128)
ids = pool.allocate(64)
nbytes = pool.block_nbytes * 64
arr = np.zeros(nbytes, np.uint8)
sums = np.zeros(nbytes // _core.SEGMENT_BYTES, np.uint64)
view = np.zeros(nbytes + 64, np.uint8)[64:]  # a view: its base is guarded (only the view is resized, refused)
mv_base = np.zeros(nbytes, np.uint8)
rm = _core.RequestManager(pool)
for r in range(40):
    rm.admit(r, [1, 2, 3])
table = np.zeros((40, 4), np.int32)
stop = threading.Event()
refused = [0]

def resizer():
    while not stop.is_set():
        for a, n in ((arr, nbytes), (sums, sums.size), (view, nbytes), (mv_base, nbytes), (table, 160)):
            try:
                a.resize(16, refcheck=False)  # a large array's pages are unmapped here
            except ValueError:
                refused[0] += 1
                continue
            time.sleep(0.0005)  # the window a call that was already running would write into
            a.resize(n, refcheck=False)
        try:
            table.shape = (40, 4)
        except (ValueError, AttributeError):
            pass

t = threading.Thread(target=resizer, daemon=True)
t.start()
calls = [
    lambda: pool.gather_into(ids, arr),
    lambda: pool.scatter(arr, ids),
    lambda: pool.gather_summed(ids, arr, sums),
    lambda: pool.scatter_summed(arr, ids, sums),
    lambda: _core.segment_sums(arr, sums),
    lambda: pool.gather_into(ids, view),
    lambda: pool.scatter(memoryview(mv_base), ids),
    lambda: _core.block_checksum(arr),
    lambda: rm.block_tables(list(range(40)), table),
]
deadline = time.monotonic() + 1.5
n = 0
while time.monotonic() < deadline:
    for call in calls:
        try:
            call()
        except (ValueError, TypeError):
            pass  # the array was short at the time: a typed error
        n += 1
stop.set()
t.join()
print("ok", n, refused[0])
"""


def test_buffers_resized_by_another_thread_during_a_call() -> None:
    assert run_isolated(RESIZE_RACE).strip().startswith("ok")


# The module's first use of numpy's C API ran numpy's version check (Python code) inside pybind11's
# once-only initialiser; a profile hook (or a signal handler, a finaliser) run by that code calling
# back into the module waited on the initialiser its own thread was in: a hang. Now done at import.
FIRST_NUMPY_USE = """
import sys
import numpy as np
from sagellm_kv_cache import _core
cache = _core.PrefixCache(block_size=4)
state = {"armed": False, "calls": 0}
def hook(frame, event, arg):
    if event == "call" and state["armed"]:
        state["armed"] = False
        state["calls"] += 1
        cache.match(np.zeros((1, 32), np.uint8))
sys.setprofile(hook)
state["armed"] = True
cache.match(np.zeros((1, 32), np.uint8))  # the first call that reads a numpy array
sys.setprofile(None)
print("ok", state["calls"])
"""


def test_first_numpy_use_reentered_from_a_hook_does_not_hang() -> None:
    try:
        out = run_isolated(FIRST_NUMPY_USE, timeout=30.0)
    except subprocess.TimeoutExpired:
        pytest.fail("a call re-entered during the module's first use of numpy hung")
    assert out.startswith("ok")


# The seed PrefixCache refuses a call nested inside one of its calls on the same thread (RuntimeError)
# instead of waiting for itself. A trace function stands in for a signal handler: it calls the cache
# at every line of the cache's own code, so every window between taking the lock and marking the
# call (and between unmarking and releasing) is hit. It hung where the lock was taken but the holder
# not yet recorded.
SEED_PREFIX_NESTED = """
import sys
from sagellm_kv_cache.prefix_cache import PrefixCache
cache = PrefixCache(block_size=2, max_cached_blocks=8)
hashes = cache.compute_block_hashes(list(range(8)))
seen = set()
outcomes = {"ran": 0, "refused": 0}
def nested():
    try:
        cache.lookup(hashes)
        cache.evict_by_count(1)
        outcomes["ran"] += 1
    except RuntimeError:
        outcomes["refused"] += 1
def tracer(frame, event, arg):
    if frame.f_code.co_filename.endswith("prefix_cache.py"):
        return local
    return None
def local(frame, event, arg):
    if event == "line" and (frame.f_code.co_name, frame.f_lineno) not in seen:
        seen.add((frame.f_code.co_name, frame.f_lineno))
        nested()
    return local
sys.settrace(tracer)
for _ in range(2):
    cache.insert(hashes, [{"block_id": i} for i in range(4)])
    cache.lookup(hashes)
    cache.lookup([])
    cache.evict_by_count(2)
    cache.invalidate(__import__("uuid").uuid4())
sys.settrace(None)
assert outcomes["refused"] > 0, outcomes
print("ok", outcomes)
"""


def test_seed_prefix_cache_nested_call_at_any_line_is_refused_or_runs() -> None:
    try:
        out = run_isolated(SEED_PREFIX_NESTED, timeout=30.0)
    except subprocess.TimeoutExpired:
        pytest.fail("a call nested inside a PrefixCache call hung")
    assert out.startswith("ok")


# insert_objects copies the caller's list of objects before it releases the GIL. A garbage collection
# that the copy's allocation starts may run a finaliser that empties that list; a gc callback does it
# here at the n-th collection after the call starts (threshold 1: every tracked allocation collects).
# The call must then refuse (the list changed length) or insert the objects it copied, never read the
# emptied list's items (PyList_GetSlice did, after its allocation: a crash).
INSERT_OBJECTS_GC = GC_AT_NTH + """
from sagellm_kv_cache import _core

def attempt(n, start):
    cache = _core.PrefixCache(block_size=4)
    digests = _core.hash_blocks(list(range(4 * 40)), 4).tobytes()
    objects = [{"n": i} for i in range(40)]
    originals = list(objects)
    table = []
    if start:
        assert cache.insert_objects(digests[: 32 * start], 0, objects[:start], table, ids=0) == (start, start)
    insert_objects = cache.insert_objects
    out, cleared = call_with_gc_at(n, objects.clear, lambda: insert_objects(digests, start, objects, table, ids=start),
                                   ValueError)
    cache.check_invariants()
    if isinstance(out, ValueError):
        assert "40" in str(out), out
        assert len(cache) == start and table[start:] == [], (out, len(cache))
    else:
        assert out == (40 - start, 40 - start) and len(cache) == 40
        assert all(table[i] is originals[i] for i in range(40))
    return cleared

cleared = [attempt(n, start) for start in (0, 3) for n in range(1, 7)]
assert any(cleared), "no collection ran inside the call: the test tested nothing"
print("ok")
"""


def test_insert_objects_survives_a_gc_that_empties_the_objects_list() -> None:
    assert run_isolated(INSERT_OBJECTS_GC).strip().endswith("ok")


# The same for the seed PrefixCache.insert (anonymous blocks, and blocks with a handle_id), whose
# caller's list may be emptied by a finaliser at any allocation inside the call: it must refuse with
# ValueError and change nothing, or insert the blocks it was given; never return having inserted none.
SEED_INSERT_GC = GC_AT_NTH + """
import uuid
from sagellm_kv_cache.prefix_cache import PrefixCache

def attempt(n, owned, looked_up):
    cache = PrefixCache(block_size=4)
    keys = cache.compute_block_hashes(list(range(4 * 30)))
    first = [{"n": -1}, {"n": -2}]
    cache.insert(keys[:2], first)
    h = uuid.uuid4()
    blocks = [{"n": i, "handle_id": h} if owned else {"n": i} for i in range(30)]
    originals = list(blocks)
    if looked_up:
        cache.lookup(keys)  # insert then takes its cached prefix from the lookup
    insert = cache.insert
    out, cleared = call_with_gc_at(n, blocks.clear, lambda: insert(keys, blocks), ValueError)
    refused = str(out) if isinstance(out, ValueError) else None
    found, tokens = cache.lookup(keys)
    if refused is not None:
        assert "30" in refused, refused
        assert tokens == 8 and found == first, (n, owned, refused, tokens)
    else:
        assert tokens == 120, (n, owned, looked_up, cleared, tokens)
        assert found[:2] == first and all(a is b for a, b in zip(found[2:], originals[2:])), (n, owned)
    return cleared

cleared = [attempt(n, owned, looked_up) for owned in (False, True) for looked_up in (False, True)
           for n in range(1, 9)]
assert any(cleared), "no collection ran inside the call: the test tested nothing"
print("ok")
"""


def test_seed_insert_refuses_or_completes_when_a_gc_empties_the_blocks_list() -> None:
    assert run_isolated(SEED_INSERT_GC).strip().endswith("ok")


# compute_block_hashes of a token list with a trailing partial block sliced the caller's list; the
# slice's allocation may start a collection whose finaliser empties the list, and CPython's slice then
# read the emptied list's items (segfault). The hashes must be those of the tokens as given, or of
# the list as the finaliser left it (read after it ran), never a crash.
COMPUTE_BLOCK_HASHES_GC = GC_AT_NTH + """
import hashlib, struct
from sagellm_kv_cache.prefix_cache import PrefixCache

cache = PrefixCache(block_size=4)
given = list(range(4 * 300 + 3))
expected = [hashlib.sha256(struct.pack(">4I", *given[i:i + 4])).digest() for i in range(0, 1200, 4)]
cleared = []
for n in range(1, 5):
    tokens = list(given)
    compute = cache.compute_block_hashes
    out, ran = call_with_gc_at(n, tokens.clear, lambda: compute(tokens))
    if ran:
        cleared.append(n)
    assert out in (expected, []), (n, len(out))
assert cleared, "no collection ran inside the call: the test tested nothing"
print("ok")
"""


def test_compute_block_hashes_survives_a_gc_that_empties_the_token_list() -> None:
    assert run_isolated(COMPUTE_BLOCK_HASHES_GC).strip().endswith("ok")


# KVHandle._blocks: _core.block_refs makes one KVBlockRef per id, each a tracked object whose
# allocation may start a collection; a finaliser then emptying the caller's id list must not change
# the refs being made (the ids are read once, first), nor crash.
BLOCK_REFS_GC = GC_AT_NTH + """
from sagellm_kv_cache import _core
from sagellm_kv_cache.models import KVBlockRef

given = list(range(1000, 1300))
cleared = []
for n in range(1, 5):
    ids = list(given)
    out, ran = call_with_gc_at(n, ids.clear, lambda: _core.block_refs(KVBlockRef, ids))
    if ran:
        cleared.append(n)
    assert [ref.block_id for ref in out] == given, n
assert cleared, "no collection ran inside the call: the test tested nothing"
print("ok")
"""


def test_block_refs_survive_a_gc_that_empties_the_id_list() -> None:
    assert run_isolated(BLOCK_REFS_GC).strip().endswith("ok")
