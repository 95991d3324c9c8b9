"""The vLLM 0.33 OffloadingSpec on our trie + host pool: manager contract, worker bytes, vLLM's real scheduler.

Skipped without vLLM (it is an optional integration; CI installs vllm==0.33.0 without its CUDA deps).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import tempfile
import warnings
from typing import Any

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
pytest.importorskip("vllm")

with warnings.catch_warnings():  # vLLM's import chain trips deprecation warnings in torch
    warnings.simplefilter("ignore", DeprecationWarning)
    from vllm import SamplingParams
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import OffloadingWorkerMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector
    from vllm.forward_context import ForwardContext
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import (
        get_request_block_hasher,
        init_none_hash,
        resolve_kv_cache_block_sizes,
    )
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.worker.utils import allocate_kv_cache

import numpy as np
import torch
from sagellm_kv_cache.integrations.vllm_offload import (
    SageLoadStoreSpec,
    SageOffloadingManager,
    SageOffloadingSpec,
    SageOffloadingWorker,
    key_digest,
)
from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
    LookupResult,
    Medium,
    ReqContext,
    make_offload_key,
)
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)

CTX = ReqContext("r0")


def keys(*ids: int, group: int = 0) -> list[bytes]:
    return [make_offload_key(i.to_bytes(32, "big"), group) for i in ids]


def stored(m: SageOffloadingManager, ks: list[bytes]) -> None:
    out = m.prepare_store(ks, CTX)
    assert out is not None
    m.complete_store(out.keys_to_store, CTX)


# --- manager contract ------------------------------------------------------------------------


def test_key_digest_separates_groups() -> None:
    a, b = keys(5, group=0)[0], keys(5, group=1)[0]
    assert key_digest(a) != key_digest(b) and len(key_digest(a)) == 32
    assert key_digest(b"abc" + (3).to_bytes(4, "big")) == b"abc\0\0\0\3".ljust(32, b"\0")
    assert key_digest(a) == key_digest(bytes(a))


def test_not_readable_before_complete_store() -> None:
    m = SageOffloadingManager(4)
    k = keys(1)
    assert m.lookup(k[0], CTX) is LookupResult.MISS
    out = m.prepare_store(k, CTX)
    assert out is not None and out.keys_to_store == k and out.evicted_keys == []
    assert m.lookup(k[0], CTX) is LookupResult.HIT_PENDING
    with pytest.raises(KeyError):
        m.prepare_load(k, CTX)
    m.complete_store(k, CTX)
    assert m.lookup(k[0], CTX) is LookupResult.HIT
    # a second store of a resident or pending key stores nothing
    again = m.prepare_store(k, CTX)
    assert again is not None and again.keys_to_store == []


def test_failed_store_frees_the_slot_and_stays_a_miss() -> None:
    m = SageOffloadingManager(1)
    out = m.prepare_store(keys(1), CTX)
    assert out is not None
    m.complete_store(out.keys_to_store, CTX, success=False)
    assert m.lookup(keys(1)[0], CTX) is LookupResult.MISS
    assert m.stats()["free_chunks"] == 1


def test_loading_key_is_not_evictable_until_complete_load() -> None:
    m = SageOffloadingManager(2)
    stored(m, keys(1, 2))
    spec = m.prepare_load(keys(1, 2), CTX)
    assert isinstance(spec, SageLoadStoreSpec) and len(spec.block_ids) == 2
    assert m.prepare_store(keys(3), CTX) is None  # both pinned: nothing can be freed
    assert m.lookup(keys(1)[0], CTX) is LookupResult.HIT
    m.complete_load(keys(2), CTX)
    out = m.prepare_store(keys(3), CTX)
    assert out is not None and out.evicted_keys == keys(2)
    assert m.lookup(keys(1)[0], CTX) is LookupResult.HIT
    assert m.lookup(keys(2)[0], CTX) is LookupResult.MISS


def test_prepare_store_none_when_all_pending() -> None:
    m = SageOffloadingManager(2)
    assert m.prepare_store(keys(1, 2), CTX) is not None
    assert m.prepare_store(keys(3), CTX) is None
    assert m.stats()["pending_chunks"] == 2


def test_store_keeps_key_order_and_skips_resident_keys() -> None:
    m = SageOffloadingManager(8)
    stored(m, keys(4))
    out = m.prepare_store(keys(7, 4, 2, 9), CTX)
    assert out is not None and out.keys_to_store == keys(7, 2, 9)
    slots = out.store_spec.block_ids.tolist()
    assert len(set(slots)) == 3
    m.complete_store(out.keys_to_store, CTX)
    assert m.prepare_load(keys(7, 2, 9), CTX).block_ids.tolist() == slots


def test_eviction_is_lru_by_load_and_store_and_spares_the_call_keys() -> None:
    m = SageOffloadingManager(3)
    stored(m, keys(1))
    stored(m, keys(2))
    stored(m, keys(3))
    m.prepare_load(keys(1), CTX)
    m.complete_load(keys(1), CTX)  # 1 is now the most recent; 2 is the LRU
    out = m.prepare_store(keys(2, 4), CTX)  # 2 is part of this call: not a victim
    assert out is not None and out.keys_to_store == keys(4) and out.evicted_keys == keys(3)
    assert m.lookup(keys(2)[0], CTX) is LookupResult.HIT


def test_events_carry_the_cpu_medium() -> None:
    m = SageOffloadingManager(1, enable_events=True)
    stored(m, keys(1))
    stored(m, keys(2))
    events = list(m.take_events())
    assert [(e.removed, e.keys, e.medium) for e in events] == [
        (False, keys(1), Medium.CPU), (True, keys(1), Medium.CPU), (False, keys(2), Medium.CPU)]
    assert list(m.take_events()) == []


def test_bad_capacity_is_a_value_error() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            SageOffloadingManager(bad)  # type: ignore[arg-type]


def _config(groups: int = 1, extra: dict[str, object] | None = None, bpc: int = 1) -> OffloadingConfig:
    return OffloadingConfig(
        groups=tuple(OffloadingGroupConfig(tokens_per_block=16, layer_names=(f"l{g}",), group_id=g)
                     for g in range(groups)),
        worker_kv_bytes_per_block=1024, enable_kv_cache_events=True,
        extra_config=extra if extra is not None else {"cpu_bytes_to_use": 1024 * 64},
        engine_id="e", model=OffloadingModelConfig(name="m", dtype="float16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=bpc),
        parallel=OffloadingParallelConfig(rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
                                          data_parallel_index=0, data_parallel_size=1,
                                          data_parallel_rank_local=None, is_parallelism_agnostic=True))


def test_spec_sizes_the_tier_and_refuses_hybrid_models() -> None:
    spec = SageOffloadingSpec(_config(bpc=2))
    assert spec.num_chunks == 32
    manager = spec.get_manager()
    assert isinstance(manager, SageOffloadingManager) and manager is spec.get_manager()
    with pytest.raises(ValueError, match="one KV-cache group"):
        SageOffloadingSpec(_config(groups=2))
    with pytest.raises(ValueError, match="cpu_bytes_to_use"):
        SageOffloadingSpec(_config(extra={}))


def test_reset_cache_keeps_only_pinned_chunks() -> None:
    m = SageOffloadingManager(4)
    stored(m, keys(1))
    stored(m, keys(2))
    m.prepare_load(keys(1), CTX)
    m.reset_cache()
    assert m.lookup(keys(1)[0], CTX) is LookupResult.HIT and m.lookup(keys(2)[0], CTX) is LookupResult.MISS
    m.complete_load(keys(1), CTX)
    assert m.stats()["free_chunks"] == 3 and m.stats()["resident_chunks"] == 1


# --- worker: bytes between vLLM's canonical views and our pool ---------------------------------


def _canonical(layer_outer: bool, num_blocks: int = 12, page: int = 64, layers: int = 3
               ) -> tuple[CanonicalKVCaches, torch.Tensor]:
    if layer_outer:  # one (num_blocks, page) view per layer over one buffer
        raw = torch.randint(-128, 127, (layers, num_blocks, page), dtype=torch.int8)
        tensors = [CanonicalKVCacheTensor(raw[i], page) for i in range(layers)]
        refs = [CanonicalKVCacheRef(i, page) for i in range(layers)]
    else:  # block-outer: one packed tensor, every layer refers to it
        raw = torch.randint(-128, 127, (num_blocks, layers * page), dtype=torch.int8)
        tensors = [CanonicalKVCacheTensor(raw, layers * page)]
        refs = [CanonicalKVCacheRef(0, page) for _ in range(layers)]
    return CanonicalKVCaches(tensors=tensors, group_data_refs=[refs]), raw


def _block(raw: torch.Tensor, layer_outer: bool, b: int) -> torch.Tensor:
    return raw[:, b].clone() if layer_outer else raw[b].clone()


@pytest.mark.parametrize("layer_outer", [True, False])
@pytest.mark.parametrize("bpc", [1, 2, 4])
def test_worker_store_then_load_is_byte_exact(layer_outer: bool, bpc: int) -> None:
    kv, raw = _canonical(layer_outer)
    worker = SageOffloadingWorker(kv, num_chunks=6, blocks_per_chunk=bpc)
    n_chunks = 2
    n = n_chunks * bpc
    src_blocks = [3, 7, 1, 10, 0, 5, 11, 2][:n]
    before = [_block(raw, layer_outer, b) for b in src_blocks]
    slots = SageLoadStoreSpec(list(range(5, 5 - n_chunks, -1)))
    assert worker.submit_store(1, GPULoadStoreSpec(src_blocks, [n], [0]), slots)
    raw.zero_()
    # load into other blocks, starting from the second block of the first chunk when bpc > 1
    skip = 1 if bpc > 1 else 0
    dst = [0, 2, 4, 5, 6, 8, 9, 11][: n - skip]
    assert worker.submit_load(2, slots, GPULoadStoreSpec(dst, [len(dst)], [skip]))
    for d, want in zip(dst, before[skip:], strict=True):
        assert torch.equal(_block(raw, layer_outer, d), want)
    untouched = set(range(12)) - set(dst)
    assert all(not _block(raw, layer_outer, b).any() for b in untouched)
    done = worker.get_finished()
    assert [(r.job_id, r.success) for r in done] == [(1, True), (2, True)] and worker.get_finished() == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_worker_round_trip_with_cuda_kv() -> None:
    kv, raw = _canonical(True)
    raw_gpu = raw.cuda()
    kv = CanonicalKVCaches(tensors=[CanonicalKVCacheTensor(raw_gpu[i], 64) for i in range(raw.shape[0])],
                           group_data_refs=kv.group_data_refs)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2)
    slots = SageLoadStoreSpec([3, 1])
    worker.submit_store(1, GPULoadStoreSpec([0, 1, 2, 3], [4], [0]), slots)
    raw_gpu[:, 4:8].zero_()
    worker.submit_load(2, slots, GPULoadStoreSpec([4, 5, 6, 7], [4], [0]))
    assert torch.equal(raw_gpu[:, 4:8].cpu(), raw[:, 0:4])


def test_worker_rejects_a_mismatched_chunk_count() -> None:
    kv, _ = _canonical(True)
    worker = SageOffloadingWorker(kv, num_chunks=4, blocks_per_chunk=2)
    with pytest.raises(ValueError, match="chunks"):
        worker.submit_store(1, GPULoadStoreSpec([1, 2, 3, 4], [4], [0]), SageLoadStoreSpec([0]))


def test_worker_with_manager_slots_round_trip() -> None:
    kv, raw = _canonical(True, num_blocks=8)
    m = SageOffloadingManager(2)
    worker = SageOffloadingWorker(kv, num_chunks=2, blocks_per_chunk=1)
    want = {b: _block(raw, True, b) for b in range(8)}
    for b in range(4):  # store block b under key b; capacity 2 evicts as it goes
        out = m.prepare_store(keys(b), CTX)
        assert out is not None
        worker.submit_store(b, GPULoadStoreSpec([b], [1], [0]), out.store_spec)
        m.complete_store(out.keys_to_store, CTX)
    raw.zero_()
    resident = [b for b in range(4) if m.lookup(keys(b)[0], CTX) is LookupResult.HIT]
    assert resident == [2, 3]
    spec = m.prepare_load(keys(*resident), CTX)
    worker.submit_load(9, spec, GPULoadStoreSpec([6, 7], [2], [0]))
    m.complete_load(keys(*resident), CTX)
    assert torch.equal(_block(raw, True, 6), want[2]) and torch.equal(_block(raw, True, 7), want[3])
    assert np.array_equal(np.sort(spec.block_ids), np.array([0, 1], dtype=np.int32))



# --- vLLM's real scheduler + OffloadingConnector (both roles) with our spec, KV memory on the CPU ----------

LAYERS, HEADS, HEAD_DIM = 2, 2, 8
SAMPLED = 7  # the token the fake model always samples
_MODEL: Any = None


def model_config() -> Any:
    """A weights-free llama config (built once: vLLM inspects the architecture in a subprocess)."""
    global _MODEL
    if _MODEL is None:
        d = tempfile.mkdtemp(prefix="sage-vllm-model-")
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                       "hidden_size": HEADS * HEAD_DIM * 2,
                       "intermediate_size": 64, "num_attention_heads": HEADS * 2, "num_key_value_heads": HEADS,
                       "head_dim": HEAD_DIM, "num_hidden_layers": LAYERS, "vocab_size": 32000,
                       "max_position_embeddings": 8192, "torch_dtype": "float32"}, f)
        _MODEL = ModelConfig(model=d, dtype="float32", seed=0, skip_tokenizer_init=True)
    return _MODEL


def pattern(block_hash: bytes, n: int) -> torch.Tensor:
    """The bytes our fake model writes into a full block: a function of the block's hash only."""
    seed = hashlib.sha256(block_hash).digest()
    reps = -(-n // len(seed))
    return torch.frombuffer(bytearray(seed * reps), dtype=torch.int8)[:n].clone()


class Engine:
    """One scheduler (with the connector's scheduler role) and one worker connector, CPU KV memory."""

    def __init__(self, *, block_size: int = 4, num_gpu_blocks: int = 32, num_chunks: int = 64,
                 blocks_per_chunk: int = 1, max_tokens_per_step: int = 64, max_seqs: int = 8,
                 layout: str = "LBNHC", prefix_caching: bool = True, async_scheduling: bool = False) -> None:
        self.block_size = block_size
        extra: dict[str, Any] = {"spec_name": "SageOffloadingSpec",
                                 "spec_module_path": "sagellm_kv_cache.integrations.vllm_offload",
                                 "num_chunks": num_chunks, "offload_prompt_only": False}
        if blocks_per_chunk > 1:
            extra["block_size"] = block_size * blocks_per_chunk
        cfg = VllmConfig(
            model_config=model_config(),
            scheduler_config=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens_per_step,
                                             max_model_len=4096, enable_chunked_prefill=True,
                                             is_encoder_decoder=False),
            cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
            kv_transfer_config=KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                                                kv_connector_extra_config=extra),
            device_config=DeviceConfig("cpu"),
        )
        cfg.cache_config.kv_cache_layout = layout
        cfg.cache_config.num_gpu_blocks = num_gpu_blocks
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.float32)
        names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
        page = spec.page_size_bytes
        layer_outer = layout.startswith("L")
        kv_config = KVCacheConfig(
            num_blocks=num_gpu_blocks,
            kv_cache_tensors=[KVCacheTensor(size=page * num_gpu_blocks * LAYERS, layers=names,
                                            layer_stride=page * num_gpu_blocks if layer_outer else page,
                                            block_stride=page if layer_outer else page * LAYERS)],
            kv_cache_groups=[KVCacheGroupSpec(names, spec)],
        )
        sched_bs, hash_bs = resolve_kv_cache_block_sizes(kv_config, cfg)
        cfg.scheduler_config.async_scheduling = async_scheduling
        self.async_scheduling = async_scheduling
        self._previous: tuple[Any, Any] | None = None  # async: the step whose output is still to apply
        scheduler_cls = AsyncScheduler if async_scheduling else Scheduler
        self.scheduler = scheduler_cls(vllm_config=cfg, kv_cache_config=kv_config, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(cfg), block_size=sched_bs,
                                   hash_block_size=hash_bs)
        self.worker = OffloadingConnector(cfg, KVConnectorRole.WORKER, kv_config)
        self.kv = allocate_kv_cache(kv_config, torch.device("cpu"), KVCacheLayout[layout])
        with set_current_vllm_config(cfg):
            self.worker.register_kv_caches(self.kv)
        cw = self.worker.connector_worker
        assert cw is not None and isinstance(cw.spec, SageOffloadingSpec)
        self.spec = cw.spec
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(block_size, sha256)
        self.ctx = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={})
        self.next_id = 0
        self.checked_blocks = 0
        self.hit_tokens = 0
        self.prompt_tokens = 0
        self.preemptions = 0

    @property
    def sage_worker(self) -> SageOffloadingWorker:
        w = self.spec._worker
        assert w is not None
        return w

    def add(self, tokens: list[int], max_tokens: int = 2) -> str:
        rid = f"r{self.next_id}"
        self.next_id += 1
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        req = Request(request_id=rid, prompt_token_ids=tokens, sampling_params=sp, pooling_params=None,
                      block_hasher=self.hasher)
        self.scheduler.add_request(req)
        self.prompt_tokens += len(tokens)
        return rid

    def _token_bytes(self, name: str, position: int, token: int, n: int) -> torch.Tensor:
        return pattern(f"{name}:{position}:{token}".encode(), n)

    def _check_block(self, block_id: int, index: int, tokens: list[int]) -> None:
        """A reused block holds, for each of its token slots, the bytes of that position and token."""
        for name, t in self.kv.items():
            for slot in range(self.block_size):
                pos = index * self.block_size + slot
                got = t[block_id][:, slot].contiguous().view(torch.int8).reshape(-1)
                want = self._token_bytes(name, pos, tokens[pos], got.numel())
                assert torch.equal(got, want), f"block id {block_id} (request block {index}) of {name} is wrong"

    def _write_token(self, block_id: int, position: int, token: int) -> None:
        """What the forward pass does: K/V of one token, a function of its position and token id."""
        for name, t in self.kv.items():
            row = t[block_id][:, position % self.block_size]
            want = self._token_bytes(name, position, token, row.numel() * row.element_size())
            row.copy_(want.view(row.dtype).reshape(row.shape))

    def _check_and_write(self, out: Any) -> None:
        """Before 'computing': every full block below the computed prefix holds its tokens' bytes.
        Then write the K/V of the tokens this step computes."""
        mgr = self.scheduler.kv_cache_manager
        for rid, n_sched in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            end = req.num_computed_tokens  # schedule() already advanced it by n_sched
            start = end - n_sched
            ids = mgr.get_block_ids(rid)[0]
            tokens = list(req.all_token_ids)
            for i in range(min(start, len(tokens)) // self.block_size):
                self._check_block(ids[i], i, tokens)
                self.checked_blocks += 1
            for pos in range(start, end):
                # async scheduling runs one token ahead of the output: the harness always samples 7
                token = tokens[pos] if pos < len(tokens) else SAMPLED
                self._write_token(ids[pos // self.block_size], pos, token)

    def step(self) -> None:
        out = self.scheduler.schedule()
        self.preemptions += len(getattr(out, "preempted_req_ids", None) or ())
        for r in out.scheduled_new_reqs:
            self.hit_tokens += r.num_computed_tokens
        meta = pickle.loads(pickle.dumps(out.kv_connector_metadata))  # the process boundary
        self.worker.handle_preemptions(meta)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(self.ctx)
        self._check_and_write(out)
        self.worker.wait_for_save()
        sending, recving = self.worker.get_finished(out.finished_req_ids)
        wmeta = self.worker.build_connector_worker_meta() or OffloadingWorkerMetadata()
        self.worker.clear_connector_metadata()
        reqs = self.scheduler.running
        ids = [r.request_id for r in reqs]
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=[[SAMPLED] if r in out.num_scheduled_tokens else [] for r in ids],
                                logprobs=None, prompt_logprobs_dict={}, pooler_output=None,
                                kv_connector_output=KVConnectorOutput(
                                    finished_sending=sending, finished_recving=recving, invalid_block_ids=set(),
                                    kv_connector_worker_meta=pickle.loads(pickle.dumps(wmeta))))
        if not self.async_scheduling:
            self.scheduler.update_from_output(out, mro)
            return
        if self._previous is not None:  # async: the model's output arrives one step late
            self.scheduler.update_from_output(*self._previous)
        self._previous = (out, mro)

    def drain(self, max_steps: int = 10_000) -> None:
        cs = self.scheduler.connector.connector_scheduler  # type: ignore[union-attr]
        for _ in range(max_steps):
            if not self.scheduler.requests and not cs._jobs and not self.scheduler.finished_req_ids:
                if self._previous is None:
                    return
                self.scheduler.update_from_output(*self._previous)
                self._previous = None
                continue
            self.step()
        raise AssertionError("engine did not drain")


def _scheduler_connector(e: Engine) -> Any:
    return e.scheduler.connector.connector_scheduler  # type: ignore[union-attr]


@pytest.mark.parametrize(("layout", "bpc", "async_scheduling"), [
    ("LBNHC", 1, False), ("BLNHC", 1, False), ("LBHNC", 1, False), ("LBNHC", 2, False), ("LBNHC", 4, False),
    ("LBNHC", 1, True), ("BLNHC", 2, True)])
def test_vllm_scheduler_stores_evicts_and_reloads_byte_exact(layout: str, bpc: int, async_scheduling: bool) -> None:
    """Real scheduler + connector: every reused block holds its own bytes; preemption included."""
    # sized so that the GPU cache preempts and the host tier both evicts and serves reloads
    e = Engine(num_gpu_blocks=20, num_chunks={1: 36, 2: 18, 4: 7}[bpc], blocks_per_chunk=bpc, max_tokens_per_step=32,
               max_seqs=4, layout=layout, async_scheduling=async_scheduling)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(30)] for _ in range(4)]
    for _ in range(3):
        for p in prompts:
            e.add(p, max_tokens=12)
        e.drain()
    manager = _scheduler_connector(e).manager
    assert isinstance(manager, SageOffloadingManager)
    stats = manager.stats()
    w = e.sage_worker
    assert e.preemptions > 0, "the GPU cache is small enough to force preemption"
    assert w.stored_blocks > 0 and w.loaded_blocks > 0 and stats["hit_blocks"] > 0
    assert stats["evictions"] > 0, "the host tier is small enough to evict"
    assert e.checked_blocks > 100
    assert stats["pending_chunks"] == 0 and stats["in_use_blocks"] == 0  # every store / load completed


def test_complete_load_accepts_reordered_keys_and_tails_evict_first() -> None:
    m = SageOffloadingManager(3)
    ctx = ReqContext("chain")
    out = m.prepare_store(keys(1, 2, 3), ctx)  # one request's blocks in prefix order: a chain 1 <- 2 <- 3
    assert out is not None
    m.complete_store(out.keys_to_store, ctx)
    m.prepare_load(keys(1, 2, 3), ctx)
    m.complete_load(keys(3, 1, 2), ctx)  # same keys, another order: every pin released exactly once
    assert m.stats()["in_use_blocks"] == 0
    out = m.prepare_store(keys(10), CTX)
    # only the chain's tail is a leaf: it goes first, the prefix 1 <- 2 stays loadable
    assert out is not None and out.evicted_keys == keys(3)
    assert [m.lookup(k, CTX) for k in keys(1, 2, 3)] == [LookupResult.HIT, LookupResult.HIT, LookupResult.MISS]


def test_mooncake_trace_through_vllm_scheduler_matches_our_replay() -> None:
    """The sample Mooncake trace through vLLM's scheduler (GPU prefix cache off, so every reused block
    comes from our tier) hits like our own replay of the trace at the same capacity."""
    from sagellm_kv_cache.replay import load_trace, replay, sample_trace_path

    requests = load_trace(sample_trace_path())
    distinct = len(np.unique(np.concatenate(requests)))
    longest = max(len(r) for r in requests)
    blocks = sum(len(r) for r in requests)
    capacity = distinct // 4
    ours = replay(requests, capacity)
    e = Engine(num_gpu_blocks=longest + 8, num_chunks=capacity, max_tokens_per_step=4 * longest + 64, max_seqs=1,
               prefix_caching=False)
    for ids in requests:  # one trace block = one vLLM block of 4 tokens named by its hash id
        e.add([int(i) % 30_000 for i in ids for _ in range(4)] + [1], max_tokens=1)
        e.drain()
    stats = _scheduler_connector(e).manager.stats()
    assert ours.evictions > 0 and stats["evictions"] > 0
    vllm_ratio = e.sage_worker.loaded_blocks / blocks
    assert ours.hit_ratio > 0.02
    assert abs(vllm_ratio - ours.hit_ratio) <= 0.005, (vllm_ratio, ours.hit_ratio)
