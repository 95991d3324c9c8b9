"""A token trie: exact lookup and longest-prefix match of token sequences (the seed's ``PrefixIndex``).

Unlike the block-hash prefix cache, keys are token sequences of any length (not whole blocks) and
values are arbitrary objects, so it suits small indexes such as "which cached prompt shares the
longest prefix with this one". Lookups walk at most ``len(tokens)`` nodes. Thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Set
from typing import Any, Generic, TypeVar

import numpy as np

from sagellm_kv_cache._numbers import iterable

__all__ = ["PrefixIndex"]

T = TypeVar("T")
_NO_VALUE: Any = object()


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.value: Any = _NO_VALUE


def _tokens(tokens: Any, *, allow_empty: bool) -> tuple[int, ...]:
    # Token ids straight from a tokenizer are numpy integers (or a 1-D integer array); the original
    # took those. They are stored as Python ints, so np.int64(5) and 5 are the same key.
    if isinstance(tokens, np.ndarray) and tokens.ndim == 1 and (tokens.dtype.kind in "iu" or tokens.size == 0):
        tokens = tokens.tolist()
    # Any other iterable of ids (a generator, a range) as in the original; not a str, bytes, mapping
    # or set (no order of tokens).
    out = tuple(iterable("prefix tokens", tokens, "a list or tuple of ints", refuse=(Mapping, Set)))
    if not all(type(token) is int for token in out):
        for i, token in enumerate(out):
            if isinstance(token, bool | np.bool_) or not isinstance(token, int | np.integer):
                raise TypeError(f"token {i} must be an int, got {type(token).__name__}")
        out = tuple(int(token) for token in out)
    if not out and not allow_empty:
        raise ValueError("prefix_tokens must not be empty")
    return out


class PrefixIndex(Generic[T]):
    """Maps token prefixes to values; ``longest_prefix_match`` finds the longest stored prefix of a query."""

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0
        self._lock = threading.Lock()

    def insert(self, prefix_tokens: list[int] | tuple[int, ...], value: T) -> None:
        """Stores ``value`` under ``prefix_tokens`` (non-empty), replacing an existing value."""
        key = _tokens(prefix_tokens, allow_empty=False)
        with self._lock:
            node = self._root
            for token in key:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                node = child
            if node.value is _NO_VALUE:
                self._size += 1
            node.value = value

    def get(self, prefix_tokens: list[int] | tuple[int, ...]) -> T | None:
        """The value stored under exactly ``prefix_tokens``, or None."""
        key = _tokens(prefix_tokens, allow_empty=True)
        with self._lock:
            node = self._find(key)
            return None if node is None or node.value is _NO_VALUE else node.value

    def longest_prefix_match(self, tokens: list[int] | tuple[int, ...]) -> tuple[T | None, int]:
        """(value, length) of the longest stored prefix of ``tokens``; (None, 0) when none is stored."""
        key = _tokens(tokens, allow_empty=True)
        with self._lock:
            best: Any = None
            best_len = 0
            node = self._root
            for depth, token in enumerate(key, start=1):
                child = node.children.get(token)
                if child is None:
                    break
                node = child
                if node.value is not _NO_VALUE:
                    best, best_len = node.value, depth
            return best, best_len

    def remove(self, prefix_tokens: list[int] | tuple[int, ...]) -> bool:
        """Removes the value under exactly ``prefix_tokens``; False when there was none."""
        key = _tokens(prefix_tokens, allow_empty=True)
        with self._lock:
            path = [self._root]
            for token in key:
                child = path[-1].children.get(token)
                if child is None:
                    return False
                path.append(child)
            if not key or path[-1].value is _NO_VALUE:
                return False
            path[-1].value = _NO_VALUE
            self._size -= 1
            self._prune(path, key)
            return True

    def remove_value(self, value: T) -> int:
        """Removes every prefix whose value is ``value`` (by equality); returns how many."""
        with self._lock:
            removed = self._remove_value(self._root, value)
            self._size -= removed
            return removed

    def __len__(self) -> int:
        return self._size

    def _find(self, key: tuple[int, ...]) -> _Node | None:
        node = self._root
        for token in key:
            child = node.children.get(token)
            if child is None:
                return None
            node = child
        return node

    @staticmethod
    def _prune(path: list[_Node], key: tuple[int, ...]) -> None:
        # Drop the now-empty tail of the path so removed prefixes cost no memory.
        for depth in range(len(key), 0, -1):
            node = path[depth]
            if node.children or node.value is not _NO_VALUE:
                break
            del path[depth - 1].children[key[depth - 1]]

    def _remove_value(self, root: _Node, value: Any) -> int:
        # Compare everything first, then remove: a comparison that raises (a numpy array's ``==``
        # has no truth value) must leave the index as it was, its size included.
        stack: list[tuple[_Node, _Node | None, int | None]] = [(root, None, None)]
        order: list[tuple[_Node, _Node | None, int | None]] = []
        matches: list[_Node] = []
        while stack:
            item = stack.pop()
            order.append(item)
            node = item[0]
            if node is not root and node.value is not _NO_VALUE and node.value == value:
                matches.append(node)
            stack.extend((child, node, token) for token, child in node.children.items())
        for node in matches:
            node.value = _NO_VALUE
        removed = len(matches)
        for node, parent, token in reversed(order):  # children before parents: prune empty branches
            if parent is not None and token is not None and not node.children and node.value is _NO_VALUE:
                del parent.children[token]
        return removed
