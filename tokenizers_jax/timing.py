"""Timing helpers shared by the benchmarks: compile time, throughput, peak memory, FLOPs per
call and model FLOPs utilisation (MFU) against the accelerator's peak."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.extend
import numpy as np


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


# Peak dense bf16 matrix throughput per chip (FLOP/s), from the vendors' data sheets, keyed by
# the start of `jax.Device.device_kind`. MFU is taken against this peak whatever the compute
# dtype (the usual convention; an fp32 run therefore shows a lower MFU).
PEAK_BF16_FLOPS = {
    "TPU v2": 45e12 / 2,  # per core (a v2 chip holds two)
    "TPU v3": 123e12 / 2,  # per core
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA A100": 312e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}


def peak_flops_per_second(device: jax.Device | None = None) -> float | None:
    """The bf16 dense peak of `device` (default: the first device), None if unknown or CPU."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    matches = [name for name in PEAK_BF16_FLOPS if kind.startswith(name)]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval
    rhs = eqn.invars[1].aval
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = np.prod(rhs.shape) / rhs.shape[out_feature_dim]
    return 2.0 * np.prod(out.shape) * per_output


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    contracted = np.prod([lhs.shape[d] for d in lhs_contract])
    return 2.0 * np.prod(eqn.outvars[0].aval.shape) * contracted


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(_jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            inner = sum(_jaxpr_flops(getattr(sub, "jaxpr", sub))
                        for sub in jax.extend.core.jaxprs_in_params(eqn.params))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def matmul_flops(fn: Callable[..., Any], *args, **kwargs) -> float:
    """FLOPs of the matrix products (dot_general, convolutions; 2 per multiply-add) that one
    call `fn(*args, **kwargs)` executes, scan bodies counted once per iteration and recomputed
    (rematerialised) blocks counted again. Traces `fn` only (arguments may be abstract).

    XLA's own cost analysis (`compiled.cost_analysis()`) counts a loop body once whatever its
    trip count, which under-counts scanned samplers and micro-batch loops; see `xla_flops`.
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def xla_flops(compiled: Any) -> float | None:
    """`flops` of XLA's cost analysis of a compiled function (each loop body counted once)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return None if not analysis else float(analysis.get("flops", 0.0))


def utilisation(flops_per_call: float, seconds_per_call: float,
                device: jax.Device | None = None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's bf16 peak (None on CPU)."""
    peak = peak_flops_per_second(device)
    return None if peak is None else flops_per_call / seconds_per_call / peak
