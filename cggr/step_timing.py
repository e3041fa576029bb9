"""``StepTimer``: the router's share of a step's time (``StepOptions(collect_timing=True)``).

CUDA events on a CUDA device (one synchronisation, in ``finish``), the host clock otherwise.
"""
import time

import torch


class StepTimer:
    def __init__(self):
        self._pending = None
        self.result = None  # {"router_ms", "step_ms", "router_time_share"} of the last finished step

    def start(self, device):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._pending = {"cuda": True, "start": start}
        else:
            self._pending = {"cuda": False, "start": time.perf_counter()}

    def mark_router_end(self):
        timing = self._pending
        if timing["cuda"]:
            timing["router_end"] = torch.cuda.Event(enable_timing=True)
            timing["router_end"].record()
        else:
            timing["router_end"] = time.perf_counter()

    def finish(self):
        """Close the pending step (if any): from ``start`` to now."""


        timing, self._pending = self._pending, None
        if timing is None or "router_end" not in timing:
            return
        if timing["cuda"]:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            router_ms = timing["start"].elapsed_time(timing["router_end"])
            step_ms = timing["start"].elapsed_time(end)
        else:
            end = time.perf_counter()
            router_ms = (timing["router_end"] - timing["start"]) * 1e3
            step_ms = (end - timing["start"]) * 1e3
        self.result = {"router_ms": router_ms, "step_ms": step_ms,
                       "router_time_share": router_ms / step_ms if step_ms > 0 else 0.0}
