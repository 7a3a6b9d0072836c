"""DetailFlow throughput: encode, and decode per prefix length (coarse to fine).

  python -m tokenizers_jax.benchmark detailflow --config=configs/detailflow.py:tiny

Uses random weights of the configured shape (speed does not depend on the values). The
decoder compiles once per output resolution; every prefix length that maps to an already
compiled resolution reuses it.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from tokenizers_jax.models import detailflow


def _images_per_second(fn: Callable[[], jax.Array], batch: int, iterations: int) -> float:
    jax.block_until_ready(fn())  # warm-up (allocations, autotuning)
    start = time.perf_counter()
    for _ in range(iterations):
        jax.block_until_ready(fn())
    return batch * iterations / (time.perf_counter() - start)


def _compile(jitted, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run(config: ml_collections.ConfigDict, params: Any | None = None) -> dict[str, Any]:
    """Times encode and prefix decodes of a configs/detailflow.py config.

    Args:
      config: the config; `config.benchmark` gives batch_size, iterations and prefix_lengths
        (empty: every prefix length used in training).
      params: optional weights (default: a random init).
    Returns:
      {"device", "batch_size", "dtype", "encode": {"compile_s", "images_per_s"},
       "decode": {n: {"resolution", "images_per_s"}}, "decode_compile_s": {resolution: s},
       "peak_memory_bytes" (None where the backend does not report it)}.
    """
    bench = config.benchmark
    if params is None:
        params = detailflow.init_params(config, jax.random.PRNGKey(config.seed))
    tokenizer = detailflow.DetailFlowTokenizer(config, params)
    size, batch = config.model.image_size, bench.batch_size
    uint8_images = np.random.RandomState(0).randint(0, 256, (batch, size, size, 3), np.uint8)
    images = tokenizer.prepare(uint8_images)

    encode, encode_compile_s = _compile(tokenizer._encode, params, images)  # pylint: disable=protected-access
    indices = encode(params, images)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "batch_size": batch,
        "dtype": config.model.dtype,
        "encode": {
            "compile_s": encode_compile_s,
            "images_per_s": _images_per_second(lambda: encode(params, images), batch,
                                               bench.iterations),
        },
        "decode": {},
        "decode_compile_s": {},
    }

    prefix_lengths = tuple(bench.prefix_lengths) or tokenizer.resolutions.prefix_lengths()
    patch = config.model.decoder.patch_size
    compiled = {}
    for n in prefix_lengths:
        resolution = tokenizer.resolutions.output_resolution(n)
        if resolution not in compiled:
            compiled[resolution], seconds = _compile(
                tokenizer._decode, params, indices, n, resolution // patch)  # pylint: disable=protected-access
            result["decode_compile_s"][resolution] = seconds
        decode = compiled[resolution]
        result["decode"][n] = {
            "resolution": resolution,
            "images_per_s": _images_per_second(lambda: decode(params, indices, n), batch,
                                               bench.iterations),
        }
    result["peak_memory_bytes"] = _peak_memory_bytes()
    return result
