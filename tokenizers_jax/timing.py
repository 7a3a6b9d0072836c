"""Timing helpers shared by the benchmarks: compile time, throughput, peak memory."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Callable

import jax


def compile_seconds(jitted: Any, *args, **kwargs) -> tuple[Any, float]:
    """AOT-compiles a `jax.jit` function for these arguments: (compiled, seconds)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def items_per_second(fn: Callable[[], Any], items: int, iterations: int) -> float:
    """Runs `fn` once to warm up, then `iterations` times; returns items processed per second."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(iterations):
        jax.block_until_ready(fn())
    return items * iterations / (time.perf_counter() - start)


def peak_memory() -> dict[str, int | None]:
    """Peak accelerator memory (None where the backend does not report it, e.g. CPU) and the
    process's peak resident host memory, in bytes."""
    stats = jax.local_devices()[0].memory_stats() or {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_device_bytes": stats.get("peak_bytes_in_use"), "peak_host_rss_bytes": rss_bytes}
