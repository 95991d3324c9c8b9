"""Our KV events against the real consumers: NVIDIA Dynamo's standalone KV indexer, and the decoders of
vLLM and SGLang (their own classes where importable, else an independent strict schema of their rules).

The scenario drives a real :class:`RadixPrefixCache`: shared prefixes (stored events with parent links),
evictions (removed events), a clear, a LoRA adapter and two salted tenants. A relay between our
publisher and Dynamo drops one batch on the way, so Dynamo must repair the gap through our replay
channel. Dynamo's ``/query`` answers must then equal the cache's own longest-prefix matches.

Dynamo's indexer is found through ``SAGELLM_KV_DYNAMO_PYTHON`` (an interpreter with
``ai-dynamo-runtime`` installed; ``scripts/test.sh`` makes one in its own venv, since it pins
pydantic) or the running interpreter; without either the Dynamo test skips, unless
``SAGELLM_KV_REQUIRE_DYNAMO=1`` says it must run.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from ports import free_port

pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

import zmq  # noqa: E402
from sagellm_kv_cache import RadixPrefixCache  # noqa: E402
from sagellm_kv_cache.observability.events import KVEventPublisher, decode_batch, wire_block_id  # noqa: E402
from tier_requests import serve  # noqa: E402

BLOCK = 4
MODEL = "sagellm-test"

# --- the scenario -----------------------------------------------------------------------------------


def tokens(*values: int) -> list[int]:
    """One block per value: [v, v+1000, v+2000, v+3000]."""
    return [v + 1000 * k for v in values for k in range(BLOCK)]


SHARED = (1, 2, 3)
STEPS: list[tuple[list[int], bytes | None, bytes | None] | None] = [  # (tokens, salt, extra); None: clear
    (tokens(*SHARED, 10, 11), None, None),
    (tokens(*SHARED, 20), None, None),  # a continuation: a stored event with a parent
    (tokens(*SHARED, 10, 11, 12, 13), None, None),
    (tokens(50, 51, 52), None, b"adapter-1"),  # a LoRA
    (tokens(*SHARED, 30), b"tenant-a", None),  # the same tokens for two tenants, kept apart
    (tokens(*SHARED, 31), b"tenant-b", None),
    (tokens(*SHARED, 30, 32), b"tenant-a", None),  # a salted continuation
    (tokens(60, 61, 62, 63), None, None),  # past capacity: LRU leaves are evicted
    (tokens(*SHARED, 20, 21), None, None),
    None,
    (tokens(*SHARED, 40), None, None),
    (tokens(*SHARED, 41, 42), b"tenant-b", None),
    (tokens(70, 71), None, b"adapter-1"),
    (tokens(70, 71, 72, 73, 74), None, None),
    (tokens(*SHARED, 40, 43, 44, 45), None, None),  # evicts again
    (tokens(*SHARED, 30, 32, 33), b"tenant-a", None),
]
KEYS: list[tuple[bytes | None, bytes | None]] = [(None, None), (b"tenant-a", None), (b"tenant-b", None),
                                                 (None, b"adapter-1")]
QUERIES = [(toks[:n], salt, extra) for step in STEPS if step is not None for toks in [step[0]]
           for n in (2 * BLOCK, len(toks)) for salt, extra in KEYS] + [(tokens(99, 98), None, None)]


class Scenario:
    """A metadata-only prefix cache whose events are published after every step."""

    def __init__(self, publisher: KVEventPublisher) -> None:
        self.cache = RadixPrefixCache(block_size=BLOCK, capacity_blocks=14, event_queue_capacity=4096)
        self.publisher = publisher
        self.ids = itertools.count()
        self.kinds: dict[str, int] = {}

    def step(self, step: tuple[list[int], bytes | None, bytes | None] | None) -> None:
        if step is None:
            self.cache.clear()
        else:
            toks, salt, extra = step
            ids = np.array([next(self.ids) for _ in range(len(toks) // BLOCK)], dtype=np.int32)
            self.cache.insert_tokens(np.array(toks, dtype=np.int64), ids, salt=salt, extra=extra)
        self.publish()

    def publish(self) -> None:
        """One batch per step, as ``publish_prefix_events`` sends them."""
        events = self.cache.drain_events()
        for event in events:
            kind = event["type"] + ("+parent" if event.get("parent") is not None else "")
            kind += "+salt" if "cache_salt" in event else ""
            kind += "+lora" if event.get("extra_key") is not None else ""
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if events:
            self.publisher.publish(events)

    def run(self) -> None:
        for step in STEPS:
            self.step(step)

    def expected(self, toks: list[int], salt: bytes | None, extra: bytes | None) -> int:
        """The cache's own longest-prefix match, in blocks."""
        digests = self.cache.hash_tokens(np.array(toks, dtype=np.int64), salt=salt, extra=extra)
        return self.cache.peek(digests)[0]


# --- a lossy relay ----------------------------------------------------------------------------------


class LossyRelay:
    """SUB from our publisher, PUB to the router; drops the batches whose seq is in ``drop`` (a lossy
    network, the error path replay exists for) and keeps every payload it saw."""

    def __init__(self, upstream: str, drop: set[int]) -> None:
        self.drop = drop
        self.payloads: dict[int, bytes] = {}
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(upstream)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.bind("tcp://127.0.0.1:*")
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            if not self._sub.poll(20, zmq.POLLIN):
                continue
            topic, seq_frame, payload = self._sub.recv_multipart()
            seq = int.from_bytes(seq_frame, "big")
            self.payloads[seq] = payload
            if seq not in self.drop:
                self._pub.send_multipart([topic, seq_frame, payload])

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self._sub.close(linger=0)
        self._pub.close(linger=0)
        self._ctx.term()


# --- NVIDIA Dynamo's standalone indexer --------------------------------------------------------------


def dynamo_python() -> str | None:
    configured = os.environ.get("SAGELLM_KV_DYNAMO_PYTHON")
    if configured:
        return configured if Path(configured).exists() else None
    try:
        found = importlib.util.find_spec("dynamo.indexer") is not None
    except ModuleNotFoundError:
        found = False
    return sys.executable if found else None


class Indexer:
    def __init__(self, python: str, log: Path) -> None:
        self.base = f"http://127.0.0.1:{free_port()}"
        self.log_path = log
        self._log = log.open("w")
        env = {**os.environ, "NO_COLOR": "1", "RUST_LOG_STYLE": "never"}
        self.proc = subprocess.Popen([python, "-m", "dynamo.indexer", "--port", self.base.rsplit(":", 1)[1],
                                      "--threads", "1"], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dynamo.indexer exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise AssertionError("dynamo.indexer did not come up")

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def matched_blocks(self, toks: list[int], salt: bytes | None, extra: bytes | None) -> int:
        body: dict[str, Any] = {"token_ids": toks, "model_name": MODEL}
        if salt is not None:
            body["cache_salt"] = salt.decode()
        if extra is not None:
            body["lora_name"] = extra.decode()
        scores = self.post("/query", body)["scores"]
        return int(scores.get("1", {}).get("0", 0)) // BLOCK

    def tiered_blocks(self, toks: list[int], salt: bytes | None, extra: bytes | None) -> tuple[int, int, int]:
        """Dynamo's per-tier match (``instances``): blocks on the device, then reached through the host,
        then through the disk."""
        body: dict[str, Any] = {"token_ids": toks, "model_name": MODEL}
        if salt is not None:
            body["cache_salt"] = salt.decode()
        if extra is not None:
            body["lora_name"] = extra.decode()
        row = self.post("/query", body).get("instances", {}).get("1", {})
        return row.get("gpu", 0) // BLOCK, row.get("cpu", 0) // BLOCK, row.get("disk", 0) // BLOCK

    def log(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))  # it colours regardless

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def indexer(tmp_path: Path) -> Iterator[Indexer]:
    python = dynamo_python()
    if python is None:
        if os.environ.get("SAGELLM_KV_REQUIRE_DYNAMO") == "1":  # CI installs it: a skip there would hide a failure
            pytest.fail("SAGELLM_KV_REQUIRE_DYNAMO=1 but no interpreter with ai-dynamo-runtime was found")
        pytest.skip("ai-dynamo-runtime is not installed (set SAGELLM_KV_DYNAMO_PYTHON or pip install it)")
    running = Indexer(python, tmp_path / "indexer.log")
    try:
        yield running
    finally:
        running.close()


def wait_for_answers(indexer: Any, ask: Any, expected: list[Any], when: str, ours: str) -> None:
    """Waits (up to 10 s) until Dynamo answers every query as ``expected``; fails naming the first
    differing queries, what ``ours`` says and what Dynamo says, with the indexer's log."""
    deadline = time.monotonic() + 10
    while (got := [ask(*q) for q in QUERIES]) != expected:
        if time.monotonic() > deadline:
            wrong = [(q, e, g) for q, e, g in zip(QUERIES, expected, got, strict=True) if e != g]
            raise AssertionError(f"{when}: {len(wrong)} of {len(QUERIES)} queries differ, (query, {ours}, dynamo): "
                                 f"{wrong[:4]}\n{indexer.log()[-3000:]}")
        time.sleep(0.05)


def warm_up(publisher: KVEventPublisher, indexer: Indexer) -> None:
    """Stores a probe block until Dynamo reports it (both hops of PUB/SUB have joined), then removes it."""
    probe = bytes(range(32))
    stored = {"type": "stored", "digests": [probe], "parent": None, "token_ids": tokens(777), "block_size": BLOCK,
              "extra_key": None}
    deadline = time.monotonic() + 30
    while indexer.matched_blocks(tokens(777), None, None) != 1:
        assert time.monotonic() < deadline, indexer.log()[-3000:]
        publisher.publish([stored])
        time.sleep(0.1)
    publisher.publish([{"type": "removed", "digests": [probe]}])


def test_dynamo_indexer_reproduces_our_matches(indexer: Indexer) -> None:
    """After every step of the scenario, every query gets the same answer from Dynamo as from the cache."""
    checked = matched = 0
    with KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as publisher:
        relay = LossyRelay(publisher.endpoint, drop=set())
        try:
            answer = indexer.post("/register", {"instance_id": 1, "endpoint": relay.endpoint, "model_name": MODEL,
                                                "block_size": BLOCK, "replay_endpoint": publisher.replay_endpoint})
            assert answer == {"status": "ok"}
            warm_up(publisher, indexer)
            relay.drop.add(publisher.next_seq + 2)  # the third scenario batch is lost on the way
            scenario = Scenario(publisher)
            for number, step in enumerate(STEPS):
                scenario.step(step)
                if publisher.next_seq - 1 in relay.drop:
                    continue  # Dynamo learns of the loss from the next batch, and replays then
                expected = [scenario.expected(*q) for q in QUERIES]
                wait_for_answers(indexer, indexer.matched_blocks, expected, f"step {number}", "cache")
                checked += len(QUERIES)
                matched += sum(expected)
                assert expected.count(0) > 0
        finally:
            relay.close()
    log = indexer.log()
    # The scenario exercised what it claims to.
    assert {"stored", "stored+parent", "removed", "cleared", "stored+salt", "stored+parent+salt",
            "stored+lora"} <= set(scenario.kinds), scenario.kinds
    complaints = [line for line in log.splitlines() if " WARN " in line or " ERROR " in line]
    assert complaints and all("Gap detected" in line for line in complaints), log[-3000:]  # gaps, nothing else
    assert "Failed to decode" not in log and "Replay complete" in log and publisher.replays_served >= 1
    print(f"dynamo: {checked} query answers over {len(STEPS)} steps equal the cache's ({matched} blocks matched); "
          f"events {scenario.kinds}; replays served {publisher.replays_served}")


# --- vLLM's and SGLang's decoders ---------------------------------------------------------------------


def scenario_payloads() -> list[bytes]:
    """The batches of the scenario as they go on the wire (recorded by a relay with nothing dropped)."""
    with KVEventPublisher("tcp://127.0.0.1:*") as publisher:
        relay = LossyRelay(publisher.endpoint, drop=set())
        try:
            deadline = time.monotonic() + 10
            while not relay.payloads:
                assert time.monotonic() < deadline
                publisher.publish([])
                time.sleep(0.02)
            first = publisher.next_seq
            Scenario(publisher).run()
            last = publisher.next_seq - 1
            while last not in relay.payloads:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            relay.close()
    return [relay.payloads[seq] for seq in range(first, last + 1)]


@pytest.fixture(scope="module")
def payloads() -> list[bytes]:
    return scenario_payloads()


@pytest.mark.parametrize("module", ["vllm.distributed.kv_events", "sglang.srt.disaggregation.kv_events"])
def test_engine_decoders_accept_every_batch(module: str, payloads: list[bytes]) -> None:
    msgspec = pytest.importorskip("msgspec")
    engine = pytest.importorskip(module)
    decoder = msgspec.msgpack.Decoder(type=engine.KVEventBatch)
    names = {"stored": "BlockStored", "removed": "BlockRemoved", "cleared": "AllBlocksCleared"}
    fields = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "medium", "lora_name")
    for payload in payloads:
        theirs = decoder.decode(payload)
        _, ours = decode_batch(payload)
        # Was: compared the event count with the batch count, wrong for every batch that evicts and
        # stores (skipped wherever the engine was not importable, so it never ran).
        assert [type(e).__name__ for e in theirs.events] == [names[e["type"]] for e in ours]
        assert theirs.data_parallel_rank == 0
        for their, our in zip(theirs.events, ours, strict=True):
            shared = [f for f in fields if f in our and hasattr(their, f)]  # SGLang has no extra_keys
            assert {f: getattr(their, f) for f in shared} == {f: our[f] for f in shared}
            if our["type"] == "stored" and hasattr(their, "extra_keys"):
                assert their.lora_id is None
                keys = None if our["extra_keys"] is None else [k if k is None else list(k) for k in our["extra_keys"]]
                assert [k if k is None else list(k) for k in their.extra_keys or []] == (keys or [])


def strict_schema(engine: Literal["vllm", "sglang"]) -> Any:
    pytest.importorskip("msgspec")
    from kv_event_schemas import DECODERS

    return DECODERS[engine]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_strict_schema_accepts_every_batch(engine: Literal["vllm", "sglang"], payloads: list[bytes]) -> None:
    decoder = strict_schema(engine)
    kinds: dict[str, int] = {}
    for payload in payloads:
        batch = decoder.decode(payload)
        for event in batch.events:
            name = type(event).__name__.removeprefix("Vllm").removeprefix("Sglang")
            kinds[name] = kinds.get(name, 0) + 1
            if name == "BlockStored":
                assert len(event.token_ids) == event.block_size * len(event.block_hashes) > 0
                assert all(0 <= h < 2**64 for h in [*event.block_hashes, event.parent_block_hash or 0])
                if event.extra_keys is not None:
                    assert len(event.extra_keys) == len(event.block_hashes)
                    assert event.lora_name is not None or event.cache_salt is not None
    assert kinds.keys() == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}, kinds


def test_strict_schema_rejects_what_the_engines_reject() -> None:
    """The schema is not a rubber stamp: the old array-like events, byte ids and a LoRA id in
    lora_id fail the way the issue saw vLLM, SGLang and Dynamo fail."""
    msgspec = pytest.importorskip("msgspec")
    decoder = strict_schema("vllm")
    digest = bytes(range(32))
    legacy = msgpack.packb([1.0, [["AllBlocksCleared"]], 0])
    with pytest.raises(msgspec.ValidationError, match=r"Expected `object`, got `array` - at `\$\[1\]\[0\]`"):
        decoder.decode(legacy)
    good = {"type": "BlockStored", "block_hashes": [wire_block_id(digest)], "parent_block_hash": None,
            "token_ids": tokens(1), "block_size": BLOCK, "lora_id": None, "medium": "GPU", "lora_name": None}
    decoder.decode(msgpack.packb([1.0, [good], 0]))
    for bad in ({**good, "block_hashes": [digest]}, {**good, "lora_id": 7}, {**good, "medium": "HBM"}):
        with pytest.raises(msgspec.ValidationError):
            decoder.decode(msgpack.packb([1.0, [bad], 0], use_bin_type=True))
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(msgpack.packb([1.0, [good]]))  # Dynamo needs the rank


def test_dynamo_follows_a_publisher_that_replaces_a_closed_one(indexer: Indexer) -> None:
    """Dynamo skips batches numbered at or below the last it saw: the replacing publisher goes on from
    ``first_seq=old.next_seq`` (a second one starting at 0 was ignored: its blocks never matched)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cache = RadixPrefixCache(block_size=BLOCK, event_queue_capacity=64)
    old = KVEventPublisher(endpoint)
    assert indexer.post("/register", {"instance_id": 1, "endpoint": endpoint, "model_name": MODEL,
                                      "block_size": BLOCK}) == {"status": "ok"}
    warm_up(old, indexer)
    for _ in range(1000):
        old.publish([])  # the old publisher got far ahead (of what warm_up sends in its 30 s)
    cache.insert_tokens(np.array(tokens(1, 2), dtype=np.int64), np.array([0, 1], dtype=np.int32))
    old.publish(cache.drain_events())
    old.close()
    cache.evict(2)
    cache.insert_tokens(np.array(tokens(5, 6), dtype=np.int64), np.array([2, 3], dtype=np.int32))
    with KVEventPublisher(endpoint, first_seq=old.next_seq) as new:
        warm_up(new, indexer)  # Dynamo takes the new publisher's batches at all
        new.publish(cache.drain_events())
        deadline = time.monotonic() + 10
        while (indexer.matched_blocks(tokens(5, 6), None, None), indexer.matched_blocks(tokens(1, 2), None, None)) \
                != (2, 0):
            assert time.monotonic() < deadline, indexer.log()[-3000:]
            time.sleep(0.05)


def test_dynamo_after_event_loss_claims_no_block_the_cache_lacks(indexer: Indexer) -> None:
    """The scenario through an event queue of 1: batches lose their oldest events and start with
    AllBlocksCleared. Dynamo then knows less than the cache, never more (no query is answered with
    blocks that were evicted), and still learns the chains stored after a loss."""
    with KVEventPublisher("tcp://127.0.0.1:*") as publisher:
        assert indexer.post("/register", {"instance_id": 1, "endpoint": publisher.endpoint, "model_name": MODEL,
                                          "block_size": BLOCK}) == {"status": "ok"}
        warm_up(publisher, indexer)
        scenario = Scenario(publisher)
        scenario.cache = RadixPrefixCache(block_size=BLOCK, capacity_blocks=14, event_queue_capacity=1)
        known = 0
        for number, step in enumerate(STEPS):
            scenario.step(step)
            expected = [scenario.expected(*q) for q in QUERIES]
            deadline = time.monotonic() + 10  # until Dynamo has applied the batch; a stale claim stays
            while True:
                got = [indexer.matched_blocks(*q) for q in QUERIES]
                over = [(q, e, g) for q, e, g in zip(QUERIES, expected, got, strict=True) if g > e]
                if not over:
                    break
                assert time.monotonic() < deadline, (f"step {number}: Dynamo claims evicted blocks {over[:4]}\n"
                                                     f"{indexer.log()[-3000:]}")
                time.sleep(0.05)
            known += sum(got)
    assert scenario.cache.stats()["events_dropped"] > 0 and scenario.kinds.get("cleared", 0) > 1
    assert known > 0


# --- the tiered cache: one medium per tier --------------------------------------------------------------


def tier_walk(tc: Any, toks: list[int], salt: bytes | None, extra: bytes | None) -> tuple[int, int, int]:
    """Blocks Dynamo's tiered match should report: the device prefix, then as far as the host continues
    it, then as far as the disk continues that (its walk goes down the tiers, never back up)."""
    digests = [row.tobytes() for row in tc.hash_tokens(np.array(toks, dtype=np.int64), salt=salt, extra=extra)]
    tiers = [tc.device.contains, lambda d: d in tc.host.index, lambda d: d in tc.disk.index]
    reach, out = 0, []
    for holds in tiers:
        while reach < len(digests) and holds(digests[reach]):
            reach += 1
        out.append(reach)
    return out[0], out[1], out[2]


def test_dynamo_indexer_follows_every_tier(indexer: Indexer, tmp_path: Path) -> None:
    """A tiered cache (device 3, host 4, disk 16 blocks) serves the scenario's prompts; after every step
    its events (medium GPU, CPU, DISK) reach Dynamo's indexer, whose per-tier match of every query
    (``instances``: gpu, cpu, disk) equals the tiers' own contents."""
    from sagellm_kv_cache.observability import publish_prefix_events
    from sagellm_kv_cache.paged import KVCacheSpec, PagedKVPool
    from sagellm_kv_cache.tiers import TieredPrefixCache

    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype="fp16", block_size=BLOCK)
    prompts = [step for step in STEPS if step is not None]
    reached = {"cpu": 0, "disk": 0}
    with (
        TieredPrefixCache(PagedKVPool(spec, 12), device_blocks=3, host_blocks=4, disk_dir=tmp_path, disk_blocks=16,
                          background=False, event_queue_capacity=4096) as tc,
        KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as publisher,
    ):
        assert indexer.post("/register", {"instance_id": 1, "endpoint": publisher.endpoint, "model_name": MODEL,
                                          "block_size": BLOCK, "replay_endpoint": publisher.replay_endpoint}) \
            == {"status": "ok"}
        warm_up(publisher, indexer)
        for number, (toks, salt, extra) in enumerate(prompts + prompts[:4]):  # the repeats hit the lower tiers
            serve(tc, toks, salt, extra)
            publish_prefix_events(tc, publisher)
            expected = [tier_walk(tc, *q) for q in QUERIES]
            wait_for_answers(indexer, indexer.tiered_blocks, expected, f"step {number}", "tiers")
            reached["cpu"] += sum(c > g for g, c, _ in expected)
            reached["disk"] += sum(d > c for _, c, d in expected)
        stats = tc.stats()
    assert reached["cpu"] > 0 and reached["disk"] > 0, reached  # queries that only the lower tiers answer
    assert stats["promoted_from_host"] > 0 and stats["promoted_from_disk"] > 0, stats
    log = indexer.log()
    assert " ERROR " not in log and "Failed to decode" not in log, log[-3000:]
    print(f"dynamo tiers: {len(QUERIES) * (len(prompts) + 4)} per-tier answers equal the tiers'; queries reaching "
          f"past the device: host {reached['cpu']}, disk {reached['disk']}; tier stats {stats['hits']}")
