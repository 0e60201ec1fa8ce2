"""Timing on shared machines: the CPU a measurement ran on, and latency with contenders alternated run by run.
The benchmarks and the latency tables of the pass library both time with these."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Hashable


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it (``/proc/cpuinfo``), for the line every benchmark table carries:
    ONNX Runtime's integer kernels differ between Intel and AMD."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def alternated_latency(contenders: dict[Hashable, Callable[[], object]], runs: int,
                       warmup: int = 3, block: int = 1) -> dict[Hashable, float]:
    """Median seconds per call of each contender.

    Every round calls each contender once, the starting contender rotating from round to round, so that drift of
    a shared machine (other tenants, frequency changes) falls on all contenders alike.  With ``block`` > 1 each
    contender runs ``block`` times in a row per round and the first of them is not counted: the counted runs find
    the caches holding the contender's own weights, as a deployed model's do, where single alternated runs of many
    contenders find them holding the others' (a small model loses more to that than a large one).
    """
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    times: dict[Hashable, list[float]] = {name: [] for name in names}
    for r in range(runs):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            for i in range(block):
                start = time.perf_counter()
                contenders[name]()
                if i or block == 1:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
