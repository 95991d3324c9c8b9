"""The options of :class:`~.blocks.BlockTransfer`, checked without torch.

``KVTransferEngine(comm_backend, **block_options)`` makes its ``BlockTransfer`` on the first block
transfer (that needs torch); it checks the options here when it is constructed, so an unknown name
or a bad value is refused then and not at the first transfer. ``BlockTransfer`` checks them the same
way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from sagellm_kv_cache._numbers import flag, positive_int, shown
from sagellm_kv_cache.transfer import shm, wire

__all__ = ["BLOCK_OPTION_NAMES", "TRANSPORTS", "BlockOptions", "check_block_options", "check_timeout"]

TRANSPORTS = ("auto", "torch", "backend")


@dataclass(frozen=True)
class BlockOptions:
    """Checked ``BlockTransfer`` options (see its docstring for what each does)."""

    chunk_bytes: int = 4 << 20
    pipeline_depth: int = 4
    timeout: float = 60.0
    checksum: str = "segsum64"
    transport: str = "auto"
    gather_thread: bool | None = None
    same_host: bool = True


#: The keyword arguments ``BlockTransfer`` (and so ``KVTransferEngine``) takes for block transfers.
BLOCK_OPTION_NAMES = tuple(f.name for f in fields(BlockOptions))


def check_block_options(caller: str, options: dict[str, Any]) -> BlockOptions:
    """``options`` checked: ``TypeError`` naming any unknown keyword (as Python words it, for ``caller``)
    or a value of the wrong type, ``ValueError`` naming a value out of range."""
    unknown = [name for name in options if name not in BLOCK_OPTION_NAMES]
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise TypeError(f"{caller}() got unexpected keyword argument{'s' if len(unknown) > 1 else ''} {names} "
                        f"(the block transfer options are {', '.join(BLOCK_OPTION_NAMES)})")
    out = BlockOptions(**options)
    gather_thread = out.gather_thread
    return BlockOptions(
        chunk_bytes=positive_int("chunk_bytes", out.chunk_bytes),
        # the same-host path's ring has a slot per buffer in flight, at most shm.MAX_SLOTS: a deeper
        # pipeline failed each same-host handover (a "bad ring geometry" in the source's offer thread)
        pipeline_depth=positive_int("pipeline_depth", out.pipeline_depth, maximum=shm.MAX_SLOTS),
        timeout=check_timeout("timeout", out.timeout),
        checksum=_choice("checksum", out.checksum, tuple(wire.CHECKSUM_ALGORITHMS)),
        transport=_choice("transport", out.transport, TRANSPORTS),
        gather_thread=None if gather_thread is None else flag("gather_thread", gather_thread),
        same_host=flag("same_host", out.same_host),
    )


def check_timeout(name: str, timeout: Any) -> float:
    """A timeout in seconds as a float: a number > 0, ``math.inf`` (or an int past the float range) for
    none. ``TypeError`` / ``ValueError`` naming ``name`` otherwise: a deadline already past would
    time the transfer out at once, which breaks the link to its peer."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(timeout).__name__}")
    if not timeout > 0:  # NaN included
        raise ValueError(f"{name} must be > 0 seconds (math.inf for none), got {shown(timeout)}")
    return math.inf if isinstance(timeout, int) and timeout.bit_length() > 1024 else float(timeout)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(allowed)}; got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value
