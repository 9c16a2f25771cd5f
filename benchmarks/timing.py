"""Measurement primitives: interleaved ``Timer.blocked_autorange`` rounds, paired
per-round statistics and peak extra memory.

* one measurement is the median of ``torch.utils.benchmark.Timer(...).blocked_autorange``
  (the Timer synchronizes CUDA itself);
* the statements of one comparison are measured in ``rounds`` interleaved rounds (the
  order rotates from round to round), and every round's median is kept;
* a comparison of two statements is computed per round, from the medians of the same
  round (which ran side by side), then summarized over rounds by the median, min and
  max: slow spells on a shared machine hit a whole round, and mostly cancel.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.benchmark import Timer

__all__ = [
    "Settings",
    "diff",
    "peak_extra_bytes",
    "ratio",
    "rounds_ms",
    "spread",
]

Rounds = list[float | None]


@dataclass
class Settings:
    device: torch.device
    quick: bool
    threads: int
    min_run_time: float
    rounds: int
    clock: str = "wall"  # "wall" (perf_counter) or "cpu" (process CPU time)
    compile: str = "all"  # "all", "first" (the first cell only) or "none"
    compile_max_tensors: int = 3000
    log: Callable[[str], None] = print


def _median_s(fn: Callable[[], object], settings: Settings) -> float:
    """Median seconds per call of ``fn``.

    With ``clock="cpu"`` the Timer reads the process's CPU time instead of the wall
    clock: time spent descheduled by other processes is not counted (valid on CPU with
    one thread, which ``__main__`` enforces).
    """
    kwargs: dict[str, Any] = {"timer": time.process_time} if settings.clock == "cpu" else {}
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=settings.threads, **kwargs)
    return timer.blocked_autorange(min_run_time=settings.min_run_time).median


def rounds_ms(
    fns: dict[str, Callable[[], object]], settings: Settings, rounds: int | None = None
) -> dict[str, list[float]]:
    """Every statement's median (ms) in each of ``rounds`` interleaved rounds."""
    keys = list(fns)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds or settings.rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            out[key].append(_median_s(fns[key], settings) * 1e3)
    return out


def diff(a: Sequence[float | None], b: Sequence[float | None]) -> Rounds:
    """Per round ``a - b``; ``None`` where it is not above zero (not resolved)."""
    out: Rounds = []
    for x, y in zip(a, b, strict=True):
        d = None if x is None or y is None else x - y
        out.append(d if d is not None and d > 0 else None)
    return out


def ratio(a: Sequence[float | None], b: Sequence[float | None]) -> Rounds:
    """Per round ``a / b``; ``None`` where either side is unresolved."""
    return [None if x is None or y is None or y <= 0 else x / y for x, y in zip(a, b, strict=True)]


def spread(values: Sequence[float | None]) -> dict[str, Any] | None:
    """Median, min and max over the resolved rounds (``None`` if there is none); the
    per-round values are kept under ``rounds``, ``unresolved`` counts the others."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "unresolved": len(values) - len(vals),
        "rounds": list(values),
    }


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Discard what native code writes to fd 2 (the profiler logs every start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """High-water mark of bytes allocated (net of frees) on ``device`` during ``fn()``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated
    before. Other devices: the allocation events ``torch.profiler`` records
    (``profile_memory=True``), summed in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0)

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with (
        _stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    events: list[tuple[int, int]] = []

    def walk(nodes: list[Any]) -> None:
        for node in nodes:
            if node.tag == _EventType.Allocation:
                extra = node.extra_fields
                if extra.device.type == device.type:
                    events.append((node.start_time_ns, extra.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort()
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak
