"""The seed's ``KVTransferEngine``: tensor transfers of a ``KVHandle`` with status tracking, plus
block transfers between pools (:mod:`.blocks`) recorded the same way.

Every transfer this engine runs gets a :class:`~sagellm_protocol.kv.KVTransferMetadata` record
(the ecosystem's type) whose status goes PENDING -> IN_PROGRESS -> COMPLETED or FAILED; a failed
backend call surfaces as ``KVTransferFailedError`` and stays recorded as FAILED. A block send whose
outcome is unknown (``KVTransferOutcomeUnknownError``: every byte went out, the final reply did
not come back) is never recorded as FAILED: it stays IN_PROGRESS, :meth:`get_transfer_outcome` and
the ``status`` of :meth:`get_transfer_metrics` say "unknown", and all turn into the real outcome once a
later transfer to that rank settled it. Its ``latency_ms`` is the time until the send went into doubt
(its call ended), fixed from then on; the settled record keeps that figure (its ``completed_at`` is
that moment too, not the later one at which the engine learnt the outcome).
The engine learns that outcome from the process-wide ledger of :mod:`.blocks`, which keeps the
newest 4,096 doubts per destination and 4,096 settled outcomes; a doubt it no longer holds can never
be settled, so the engine then forgets that record too, as it forgets old finished ones (below). It
checks on every query and on every new doubt, so its doubts stay within the ledger's.

Tensor transfers take the seed's options: ``max_retries`` re-runs a failed backend call with
exponential backoff starting at ``retry_backoff_ms`` (a framed transfer's retry, on either side,
resumes at the message that failed, header or payload, so the receiver sees one well-formed frame; a
backend's failed send must have delivered nothing, which the plain path's retry needs too; gloo's
does, as it closes the connection). The plain path receives straight into ``tensor`` (no copy), and
gloo writes a message there as its bytes arrive: a receive that fails partway (its sender died) leaves
part of the sender's data in ``tensor`` under a FAILED record. The framed path writes ``tensor`` only
once the whole frame is in and verified, so a failed framed receive leaves it as it was. (Over gloo,
a receive whose sender dies partway through a message fails only at the process group's timeout, 30
minutes by default: gloo does not notice the closed connection then.) With
``enable_compression`` (zlib at ``compression_level``) or ``enable_checksum`` (CRC-32 of the raw
bytes) the tensor travels framed: a 5 x int64 header (magic, flags, payload bytes, raw bytes,
CRC-32) and then the payload as uint8, and the receiver checks the size, inflates and verifies the
checksum before it writes into its tensor. Both ends must use the same framing options (the plain
path sends the tensor as is); a receiver with ``enable_checksum`` refuses a frame that carries no
checksum (``KVMetadataMismatchError``).

A framed receive that leaves a payload on the link makes the link to that rank unusable, as a
timeout does for :class:`~.blocks.BlockTransfer`: a damaged header (bad magic, or a payload size no
frame for the tensor can have) tells no size to read off, and a transfer that ended between its
header and its payload (its retries spent, an interrupt) is out of step. The receiver would read
that payload as the next header, so every later tensor transfer with that rank, either way, fails at
once with ``KVTransferFailedError`` naming why (nothing is read; the tensor stays as it was) until a
new engine over a new process group is made. The error that broke the link says so in
``context["link"]``. Where the engine's block transfers run on the same stream (``transport=
"backend"``, or ``"auto"`` over a backend other than ``GlooBackend``: the backend's own untagged
calls), one verdict covers both: a tensor transfer that breaks the stream makes ``send_blocks`` /
``recv_blocks`` with that rank refuse it too, and a block transfer that breaks it (a timeout, a dead
peer) makes tensor transfers refuse it. Over gloo the block transfer has tags of its own, another
stream, and each keeps its own verdict.

Finished records are kept up to ``KVTransferEngine.max_finished_records`` (default 4,096, the most
recently finished, as many as the process-wide outcome ledger of :mod:`.blocks` remembers; settable
per engine with ``KVTransferEngine(..., max_finished_records=N)`` or ``engine.max_finished_records = N``,
both checked: an int >= 0): a long-running engine that never
calls :meth:`~KVTransferEngine.clear_completed` would otherwise keep one record per transfer forever.
A forgotten record's id then raises ``KeyError`` like a cleared one; :meth:`~KVTransferEngine.
get_completed_count` still counts it until ``clear_completed``. Running records are never dropped
(a send in doubt only when the ledger dropped it, as above).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
import uuid
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
from sagellm_protocol.kv import DType, KVTransferMetadata, Layout, TransferDirection, TransferStatus

from sagellm_kv_cache._numbers import flag, is_finite_number, positive_int, shown, text
from sagellm_kv_cache.errors import (
    KVCacheError,
    KVChecksumMismatchError,
    KVMetadataMismatchError,
    KVTransferFailedError,
    KVTransferOutcomeUnknownError,
)
from sagellm_kv_cache.transfer.options import check_block_options
from sagellm_kv_cache.transfer.transport import BrokenLinks, uses_backend_calls

if TYPE_CHECKING:
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
    blocks with header checks, checksums and timeouts (see :class:`~.blocks.BlockTransfer`); the
    keyword arguments past the seed's options are that class's (``chunk_bytes``, ``timeout``, ...),
    checked here: an unknown name is a ``TypeError``, a bad value a ``TypeError`` / ``ValueError``.
    """

    #: The default of :attr:`max_finished_records`.
    _DEFAULT_MAX_FINISHED = 4096

    def __init__(
        self,
        comm_backend: Any,
        *,
        enable_compression: bool = False,
        compression_level: int = 6,
        enable_checksum: bool = False,
        max_retries: int = 0,
        retry_backoff_ms: float = 50.0,
        max_finished_records: int | None = None,
        **block_options: Any,
    ) -> None:
        if comm_backend is None:
            raise ValueError("comm_backend cannot be None (Fail-Fast): pass an initialised sagellm_comm backend")
        checked_block_options = check_block_options("KVTransferEngine", block_options)
        compress = flag("enable_compression", enable_compression)  # "false" or 0 is a mistake, not a choice
        checksum = flag("enable_checksum", enable_checksum)
        if isinstance(compression_level, bool) or not isinstance(compression_level, int) or \
                not 0 <= compression_level <= 9:
            raise ValueError(f"compression_level must be an int in [0, 9], got {compression_level!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative int, got {max_retries!r}")
        if not is_finite_number(retry_backoff_ms) or retry_backoff_ms < 0:
            raise ValueError(f"retry_backoff_ms must be a finite non-negative number, got {shown(retry_backoff_ms)}")
        # The last retry waits retry_backoff_ms * 2**(max_retries - 1): past what time.sleep takes, it
        # would end the transfer with sleep's OverflowError instead of the backend's error.
        if max_retries and retry_backoff_ms > 0 and \
                math.log2(retry_backoff_ms) - math.log2(1000.0) + (max_retries - 1) > math.log2(threading.TIMEOUT_MAX):
            raise ValueError(f"max_retries={max_retries} with retry_backoff_ms={retry_backoff_ms!r} makes the last "
                             f"retry wait retry_backoff_ms * 2**{max_retries - 1}, past the longest sleep "
                             f"({threading.TIMEOUT_MAX:.3g} s)")
        self.comm_backend = comm_backend
        self.enable_compression = compress
        self.compression_level = compression_level
        self.enable_checksum = checksum
        self.max_retries = max_retries
        self.retry_backoff_ms = float(retry_backoff_ms)
        self._block_options = checked_block_options
        self._blocks: BlockTransfer | None = None
        self._records: dict[uuid.UUID, KVTransferMetadata] = {}
        # block sends with an unknown outcome, not yet settled -> when each went into doubt (its call ended)
        self._in_doubt: dict[uuid.UUID, float] = {}
        self._retries: dict[uuid.UUID, int] = {}
        self._finished: dict[uuid.UUID, None] = {}  # ids of finished records, oldest first
        # peer rank -> why its stream is out of step; shared with self.blocks when that runs on the same stream
        self._links = BrokenLinks()
        self._forgotten = 0  # finished records dropped at max_finished_records since clear_completed
        self._lock = threading.Lock()
        self._max_finished = self._DEFAULT_MAX_FINISHED
        if max_finished_records is not None:
            self.max_finished_records = max_finished_records

    @property
    def max_finished_records(self) -> int:
        """Finished records kept, the most recently finished (see the module docstring)."""
        return self._max_finished

    @max_finished_records.setter
    def max_finished_records(self, value: int) -> None:
        """An int >= 0, as the constructor's keyword: ``TypeError`` / ``ValueError`` naming a bad value
        (a bool, a float, NaN, a negative int), and nothing changes. Applies from the next finished
        transfer on."""
        checked = positive_int("max_finished_records", value, allow_zero=True)
        with self._lock:
            self._max_finished = checked

    # --- the seed's tensor transfer ---------------------------------------------------------

    def transfer_kv_handle(self, handle: Any, src_rank: int, dst_rank: int, tensor: Any | None = None) -> uuid.UUID:
        """Sends (on ``src_rank``) or receives (on ``dst_rank``) the KV tensor of ``handle``.

        Returns the transfer id; the record is COMPLETED when the backend call returned. Raises
        ``ValueError`` for bad ranks (nothing is recorded then), ``KVTransferFailedError`` for a
        missing tensor or when the backend still fails after ``max_retries`` retries (recorded as
        FAILED; a plain receive may have written part of the message into ``tensor``, see the
        module docstring), and on a framed receive ``KVChecksumMismatchError`` / ``KVMetadataMismatchError`` when the
        payload is corrupt or does not fit ``tensor`` (recorded as FAILED, ``tensor`` left
        unchanged); ``KVTransferFailedError`` at once, recorded as FAILED, once a frame left its
        payload on the link with that rank (see the module docstring).
        """
        if handle is None or not hasattr(handle, "handle_id"):
            raise ValueError(f"handle must be a KVHandle, got {type(handle).__name__}")
        rank, world = self._rank_and_world()
        src_rank = _check_rank(src_rank, world, "src_rank")
        dst_rank = _check_rank(dst_rank, world, "dst_rank")
        if src_rank == dst_rank:
            raise ValueError(f"src_rank and dst_rank cannot be the same (both are {src_rank}); they must differ")
        if rank not in (src_rank, dst_rank):
            raise ValueError(f"this process is rank {rank}, neither the source ({src_rank}) nor the destination "
                             f"({dst_rank}) of the transfer; call transfer_kv_handle on those two ranks only")
        sending = rank == src_rank
        source, target = _endpoint(src_rank, handle), _endpoint(dst_rank, handle)

        transfer_id = uuid.uuid4()
        meta = _handle_metadata(transfer_id, handle, tensor, source, target, sending)
        self._put(meta)
        self._set_status(transfer_id, TransferStatus.IN_PROGRESS, started_at=time.time())
        refusal = self._refusal(tensor, sending, dst_rank if sending else src_rank)
        if refusal is not None:
            self._set_status(transfer_id, TransferStatus.FAILED, completed_at=time.time())
            raise KVTransferFailedError(transfer_id, source=source, target=target, reason=refusal)
        try:
            _set_handle(handle, transfer_id=transfer_id, is_transferring=True)
            update = self._run_with_retries(transfer_id, tensor, src_rank, dst_rank, sending)
        except (KVChecksumMismatchError, KVMetadataMismatchError):
            self._failed(transfer_id, handle)
            raise
        except Exception as e:
            with self._lock:  # before the record is finished: it may be dropped at once (max_finished_records)
                retries = self._retries.get(transfer_id, 0)
            broken = self._links.reason(dst_rank if sending else src_rank)
            self._failed(transfer_id, handle)
            reason = str(e) or type(e).__name__
            context = {"handle_id": str(handle.handle_id), "direction": "send" if sending else "recv",
                       "error": reason, "retries": retries}
            if broken is not None:
                context["link"] = f"unusable: {broken}"
            raise KVTransferFailedError(transfer_id, source=source, target=target, reason=reason,
                                        context=context) from e
        except BaseException:  # KeyboardInterrupt, a cancelled task: the call is over and did not complete
            self._failed(transfer_id, handle)
            raise
        self._set_status(transfer_id, TransferStatus.COMPLETED, completed_at=time.time(), **update)
        _set_handle(handle, is_transferring=False)
        if not sending:
            _set_handle(handle, source_rank=src_rank, rank=dst_rank)
        return transfer_id

    def _refusal(self, tensor: Any, sending: bool, peer: int) -> str | None:
        """Why a tensor transfer with ``peer`` cannot start (nothing is sent or read then), or None."""
        if tensor is None:
            return ("tensor is required for sender: it holds the KV data to send" if sending else
                    "tensor is required for receiver: the buffer to receive the KV data into")
        if not sending and not getattr(getattr(tensor, "flags", None), "writeable", True):
            # Refused before anything is read, so the sender's data stays on the wire for a good buffer.
            return "tensor is read-only: the receiver writes the KV data into it"
        broken = self._links.reason(peer)
        if broken is not None:
            return (f"the link to rank {peer} is unusable after an earlier failure ({broken}); "
                    "re-create the process group")
        return None

    def _mark_broken(self, peer: int, why: str) -> str:
        """Refuses every later tensor transfer with ``peer``, and block transfer where they share the stream
        (the first reason stays); returns ``why``."""
        self._links.mark(peer, why)
        return why

    def _failed(self, transfer_id: uuid.UUID, handle: Any) -> None:
        """Records a transfer that raised as FAILED and clears the handle's flag (best effort: the error
        that ended the transfer is the one to raise, not a handle's refusal to be updated)."""
        self._set_status(transfer_id, TransferStatus.FAILED, completed_at=time.time())
        with contextlib.suppress(Exception):
            _set_handle(handle, is_transferring=False)

    def _run_with_retries(
        self, transfer_id: uuid.UUID, tensor: Any, src_rank: int, dst_rank: int, sending: bool
    ) -> dict[str, Any]:
        """One send or receive, re-run after a backend failure up to ``max_retries`` times.

        A framed transfer is two messages; its retry resumes at the one that failed (a header that went out,
        or came in, is not sent or read again), so the receiver sees one header and one payload. Our own
        verdicts on the data (checksum, size) and a received frame we cannot write are final: the peer has
        already sent.
        """
        framed = self.enable_compression or self.enable_checksum
        frame = _Frame()
        attempt = 0
        while True:
            try:
                if not framed:
                    if sending:
                        self.comm_backend.send(tensor, dst_rank)
                    else:
                        self.comm_backend.recv(tensor, src_rank)
                    return {}
                if sending:
                    return self._send_framed(tensor, dst_rank, frame)
                return self._recv_framed(transfer_id, tensor, src_rank, frame)
            except (KVChecksumMismatchError, KVMetadataMismatchError, _WriteFailed):
                raise
            except Exception:
                if attempt >= self.max_retries:
                    self._half_frame(frame, sending, dst_rank if sending else src_rank)
                    raise
                time.sleep(self.retry_backoff_ms * (2**attempt) / 1000.0)
                attempt += 1
                with self._lock:
                    self._retries[transfer_id] = attempt
            except BaseException:  # KeyboardInterrupt, a cancelled task
                self._half_frame(frame, sending, dst_rank if sending else src_rank)
                raise

    def _half_frame(self, frame: _Frame, sending: bool, peer: int) -> None:
        """A framed transfer that ends between its header and its payload leaves the link out of step: the
        receiver would read the next frame's header as this payload, or this payload as the next header."""
        if frame.header_done:
            self._mark_broken(peer, f"a framed {'send to' if sending else 'receive from'} rank {peer} ended "
                                    "between its header and its payload")

    def _send_framed(self, tensor: Any, dst_rank: int, frame: _Frame) -> dict[str, Any]:
        """Sends the frame, made on the first attempt (a retry sends the payload its header announced)."""
        import torch

        if frame.payload is None:
            raw = _tensor_bytes(tensor)
            payload = zlib.compress(raw, self.compression_level) if self.enable_compression else raw
            crc = zlib.crc32(raw) if self.enable_checksum else 0
            flags = (_FLAG_ZLIB if self.enable_compression else 0) | (_FLAG_CRC32 if self.enable_checksum else 0)
            frame.header = (_FRAME_MAGIC, flags, len(payload), len(raw), crc)
            frame.payload = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        _, flags, payload_nbytes, raw_nbytes, crc = frame.header
        if not frame.header_done:
            self.comm_backend.send(torch.tensor(frame.header, dtype=torch.int64), dst_rank)
            frame.header_done = True
        self.comm_backend.send(frame.payload, dst_rank)
        return _frame_fields(self.enable_compression, payload_nbytes, raw_nbytes, crc if self.enable_checksum else None)

    def _recv_framed(self, transfer_id: uuid.UUID, tensor: Any, src_rank: int, frame: _Frame) -> dict[str, Any]:
        """Receives a frame into ``tensor``; a retry whose header came in waits for that header's payload."""
        if not frame.header_done:
            frame.header = self._recv_frame_header(transfer_id, tensor, src_rank)
            frame.header_done = True
        return self._recv_frame_payload(transfer_id, tensor, src_rank, frame.header)

    def _recv_frame_header(
        self, transfer_id: uuid.UUID, tensor: Any, src_rank: int
    ) -> tuple[int, int, int, int, int]:
        """The frame's header, checked against ``tensor``: magic, flags, payload bytes, raw bytes, CRC-32."""
        import torch

        header = torch.zeros(5, dtype=torch.int64)
        self.comm_backend.recv(header, src_rank)
        magic, flags, payload_nbytes, raw_nbytes, crc = (int(v) for v in header.tolist())
        expected = _nbytes(tensor)
        context: dict[str, Any] = {"transfer_id": str(transfer_id)}
        if magic != _FRAME_MAGIC:  # a damaged header: its payload, of unknown size, stays on the link
            context["link"] = "unusable: " + self._mark_broken(
                src_rank, f"a damaged frame header from rank {src_rank} (magic {magic & (2**64 - 1):#x}) left "
                          "its payload, of unknown size, on the link")
            raise KVMetadataMismatchError("frame_magic", hex(_FRAME_MAGIC), hex(magic & (2**64 - 1)), context=context)
        if raw_nbytes != expected or not 0 <= payload_nbytes <= _payload_bound(raw_nbytes):
            context["payload_bytes"] = payload_nbytes
            out_of_step = self._read_off(payload_nbytes, expected, src_rank)  # the size is the verdict regardless
            if out_of_step is not None:
                context["link"] = "unusable: " + self._mark_broken(src_rank, out_of_step)
            if raw_nbytes == expected:
                raise KVMetadataMismatchError("payload_bytes", f"0..{_payload_bound(expected)}", payload_nbytes,
                                              context=context)
            raise KVMetadataMismatchError("total_bytes", expected, raw_nbytes, context=context)
        return magic, flags, payload_nbytes, raw_nbytes, crc

    def _read_off(self, payload_nbytes: int, expected: int, src_rank: int) -> str | None:
        """Reads the payload of a refused frame, so that the sender's next frame is the next thing on the
        link: None when it did, else why the link is out of step (a payload no tensor of ours could have,
        from a damaged header or a larger tensor's, is not read; nor is one whose receive failed)."""
        import torch

        if not 0 <= payload_nbytes <= _payload_bound(expected):
            return (f"a frame header from rank {src_rank} announced {payload_nbytes} payload bytes (damaged, or a "
                    "larger tensor's): they were not read and may be on the link")
        try:
            self.comm_backend.recv(torch.empty(payload_nbytes, dtype=torch.uint8), src_rank)
        except Exception as e:
            return (f"reading off the {payload_nbytes}-byte payload of a refused frame from rank {src_rank} failed "
                    f"({str(e) or type(e).__name__}): it may be on the link")
        return None

    def _recv_frame_payload(
        self, transfer_id: uuid.UUID, tensor: Any, src_rank: int, header: tuple[int, int, int, int, int]
    ) -> dict[str, Any]:
        """The payload of a checked header: inflated, verified and written into ``tensor``."""
        import torch

        _, flags, payload_nbytes, raw_nbytes, crc = header
        expected = _nbytes(tensor)
        payload = torch.empty(payload_nbytes, dtype=torch.uint8)
        self.comm_backend.recv(payload, src_rank)
        if self.enable_checksum and not flags & _FLAG_CRC32:  # (after the payload: the link stays in step)
            raise KVMetadataMismatchError("frame_checksum", "crc32", "none",
                                          context={"transfer_id": str(transfer_id), "reason": "the sender "
                                                   "framed the tensor without a checksum; enable_checksum here "
                                                   "wants every received tensor verified"})
        data = payload.numpy().tobytes()
        if flags & _FLAG_ZLIB:
            try:
                data = zlib.decompress(data)
            except zlib.error as e:
                raise KVChecksumMismatchError("valid zlib stream", f"corrupt payload ({e})",
                                              transfer_id=transfer_id) from None
        if len(data) != expected:
            raise KVMetadataMismatchError("total_bytes", expected, len(data), context={"transfer_id": str(transfer_id)})
        actual = zlib.crc32(data) if flags & _FLAG_CRC32 else None
        if actual is not None and actual != crc:
            raise KVChecksumMismatchError(f"{crc:08x}", f"{actual:08x}", transfer_id=transfer_id)
        try:
            _write_bytes(tensor, data)
        except Exception as e:  # the frame is consumed: a retry would read the sender's next one
            raise _WriteFailed(f"the received bytes cannot be written into tensor: {e}") from e
        return _frame_fields(bool(flags & _FLAG_ZLIB), payload_nbytes, raw_nbytes, actual)

    # --- block transfer between pools -------------------------------------------------------

    @property
    def blocks(self) -> BlockTransfer:
        """The :class:`~.blocks.BlockTransfer` behind ``send_blocks``/``recv_blocks`` (needs torch)."""
        with self._lock:
            if self._blocks is None:
                from sagellm_kv_cache.transfer.blocks import BlockTransfer

                self._blocks = BlockTransfer(self.comm_backend, **dataclasses.asdict(self._block_options))
                if uses_backend_calls(self.comm_backend, self._block_options.transport):
                    self._blocks._links = self._links  # one stream: what breaks it for one breaks it for both
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
        """:meth:`BlockTransfer.send_blocks <.blocks.BlockTransfer.send_blocks>`, recorded here. Bad
        arguments (block ids, digests, peer, timeout, request id) are refused before anything is recorded."""
        request_id = text("request_id", request_id)
        blocks = self.blocks
        rank, _ = self._rank_and_world()  # ValueError when the backend is not initialised
        plan = blocks.plan_send(pool, block_ids, dst_rank, digests=digests, timeout=timeout)
        transfer_id = uuid.uuid4()
        self._put(_block_metadata(transfer_id, pool, plan.num_blocks, rank, dst_rank, TransferDirection.SEND,
                                  request_id))
        self._set_status(transfer_id, TransferStatus.IN_PROGRESS, started_at=time.time())
        try:
            blocks.send_planned(plan, transfer_id=transfer_id)
        except KVTransferOutcomeUnknownError:
            with self._lock:  # stays IN_PROGRESS: the destination may hold the blocks
                self._in_doubt[transfer_id] = time.time()
            self._settle_doubts()  # and drops the doubts the ledger no longer holds
            raise
        except BaseException:  # another error, or KeyboardInterrupt / a cancelled task
            if blocks.outcome(transfer_id) == "unknown":  # interrupted after the last chunk went out
                with self._lock:
                    self._in_doubt[transfer_id] = time.time()
            else:
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
        request_id = text("request_id", request_id)  # here: the record is made after the blocks are taken
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

    def get_transfer_status(self, transfer_id: uuid.UUID | str) -> TransferStatus:
        return self.get_transfer_metadata(transfer_id).status

    def get_transfer_outcome(self, transfer_id: uuid.UUID | str) -> str:
        """The record's status value, or "unknown" for a block send still in doubt (see the module doc)."""
        meta, _, doubt_since = self._snapshot(transfer_id)
        return "unknown" if doubt_since is not None else meta.status.value

    def get_transfer_metadata(self, transfer_id: uuid.UUID | str) -> KVTransferMetadata:
        """The record of ``transfer_id`` (a UUID, or its str form as this engine's errors carry it);
        ``KeyError`` for an id this engine never ran (or cleared), ``TypeError`` / ``ValueError`` for
        something that is no transfer id at all."""
        return self._snapshot(transfer_id)[0]

    def get_retry_count(self, transfer_id: uuid.UUID | str) -> int:
        """How many times the backend call of ``transfer_id`` was retried (0 when it worked first)."""
        return self._snapshot(transfer_id)[1]

    def get_transfer_metrics(self, transfer_id: uuid.UUID | str) -> dict[str, float | int | str]:
        """Bytes on the wire, latency, bandwidth, compression ratio, retries, checksum and status.

        ``status`` is the record's status value ("pending", "in_progress", "completed", "failed",
        "cancelled"), as in the original, or "unknown" for a block send in doubt, as
        :meth:`get_transfer_outcome` says (its record stays IN_PROGRESS; see the module docstring).
        ``latency_ms`` runs from the start to the end of the call, or to now while the transfer runs;
        a send in doubt stopped at the moment it went into doubt, and keeps that figure once settled."""
        meta, retries, doubt_since = self._snapshot(transfer_id)
        in_doubt = doubt_since is not None
        latency_s = 0.0
        if meta.started_at is not None:
            ended = meta.completed_at if doubt_since is None else doubt_since
            latency_s = max((ended or time.time()) - meta.started_at, 0.0)
        raw = meta.original_size if meta.is_compressed and meta.original_size else meta.total_bytes
        return {
            "bytes": meta.total_bytes,
            "latency_ms": latency_s * 1000.0,
            "bandwidth_gbps": meta.total_bytes / latency_s / 1e9 if latency_s > 0 else 0.0,
            "shards": meta.shard_count,
            "compression_ratio": raw / meta.total_bytes if meta.total_bytes else 1.0,
            "retries": retries,
            "checksum": meta.checksum or "",
            "status": "unknown" if in_doubt else meta.status.value,
        }

    def get_pending_count(self) -> int:
        """Transfers not finished yet (PENDING or IN_PROGRESS)."""
        self._settle_doubts()
        with self._lock:
            return sum(1 for m in self._records.values() if m.status not in _TERMINAL)

    def get_completed_count(self) -> int:
        """Finished transfers (COMPLETED, FAILED or CANCELLED; as in the seed, a failure is finished too).

        ``get_transfer_status`` tells them apart.
        """
        self._settle_doubts()
        with self._lock:
            return self._forgotten + sum(1 for m in self._records.values() if m.status in _TERMINAL)

    def clear_completed(self) -> None:
        """Forgets every finished record (COMPLETED, FAILED, CANCELLED); running ones stay."""
        with self._lock:
            self._records = {k: m for k, m in self._records.items() if m.status not in _TERMINAL}
            self._retries = {k: n for k, n in self._retries.items() if k in self._records}
            self._finished.clear()
            self._forgotten = 0

    # --- helpers ----------------------------------------------------------------------------

    def _rank_and_world(self) -> tuple[int, int]:
        try:
            rank, world = self.comm_backend.get_rank(), self.comm_backend.get_world_size()
        except Exception as e:
            raise ValueError(f"the comm backend cannot tell its rank ({e}); initialise it first") from e
        if rank is None or world is None:
            raise ValueError("the comm backend is not initialised (no rank / world size); call init() first")
        return int(rank), int(world)

    def _snapshot(self, transfer_id: uuid.UUID | str) -> tuple[KVTransferMetadata, int, float | None]:
        """The record of ``transfer_id``, its retry count and since when it is in doubt (None when it is
        not), read in one critical
        section (after settling what the ledger settled): a settle, a finishing transfer that drops the
        record (max_finished_records) or ``clear_completed`` on another thread is seen whole or not at
        all. ``KeyError`` naming the id when the engine holds no record of it."""
        tid = _transfer_key(transfer_id)
        self._settle_doubts()
        with self._lock:
            meta = self._records.get(tid)
            if meta is None:
                raise KeyError(f"Transfer ID {tid} not found")
            return meta, self._retries.get(tid, 0), self._in_doubt.get(tid)

    def _settle_doubts(self) -> None:
        """Turns sends whose outcome a later exchange settled into COMPLETED or FAILED records, and
        forgets those the ledger no longer knows (it dropped them, oldest first: never to be settled)."""
        with self._lock:
            doubts = list(self._in_doubt)
        if not doubts:
            return
        from sagellm_kv_cache.transfer.blocks import BlockTransfer

        for tid in doubts:
            outcome = BlockTransfer.outcome(tid)
            if outcome in ("completed", "failed"):
                status = TransferStatus.COMPLETED if outcome == "completed" else TransferStatus.FAILED
                with self._lock:  # together: no reader sees the doubt gone and the record still running
                    doubt_since = self._in_doubt.pop(tid, None)
                    if doubt_since is not None:  # completed when its call ended, as its latency says
                        self._update(tid, status, completed_at=doubt_since)
            elif outcome is None:
                with self._lock:
                    self._in_doubt.pop(tid, None)
                    record = self._records.get(tid)
                    if record is not None and record.status not in _TERMINAL:
                        del self._records[tid]
                        self._retries.pop(tid, None)
                        self._forgotten += 1  # the call is over: counted as finished, like a dropped record

    def _put(self, meta: KVTransferMetadata) -> None:
        with self._lock:
            self._records[meta.transfer_id] = meta
            self._note_finished(meta)

    def _set_status(self, transfer_id: uuid.UUID, status: TransferStatus, **fields: Any) -> None:
        with self._lock:
            self._update(transfer_id, status, **fields)

    def _update(self, transfer_id: uuid.UUID, status: TransferStatus, **fields: Any) -> None:
        """:meth:`_set_status` with the lock held."""
        meta = self._records.get(transfer_id)
        if meta is not None:
            meta = self._records[transfer_id] = meta.model_copy(update={"status": status, **fields})
            self._note_finished(meta)

    def _note_finished(self, meta: KVTransferMetadata) -> None:
        """Keeps the finished records within max_finished_records, dropping the oldest (lock held)."""
        self._finished.pop(meta.transfer_id, None)  # a re-recorded id becomes the newest (or runs again)
        if meta.status not in _TERMINAL:
            return
        self._finished[meta.transfer_id] = None
        while len(self._finished) > self._max_finished:
            oldest = next(iter(self._finished))
            del self._finished[oldest]
            record = self._records.get(oldest)
            if record is not None and record.status in _TERMINAL:
                del self._records[oldest]
                self._forgotten += 1
            self._retries.pop(oldest, None)


@dataclasses.dataclass
class _Frame:
    """A framed transfer's progress across its retries: the header (magic, flags, payload bytes, raw bytes,
    CRC-32) made or received, and the sender's payload. A failed backend call is taken to have delivered
    nothing (the plain path's retry relies on that too): the retry resumes at that call."""

    header: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    header_done: bool = False
    payload: Any = None


class _WriteFailed(Exception):
    """A framed receive that got its whole frame but could not write it into the tensor: final, not retried."""


_FRAME_MAGIC = 0x53_4B_56_46_52_4D_31  # "SKVFRM1"
_FLAG_ZLIB = 1
_FLAG_CRC32 = 2


def _payload_bound(raw_nbytes: int) -> int:
    """The most payload bytes a frame of ``raw_nbytes`` raw bytes may carry (zlib's worst case, with room)."""
    return max(2 * raw_nbytes + 64, 1 << 20)


def _check_rank(rank: Any, world: int, name: str) -> int:
    """``rank`` as a Python int (a numpy integer is one, as in the block path); ValueError otherwise, as in
    the seed."""
    if isinstance(rank, bool | np.bool_) or not isinstance(rank, int | np.integer):
        raise ValueError(f"{name} must be an int, got {type(rank).__name__}")
    rank = int(rank)
    if rank < 0:
        raise ValueError(f"Invalid {name}: {rank} (invalid {name} {rank}: must be in [0, {world}))")
    if rank >= world:
        raise ValueError(f"Rank out of bounds: {name}={rank}, world_size={world} "
                         f"(invalid {name} {rank}: must be in [0, {world}))")
    return rank


def _transfer_key(transfer_id: Any) -> uuid.UUID:
    """A transfer id as the records key it: a UUID, or its str form (``KVTransferFailedError.transfer_id``
    and the other errors' ids are strings)."""
    if isinstance(transfer_id, uuid.UUID):
        return transfer_id
    if not isinstance(transfer_id, str):
        raise TypeError(f"transfer_id must be a uuid.UUID or its str form, got {type(transfer_id).__name__}")
    try:
        return uuid.UUID(transfer_id)
    except ValueError:
        raise ValueError(f"transfer_id {transfer_id[:80]!r} is not a UUID") from None


def _endpoint(rank: int, handle: Any) -> str:
    return f"rank_{rank}:{getattr(handle, 'device', None) or 'cpu'}"


def _tensor_bytes(tensor: Any) -> bytes:
    """The raw bytes of a torch tensor or numpy array (copied to host, C order)."""
    if hasattr(tensor, "detach"):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        import torch

        return bytes(t.view(torch.uint8).numpy().tobytes())
    return bytes(np.ascontiguousarray(tensor).tobytes())


def _write_bytes(tensor: Any, data: bytes | bytearray) -> None:
    """Fills ``tensor`` (torch or numpy, same byte size) with ``data`` in place."""
    if hasattr(tensor, "detach"):
        import torch

        writable = data if isinstance(data, bytearray) else bytearray(data)  # torch wants a writable buffer
        src = torch.frombuffer(writable, dtype=torch.uint8).view(tensor.dtype).reshape(tensor.shape)
        with torch.no_grad():
            tensor.copy_(src.to(tensor.device))
        return
    view = np.frombuffer(data, dtype=tensor.dtype).reshape(tensor.shape)
    np.copyto(tensor, view)


def _frame_fields(compressed: bool, payload: int, raw: int, crc: int | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"total_bytes": payload, "checksum": None if crc is None else f"{crc:08x}"}
    if compressed:
        # The protocol's CompressionType has no zlib member; original_size tells the ratio.
        fields.update(is_compressed=True, original_size=raw)
    return fields


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


def _metadata_count(extra: dict[str, Any], key: str, default: int, *, allow_zero: bool = False) -> int:
    """``handle.metadata[key]`` (``default`` when absent) as the record's count: an int (not a bool, a
    float or a string), TypeError / ValueError naming the key otherwise; int() truncated 2.7 to 2."""
    return positive_int(f"handle.metadata[{key!r}]", extra.get(key, default), allow_zero=allow_zero)


def _handle_metadata(
    transfer_id: uuid.UUID, handle: Any, tensor: Any, src: str, dst: str, sending: bool
) -> KVTransferMetadata:
    extra: dict[str, Any] = dict(getattr(handle, "metadata", None) or {})
    heads_key = "num_heads" if "num_heads" in extra else "num_kv_heads"
    return KVTransferMetadata(
        transfer_id=transfer_id,
        request_id=str(getattr(handle, "request_id", None) or "unknown"),
        trace_id=str(extra.get("trace_id", "unknown")),
        layer_start=0,
        layer_end=_metadata_count(extra, "num_layers", 1, allow_zero=True),
        token_start=int(getattr(handle, "token_start", 0)),
        token_end=int(getattr(handle, "token_end", 0) or getattr(handle, "num_tokens", 0)),
        num_heads=_metadata_count(extra, heads_key, _dim(tensor, -2)),
        head_dim=_metadata_count(extra, "head_dim", _dim(tensor, -1)),
        dtype=getattr(handle, "dtype", DType.FP16),
        layout=getattr(handle, "layout", Layout.CONTIGUOUS),
        total_bytes=_nbytes(tensor),
        direction=TransferDirection.SEND if sending else TransferDirection.RECV,
        source_device=src,
        target_device=dst,
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
