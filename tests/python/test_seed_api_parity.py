"""Our public surface against the original package's (isagellm-kv-cache 0.5.2.5 and 0.5.4.15).

``seed_api_surface.json`` beside this file lists, per module, every public name of the original with
its kind, constructor parameters, public methods and their parameters (name, kind, default), read
off the installed original by this same module::

    python tests/python/test_seed_api_parity.py --dump > surface-0.5.4.15.json   # in a venv with the original

(the two dumps merged, the newer one winning). The test walks our package the same way and checks
that every name exists with the same kind, every parameter of the original exists with the same kind
and default (a parameter the original requires may have a default here), positional parameters come
in the same order, and we require nothing extra. Deliberate differences are listed below with the
reason; nothing else may differ. The original is not needed to run the test.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any

SURFACE_FILE = Path(__file__).with_name("seed_api_surface.json")

# Names the original exports that we do not (yet) have, with the reason.
ALLOWED_MISSING: dict[str, str] = {}

# Deliberate differences in parameters, with the reason.
ALLOWED_PARAM_DIFFERENCES: dict[str, str] = {}

_DUNDERS = ("__len__", "__repr__", "__contains__", "__iter__")


def _params(fn: Any) -> list[list[Any]] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    out: list[list[Any]] = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        if default is not None and "<factory>" in default:
            default = "<factory>"
        out.append([p.name, p.kind.name, default])
    return out


def _describe_class(cls: type) -> dict[str, Any]:
    if issubclass(cls, enum.Enum):
        return {"kind": "enum", "members": sorted(m.name for m in cls)}
    mro_names = [b.__name__ for b in cls.__mro__]
    info: dict[str, Any] = {"kind": "class"}
    info["init"] = sorted(getattr(cls, "model_fields", {})) if "BaseModel" in mro_names else _params(cls)
    methods: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.startswith(("builtins", "pydantic", "abc", "typing", "enum")):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") and name not in _DUNDERS:
                continue
            if isinstance(value, property):
                methods[name] = "property"
            elif isinstance(value, classmethod | staticmethod):
                methods[name] = _params(value.__func__)
            elif inspect.isfunction(value):
                methods[name] = _params(value)
    info["methods"] = methods
    return info


def surface(modules: list[str]) -> dict[str, dict[str, Any]]:
    """The public surface of ``modules`` (what the JSON file holds)."""
    warnings.simplefilter("ignore")
    result: dict[str, dict[str, Any]] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # a module the package does not have
            result[module_name] = {"__error__": repr(e)}
            continue
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, v in vars(module).items()
                     if not n.startswith("_") and getattr(v, "__module__", None) == module_name
                     and (inspect.isclass(v) or inspect.isfunction(v))]
        entry: dict[str, Any] = {}
        for name in names:
            try:
                value = getattr(module, name, None)
            except ImportError as e:  # a name behind an optional dependency (BlockTransfer needs torch)
                entry[name] = {"kind": "unavailable", "error": repr(e)}
                continue
            if value is None:
                entry[name] = {"kind": "missing"}
            elif inspect.isclass(value):
                entry[name] = _describe_class(value)
            elif callable(value):
                entry[name] = {"kind": "function", "params": _params(value)}
            else:
                entry[name] = {"kind": "value"}
        result[module_name] = entry
    return result


def _compare_params(expected: Any, actual: Any) -> list[str]:
    if expected is None or actual is None:
        return []
    if expected and isinstance(expected[0], str):  # pydantic fields
        missing = sorted(set(expected) - set(actual))
        return [f"fields missing: {missing}"] if missing else []
    ours = {p[0]: p for p in actual}
    problems = []
    for name, kind, default in expected:
        if name not in ours:
            problems.append(f"parameter {name} missing")
            continue
        _, our_kind, our_default = ours[name]
        if our_kind != kind and kind != "VAR_KEYWORD":
            problems.append(f"parameter {name} is {our_kind}, the original's is {kind}")
        if default is not None and our_default != default:
            problems.append(f"parameter {name} defaults to {our_default}, the original's to {default}")
    positional = ("POSITIONAL_OR_KEYWORD", "POSITIONAL_ONLY")
    order = [p[0] for p in expected if p[1] in positional]
    our_order = [p[0] for p in actual if p[1] in positional]
    if our_order[: len(order)] != order:
        problems.append(f"positional order {our_order}, the original's {order}")
    known = {p[0] for p in expected}
    extra = [p[0] for p in actual
             if p[0] not in known and p[2] is None and p[1] not in ("VAR_POSITIONAL", "VAR_KEYWORD")]
    if extra:
        problems.append(f"extra required parameters {extra}")
    return problems


def differences(expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Path -> what differs, for everything in ``expected``."""
    found: dict[str, str] = {}
    for module_name, names in expected.items():
        ours = actual.get(module_name, {})
        if "__error__" in names:
            continue
        if "__error__" in ours:
            found[module_name] = f"cannot import: {ours['__error__']}"
            continue
        for name, want in names.items():
            path = f"{module_name}.{name}"
            got = ours.get(name)
            if got is None or got.get("kind") == "missing":
                found[path] = "missing"
                continue
            if want["kind"] != got["kind"]:
                found[path] = f"is a {got['kind']}, the original's is a {want['kind']}"
                continue
            if want["kind"] == "enum" and not set(want["members"]) <= set(got["members"]):
                found[path] = f"members missing: {sorted(set(want['members']) - set(got['members']))}"
            elif want["kind"] == "function":
                problems = _compare_params(want["params"], got["params"])
                if problems:
                    found[path] = "; ".join(problems)
            elif want["kind"] == "class":
                problems = _compare_params(want.get("init"), got.get("init"))
                if problems:
                    found[f"{path}.__init__"] = "; ".join(problems)
                for method, params in want["methods"].items():
                    ours_m = got["methods"].get(method, "missing")
                    if ours_m == "missing":
                        found[f"{path}.{method}"] = "missing"
                    elif (params == "property") != (ours_m == "property"):
                        found[f"{path}.{method}"] = "property/method mismatch"
                    elif params != "property":
                        problems = _compare_params(params, ours_m)
                        if problems:
                            found[f"{path}.{method}"] = "; ".join(problems)
    return found


def _allowed(path: str) -> bool:
    if path in ALLOWED_MISSING or path in ALLOWED_PARAM_DIFFERENCES:
        return True
    return any(path.startswith(p + ".") for p in ALLOWED_MISSING)


def test_surface_matches_the_original() -> None:
    expected = json.loads(SURFACE_FILE.read_text())
    found = differences(expected, surface(sorted(expected)))
    unexpected = {path: what for path, what in found.items() if not _allowed(path)}
    assert unexpected == {}, "differences from the original's public API:\n" + "\n".join(
        f"  {path}: {what}" for path, what in sorted(unexpected.items()))


def test_the_surface_file_covers_the_seed_and_its_additions() -> None:
    expected = json.loads(SURFACE_FILE.read_text())
    root = expected["sagellm_kv_cache"]
    for name in ("KVCacheManager", "SchedulerBridge", "PrefixCache", "KVTransferEngine", "KVPoolFullError",
                 "PrefixIndex", "HistoricalPredictor", "GlobalKVPoolManager", "KVTransferPipeline"):
        assert name in root
    assert {"Block", "BlockManager"} <= set(expected["sagellm_kv_cache.pool"])
    assert {"ContiguousKVBlock", "ChunkedKVBlock"} <= set(expected["sagellm_kv_cache.layout"])


def test_the_comparison_notices_differences() -> None:
    want = {"m": {"f": {"kind": "function", "params": [["a", "POSITIONAL_OR_KEYWORD", None],
                                                       ["b", "KEYWORD_ONLY", "1"]]}}}
    same = {"m": {"f": {"kind": "function", "params": [["a", "POSITIONAL_OR_KEYWORD", "0"],
                                                       ["b", "KEYWORD_ONLY", "1"],
                                                       ["c", "KEYWORD_ONLY", "None"]]}}}
    assert differences(want, same) == {}
    changed = {"m": {"f": {"kind": "function", "params": [["a", "POSITIONAL_OR_KEYWORD", None],
                                                          ["b", "KEYWORD_ONLY", "2"],
                                                          ["d", "KEYWORD_ONLY", None]]}}}
    assert differences(want, changed) == {
        "m.f": "parameter b defaults to 2, the original's to 1; extra required parameters ['d']"}
    assert differences(want, {"m": {}}) == {"m.f": "missing"}


if __name__ == "__main__":
    if sys.argv[1:] == ["--dump"]:
        SEED_MODULES = [
            "sagellm_kv_cache", "sagellm_kv_cache.distributed", "sagellm_kv_cache.errors",
            "sagellm_kv_cache.eviction", "sagellm_kv_cache.kv_cache_manager", "sagellm_kv_cache.layout",
            "sagellm_kv_cache.layout.base", "sagellm_kv_cache.layout.chunked", "sagellm_kv_cache.layout.contiguous",
            "sagellm_kv_cache.load_aware_scheduler", "sagellm_kv_cache.load_metrics", "sagellm_kv_cache.models",
            "sagellm_kv_cache.models.kv_handle", "sagellm_kv_cache.observability",
            "sagellm_kv_cache.observability.hooks", "sagellm_kv_cache.observability.metrics",
            "sagellm_kv_cache.offload", "sagellm_kv_cache.pool", "sagellm_kv_cache.pool.block_manager",
            "sagellm_kv_cache.pool.kv_pool", "sagellm_kv_cache.predictor", "sagellm_kv_cache.predictor.base",
            "sagellm_kv_cache.predictor.features", "sagellm_kv_cache.predictor.historical", "sagellm_kv_cache.prefix",
            "sagellm_kv_cache.prefix.fingerprint", "sagellm_kv_cache.prefix.grouping", "sagellm_kv_cache.prefix.index",
            "sagellm_kv_cache.prefix_cache", "sagellm_kv_cache.profiling", "sagellm_kv_cache.profiling.access_stats",
            "sagellm_kv_cache.scheduler_bridge", "sagellm_kv_cache.transfer",
        ]
        print(json.dumps(surface(SEED_MODULES), indent=1, sort_keys=True))
    else:
        import pytest

        pytest.main([__file__, "-q"])
