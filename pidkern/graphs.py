"""The CUDA-graph runtime of the fast path: a bounded cache of captured decodes.

One captured graph per decode shape (batch, latent size, text length, steps, sampler,
noise stream, plan overrides) holds its static input buffers and its output; a replay
copies new inputs into the buffers and reruns the whole decode without host work. See
docs/design.md, "CUDA graphs".
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


class GraphCache:
    """A bounded LRU of per-shape runners, each with its own lock.

    `factory(key)` builds a runner (a captured CUDA graph with its static buffers); the
    cache holds at most `capacity` of them and drops the least recently used, which
    frees its memory pool.
    """

    def __init__(self, factory, capacity: int = 2):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: expected at least 1 cached graph")
        self.factory = factory
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, key):
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
                return entry
            entry = Entry(self.factory(key), threading.Lock())
            self.builds += 1
            self._items[key] = entry
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return entry

    def keys(self):
        with self._lock:
            return list(self._items)

    def __len__(self):
        return len(self._items)


@dataclass
class Entry:
    runner: object
    lock: threading.Lock


@dataclass
class Runner:
    """A captured decode: replaying `graph` reads `bufs` and writes `out`."""
    graph: object
    bufs: dict
    out: torch.Tensor

    def replay(self, **inputs) -> torch.Tensor:
        """Copy `inputs` (tensors named as in `bufs`) into the static buffers, replay,
        return a copy of the output. The caller holds the entry's lock."""
        for name, value in inputs.items():
            self.bufs[name].copy_(value)
        self.graph.replay()
        return self.out.clone()


def capture(run, device: torch.device, warm_ups: int = 2, pool=None) -> tuple[object, torch.Tensor]:
    """Capture `run()` in a CUDA graph after `warm_ups` eager runs on a side stream.

    `run(first)` gets first=True on the first warm-up, where the fast path races its
    plan's open choices (autotuning, the backend race, cuBLAS handles): all of it must
    happen before capture. The warm-up's freed blocks go back to the driver afterwards so
    only the graph's own pool stays. pool: a memory pool shared with other graphs
    (torch.cuda.graph_pool_handle()) that are never replayed at the same time."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(warm_ups):
            run(i == 0)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run(False)
    torch.cuda.empty_cache()
    return graph, out
