"""Drives vLLM 0.33's real scheduler and OffloadingConnector (both roles) with our OffloadingSpec on the CPU.

The test suite (tests/python/test_vllm_offload.py) and the W8 benchmark use it; it needs vLLM installed
(``VLLM_TARGET_DEVICE=cpu``). A weights-free llama config.json stands in for the model; the KV memory
comes from vLLM's own ``allocate_kv_cache`` on the CPU; connector metadata is pickled between the two
roles as the process boundary would; the fake model writes per-token K/V that is a function of the token's
position and id, so every reused block can be checked byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import warnings
from typing import Any

import torch

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

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

from sagellm_kv_cache.integrations.vllm_offload import SageOffloadingSpec, SageOffloadingWorker

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
                 layout: str = "LBNHC", prefix_caching: bool = True, async_scheduling: bool = False,
                 spec_name: str = "SageOffloadingSpec",
                 spec_module_path: str = "sagellm_kv_cache.integrations.vllm_offload", verify: bool = True,
                 extra_config: dict[str, Any] | None = None) -> None:
        self.block_size = block_size
        extra: dict[str, Any] = {"spec_name": spec_name, "spec_module_path": spec_module_path,
                                 "num_chunks": num_chunks, "offload_prompt_only": False, **(extra_config or {})}
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
        self.steps = 0
        self.verify = verify  # False: no fake-model K/V writes or checks (benchmarks)

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
        self.steps += 1
        out = self.scheduler.schedule()
        self.preemptions += len(getattr(out, "preempted_req_ids", None) or ())
        for r in out.scheduled_new_reqs:
            self.hit_tokens += r.num_computed_tokens
        meta = pickle.loads(pickle.dumps(out.kv_connector_metadata))  # the process boundary
        self.worker.handle_preemptions(meta)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(self.ctx)
        if self.verify:
            self._check_and_write(out)
        self.worker.wait_for_save()
        sending, recving = self.worker.get_finished(out.finished_req_ids)
        wmeta = self.worker.build_connector_worker_meta() or OffloadingWorkerMetadata()
        self.worker.clear_connector_metadata()
        reqs = self.scheduler.running
        ids = [r.request_id for r in reqs]
        # As vLLM's model runner: a request still prefilling its prompt in chunks samples nothing (the
        # runner discards the token); schedule() set is_prefill_chunk for every scheduled request.
        sampled = [[SAMPLED] if r.request_id in out.num_scheduled_tokens and not r.is_prefill_chunk else []
                   for r in reqs]
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=sampled,
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


def scheduler_connector(e: Engine) -> Any:
    """The scheduler-role connector half (its ``manager`` is the spec's manager)."""
    return e.scheduler.connector.connector_scheduler  # type: ignore[union-attr]
