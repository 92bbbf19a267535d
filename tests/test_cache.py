"""explorer.cache.KeyedCache: bounds, LRU order, one build per key under concurrency."""

import threading
import time

import torch

from explorer.cache import KeyedCache, tensor_bytes


def test_lru_order_and_count_bound():
    c = KeyedCache(max_items=2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now most recent: b goes first
    c.put("c", 3)
    assert c.keys() == ["a", "c"]
    assert c.get("b") is None
    assert (c.hits, c.misses) == (1, 1)


def test_byte_bound_evicts_oldest_and_refuses_oversized():
    c = KeyedCache(max_bytes=100)
    c.put("x", torch.zeros(10))  # 40 bytes
    c.put("y", torch.zeros(10))  # 80
    c.put("z", torch.zeros(10))  # 120 > 100: x goes
    assert c.keys() == ["y", "z"] and c.nbytes == 80
    c.put("big", torch.zeros(100))  # 400 bytes alone: not kept, nothing else evicted
    assert "big" not in c and c.keys() == ["y", "z"]
    c.put("y", torch.zeros(5))  # replacing an entry re-counts its bytes
    assert c.nbytes == 60


def test_tensor_bytes_walks_containers_and_modules():
    lin = torch.nn.Linear(3, 2)  # 6 weights + 2 biases, fp32
    t = torch.zeros(4, dtype=torch.float64)
    assert tensor_bytes(lin) == 32
    assert tensor_bytes({"a": t, "b": [t, (lin,)]}) == 32 + 32  # t counted once


def test_one_build_per_key_across_threads():
    c = KeyedCache(max_items=4)
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.2)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(c.get_or_build("m", build)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(r is results[0] for r in results)


def test_build_of_one_key_does_not_block_another():
    c = KeyedCache(max_items=4)
    c.put("ready", 42)
    started = threading.Event()

    def slow():
        started.set()
        time.sleep(1.0)
        return 0

    t = threading.Thread(target=c.get_or_build, args=("slow", slow))
    t.start()
    started.wait()
    t0 = time.perf_counter()
    assert c.get_or_build("ready", lambda: -1) == 42
    assert time.perf_counter() - t0 < 0.5
    t.join()


def test_failed_build_is_not_cached_and_can_retry():
    c = KeyedCache(max_items=2)

    def fail():
        raise RuntimeError("no")

    try:
        c.get_or_build("k", fail)
    except RuntimeError:
        pass
    assert "k" not in c
    assert c.get_or_build("k", lambda: 5) == 5
