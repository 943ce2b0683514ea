"""Launch sequences replayed as CUDA graphs: an unload's host time per launch, paid once.

An unload launches the same kernels on the same tables at every unload; only the tables' contents
change. Launching them one by one cost the host of an H200 machine 7-45 µs each (a gluon launch
the most); the grouped updates of a 1B-shaped model took 395 µs of host time, replayed as one
graph 7 µs (``benchmarks/launch_costs.py``, docs/results/performance.md). ``GraphCache.run(key, body)``
runs ``body`` (a function that only launches GPU work: no host sync, no host-to-device copy of
new data, the same tensors every time) eagerly the first time, which also compiles its kernels;
captures it in a CUDA graph the second time; and from then on replays the graph. What ``body``
returned at capture (device tensors the graph writes) is returned again at every replay.

The caller keeps what the graph reads at fixed addresses and clears the cache whenever those
change (``UnloadPlan`` does on every rebuild). A capture that fails leaves that key eager.
``ENABLED = False`` (or ``PLORA_DISABLE_CUDA_GRAPHS=1`` in the environment) keeps every key eager.
"""

from __future__ import annotations

import os
import warnings

import torch

ENABLED = os.environ.get("PLORA_DISABLE_CUDA_GRAPHS", "0") in ("", "0")

_WARM, _EAGER = "warm", "eager"


class GraphCache:
    """Per key: eager, then captured, then replayed (see the module's docstring)."""

    def __init__(self):
        self._entries: dict = {}

    def clear(self) -> None:
        """Forget every graph. A graph launched and not yet finished reads tables its owner is about
        to free: the devices with captured graphs are synchronised first (a rebuild is rare)."""
        for device in {entry[2] for entry in self._entries.values() if isinstance(entry, tuple)}:
            torch.cuda.synchronize(device)
        self._entries.clear()

    def run(self, key, body, device: torch.device | None):
        """``body()``, through a CUDA graph on ``device`` from its second run on; ``device`` None
        (several devices, or not CUDA) runs it eagerly."""
        if device is None or device.type != "cuda" or not ENABLED:
            return body()
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _WARM  # this run compiles the kernels; capture at the next
            return body()
        if entry == _EAGER:
            return body()
        if entry == _WARM:
            entry = self._entries[key] = self._capture(body, device)
            if entry == _EAGER:
                return body()
        graph, out, _ = entry
        with torch.cuda.device(device):
            graph.replay()  # on the device's current stream, as the eager launches would be
        return out

    @staticmethod
    def _capture(body, device: torch.device):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            try:
                with torch.cuda.stream(side):
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        out = body()
                    finally:
                        graph.capture_end()
            except Exception as e:  # a launch that cannot be captured here: stay eager
                warnings.warn(f"plora: CUDA graph capture failed ({e}); launching eagerly", stacklevel=4)
                return _EAGER
            finally:
                current.wait_stream(side)
        return graph, out, device
