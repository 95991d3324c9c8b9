"""The seed's ``KVTransferEngine``: tensor transfers of a ``KVHandle`` with status tracking, plus
block transfers between pools (:mod:`.blocks`) recorded the same way.

Every transfer this engine runs gets a :class:`~sagellm_protocol.kv.KVTransferMetadata` record
(the ecosystem's type) whose status goes PENDING -> IN_PROGRESS -> COMPLETED or FAILED; a failed
backend call surfaces as ``KVTransferFailedError`` and stays recorded as FAILED. A block send whose
outcome is unknown (``KVTransferOutcomeUnknownError``: every byte went out, the final reply did
not come back) is never recorded as FAILED: it stays IN_PROGRESS, :meth:`get_transfer_outcome`
says "unknown", and both turn into the real outcome once a later transfer to that rank settled it.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from sagellm_protocol.kv import DType, KVTransferMetadata, Layout, TransferDirection, TransferStatus

from sagellm_kv_cache.errors import KVCacheError, KVTransferFailedError, KVTransferOutcomeUnknownError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from sagellm_kv_cache.paged import PagedKVPool
    from sagellm_kv_cache.transfer.blocks import BlockTransfer, Publisher

__all__ = ["KVTransferEngine"]

_TERMINAL = (TransferStatus.COMPLETED, TransferStatus.FAILED, TransferStatus.CANCELLED)


class KVTransferEngine:
    """Moves KV data between ranks of a ``sagellm_comm`` backend and keeps a record of each move.

    ``transfer_kv_handle`` is called on both sides with the same ranks: the source sends
    ``tensor``, the destination receives into its own ``tensor`` (same shape and dtype), each
    through the backend's blocking ``send``/``recv``. ``send_blocks``/``recv_blocks`` move pool
    blocks with header checks, checksums and timeouts (see :class:`~.blocks.BlockTransfer`).
    """

    def __init__(self, comm_backend: Any, **block_options: Any) -> None:
        if comm_backend is None:
            raise ValueError("comm_backend is required (e.g. an initialised sagellm_comm.GlooBackend)")
        self.comm_backend = comm_backend
        self._block_options = block_options
        self._blocks: BlockTransfer | None = None
        self._records: dict[uuid.UUID, KVTransferMetadata] = {}
        self._in_doubt: set[uuid.UUID] = set()  # block sends with an unknown outcome, not yet settled
        self._lock = threading.Lock()

    # --- the seed's tensor transfer ---------------------------------------------------------

    def transfer_kv_handle(self, handle: Any, src_rank: int, dst_rank: int, tensor: Any | None = None) -> uuid.UUID:
        """Sends (on ``src_rank``) or receives (on ``dst_rank``) the KV tensor of ``handle``.

        Returns the transfer id; the record is COMPLETED when the backend call returned. Raises
        ``ValueError`` for bad ranks or a missing tensor (nothing is recorded then) and
        ``KVTransferFailedError`` when the backend fails (recorded as FAILED).
        """
        if handle is None or not hasattr(handle, "handle_id"):
            raise ValueError(f"handle must be a KVHandle, got {type(handle).__name__}")
        rank, world = self._rank_and_world()
        _check_rank(src_rank, world, "src_rank")
        _check_rank(dst_rank, world, "dst_rank")
        if src_rank == dst_rank:
            raise ValueError(f"src_rank and dst_rank must differ, both are {src_rank}")
        if rank not in (src_rank, dst_rank):
            raise ValueError(f"this process is rank {rank}, neither the source ({src_rank}) nor the destination "
                             f"({dst_rank}) of the transfer; call transfer_kv_handle on those two ranks only")
        sending = rank == src_rank
        if tensor is None:
            raise ValueError("tensor is required on the source: it holds the KV data to send" if sending else
                             "tensor is required on the destination: the buffer to receive the KV data into")

        transfer_id = uuid.uuid4()
        meta = _handle_metadata(transfer_id, handle, tensor, src_rank, dst_rank, sending)
        self._put(meta)
        self._set_status(transfer_id, TransferStatus.IN_PROGRESS, started_at=time.time())
        _set_handle(handle, transfer_id=transfer_id, is_transferring=True)
        try:
            if sending:
                self.comm_backend.send(tensor, dst_rank)
            else:
                self.comm_backend.recv(tensor, src_rank)
        except Exception as e:
            self._set_status(transfer_id, TransferStatus.FAILED, completed_at=time.time())
            _set_handle(handle, is_transferring=False)
            raise KVTransferFailedError(
                transfer_id, source=f"rank {src_rank}", target=f"rank {dst_rank}", reason=str(e) or type(e).__name__,
                context={"handle_id": str(handle.handle_id), "direction": "send" if sending else "recv"},
            ) from e
        self._set_status(transfer_id, TransferStatus.COMPLETED, completed_at=time.time())
        _set_handle(handle, is_transferring=False)
        if not sending:
            _set_handle(handle, source_rank=src_rank, rank=dst_rank)
        return transfer_id

    # --- block transfer between pools -------------------------------------------------------

    @property
    def blocks(self) -> BlockTransfer:
        """The :class:`~.blocks.BlockTransfer` behind ``send_blocks``/``recv_blocks`` (needs torch)."""
        with self._lock:
            if self._blocks is None:
                from sagellm_kv_cache.transfer.blocks import BlockTransfer

                self._blocks = BlockTransfer(self.comm_backend, **self._block_options)
            return self._blocks

    def send_blocks(
        self,
        pool: PagedKVPool,
        block_ids: Any,
        dst_rank: int,
        *,
        digests: Any = None,
        timeout: float | None = None,
        request_id: str = "",
    ) -> uuid.UUID:
        """:meth:`BlockTransfer.send_blocks <.blocks.BlockTransfer.send_blocks>`, recorded here."""
        blocks = self.blocks
        transfer_id = uuid.uuid4()
        n = len(block_ids)
        rank, _ = self._rank_and_world()
        self._put(_block_metadata(transfer_id, pool, n, rank, dst_rank, TransferDirection.SEND, request_id))
        self._set_status(transfer_id, TransferStatus.IN_PROGRESS, started_at=time.time())
        try:
            blocks.send_blocks(pool, block_ids, dst_rank, digests=digests, timeout=timeout, transfer_id=transfer_id)
        except KVTransferOutcomeUnknownError:
            with self._lock:
                self._in_doubt.add(transfer_id)  # stays IN_PROGRESS: the destination may hold the blocks
            raise
        except BaseException:
            self._set_status(transfer_id, TransferStatus.FAILED, completed_at=time.time())
            raise
        self._set_status(transfer_id, TransferStatus.COMPLETED, completed_at=time.time())
        return transfer_id

    def recv_blocks(
        self,
        pool: PagedKVPool,
        src_rank: int,
        *,
        publish: Publisher | None = None,
        timeout: float | None = None,
        request_id: str = "",
    ) -> npt.NDArray[np.int32]:
        """:meth:`BlockTransfer.recv_blocks <.blocks.BlockTransfer.recv_blocks>`, recorded here.

        A failed receive is recorded under the source's transfer id when the header arrived, and
        under a fresh id otherwise.
        """
        started = time.time()
        rank, _ = self._rank_and_world()
        try:
            got = self.blocks.receive(pool, src_rank, publish=publish, timeout=timeout)
        except KVCacheError as e:
            tid = _as_uuid(e.context.get("transfer_id", getattr(e, "transfer_id", None)))
            self._put(_block_metadata(tid, pool, 0, src_rank, rank, TransferDirection.RECV, request_id,
                                      status=TransferStatus.FAILED, started_at=started, completed_at=time.time()))
            raise
        n = len(got.block_ids)
        self._put(_block_metadata(got.transfer_id, pool, n, src_rank, rank, TransferDirection.RECV, request_id,
                                  status=TransferStatus.COMPLETED, started_at=started, completed_at=time.time(),
                                  checksum=got.checksum))
        return got.block_ids

    # --- records ----------------------------------------------------------------------------

    def get_transfer_status(self, transfer_id: uuid.UUID) -> TransferStatus:
        return self.get_transfer_metadata(transfer_id).status

    def get_transfer_outcome(self, transfer_id: uuid.UUID) -> str:
        """The record's status value, or "unknown" for a block send still in doubt (see the module doc)."""
        status = self.get_transfer_status(transfer_id)
        with self._lock:
            return "unknown" if transfer_id in self._in_doubt else status.value

    def get_transfer_metadata(self, transfer_id: uuid.UUID) -> KVTransferMetadata:
        """The record of ``transfer_id``; ``KeyError`` for an id this engine never ran (or cleared)."""
        self._settle_doubts()
        with self._lock:
            try:
                return self._records[transfer_id]
            except KeyError:
                raise KeyError(f"unknown transfer id {transfer_id}") from None

    def get_pending_count(self) -> int:
        """Transfers not finished yet (PENDING or IN_PROGRESS)."""
        self._settle_doubts()
        with self._lock:
            return sum(1 for m in self._records.values() if m.status not in _TERMINAL)

    def get_completed_count(self) -> int:
        """Transfers that completed successfully (FAILED ones are not counted)."""
        self._settle_doubts()
        with self._lock:
            return sum(1 for m in self._records.values() if m.status == TransferStatus.COMPLETED)

    def clear_completed(self) -> None:
        """Forgets every finished record (COMPLETED, FAILED, CANCELLED); running ones stay."""
        with self._lock:
            self._records = {k: m for k, m in self._records.items() if m.status not in _TERMINAL}

    # --- helpers ----------------------------------------------------------------------------

    def _rank_and_world(self) -> tuple[int, int]:
        try:
            rank, world = self.comm_backend.get_rank(), self.comm_backend.get_world_size()
        except Exception as e:
            raise ValueError(f"the comm backend cannot tell its rank ({e}); initialise it first") from e
        if rank is None or world is None:
            raise ValueError("the comm backend is not initialised (no rank / world size); call init() first")
        return int(rank), int(world)

    def _settle_doubts(self) -> None:
        """Turns sends whose outcome a later exchange settled into COMPLETED or FAILED records."""
        with self._lock:
            doubts = list(self._in_doubt)
        if not doubts:
            return
        from sagellm_kv_cache.transfer.blocks import BlockTransfer

        for tid in doubts:
            outcome = BlockTransfer.outcome(tid)
            if outcome in ("completed", "failed"):
                status = TransferStatus.COMPLETED if outcome == "completed" else TransferStatus.FAILED
                with self._lock:
                    self._in_doubt.discard(tid)
                self._set_status(tid, status, completed_at=time.time())

    def _put(self, meta: KVTransferMetadata) -> None:
        with self._lock:
            self._records[meta.transfer_id] = meta

    def _set_status(self, transfer_id: uuid.UUID, status: TransferStatus, **times: float) -> None:
        with self._lock:
            meta = self._records.get(transfer_id)
            if meta is not None:
                self._records[transfer_id] = meta.model_copy(update={"status": status, **times})


def _check_rank(rank: Any, world: int, name: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"{name} must be an int, got {type(rank).__name__}")
    if not 0 <= rank < world:
        raise ValueError(f"invalid {name} {rank}: must be in [0, {world}) for world size {world}")


def _as_uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return uuid.uuid4()


def _set_handle(handle: Any, **fields: Any) -> None:
    for name, value in fields.items():
        if hasattr(handle, name):
            setattr(handle, name, value)


def _nbytes(tensor: Any) -> int:
    if hasattr(tensor, "nbytes"):
        return int(tensor.nbytes)
    if hasattr(tensor, "numel") and hasattr(tensor, "element_size"):
        return int(tensor.numel()) * int(tensor.element_size())
    return 0


def _dim(tensor: Any, axis: int) -> int:
    shape = tuple(getattr(tensor, "shape", ()))
    return int(shape[axis]) if len(shape) >= -axis and int(shape[axis]) > 0 else 1


def _handle_metadata(
    transfer_id: uuid.UUID, handle: Any, tensor: Any, src: int, dst: int, sending: bool
) -> KVTransferMetadata:
    extra: dict[str, Any] = dict(getattr(handle, "metadata", None) or {})
    layers = int(extra.get("num_layers", 1))
    return KVTransferMetadata(
        transfer_id=transfer_id,
        request_id=str(getattr(handle, "request_id", None) or handle.handle_id),
        trace_id=str(extra.get("trace_id", transfer_id)),
        layer_start=0,
        layer_end=layers,
        token_start=int(getattr(handle, "token_start", 0)),
        token_end=int(getattr(handle, "token_end", 0) or getattr(handle, "num_tokens", 0)),
        num_heads=int(extra.get("num_heads", extra.get("num_kv_heads", _dim(tensor, -2)))),
        head_dim=int(extra.get("head_dim", _dim(tensor, -1))),
        dtype=getattr(handle, "dtype", DType.FP16),
        layout=getattr(handle, "layout", Layout.CONTIGUOUS),
        total_bytes=_nbytes(tensor),
        direction=TransferDirection.SEND if sending else TransferDirection.RECV,
        source_device=f"rank:{src}",
        target_device=f"rank:{dst}",
        status=TransferStatus.PENDING,
        created_at=time.time(),
    )


def _block_metadata(
    transfer_id: uuid.UUID,
    pool: PagedKVPool,
    num_blocks: int,
    src: int,
    dst: int,
    direction: TransferDirection,
    request_id: str,
    *,
    status: TransferStatus = TransferStatus.PENDING,
    **fields: Any,
) -> KVTransferMetadata:
    spec = pool.spec
    return KVTransferMetadata(
        transfer_id=transfer_id,
        request_id=request_id,
        trace_id=str(transfer_id),
        layer_start=0,
        layer_end=spec.num_layers,
        token_start=0,
        token_end=num_blocks * spec.block_size,
        num_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=DType(spec.dtype),
        layout=Layout.PAGED,
        total_bytes=num_blocks * pool.block_nbytes,
        direction=direction,
        source_device=f"rank:{src}",
        target_device=f"rank:{dst}",
        status=status,
        created_at=time.time(),
        **fields,
    )
