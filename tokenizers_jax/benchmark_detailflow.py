"""DetailFlow throughput: encode, and decode per prefix length (coarse to fine).

  python -m tokenizers_jax.benchmark detailflow --config=configs/detailflow.py:tiny

Uses random weights of the configured shape unless params are given (speed does not depend
on the values). The decoder compiles once per output resolution; every prefix length that
maps to an already compiled resolution reuses it.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from tokenizers_jax import timing
from tokenizers_jax.models import detailflow


def run(
    config: ml_collections.ConfigDict,
    params: Any | None = None,
    batch_size: int | None = None,
    iterations: int | None = None,
) -> dict[str, Any]:
    """Times encode and prefix decodes of a configs/detailflow.py config.

    Args:
      config: the config; `config.benchmark` gives the default batch_size and iterations,
        and prefix_lengths (empty: every prefix length used in training).
      params: optional weights (default: a random init).
      batch_size, iterations: override `config.benchmark`.
    Returns:
      A JSON-able dict: compile seconds (encode, and decode per output resolution), encode
      images/s, decode images/s and output resolution per prefix length, peak memory.
    """
    bench = config.benchmark
    batch_size = batch_size or bench.batch_size
    iterations = iterations or bench.iterations
    if params is None:
        params = detailflow.init_params(config, jax.random.PRNGKey(config.seed))
    tokenizer = detailflow.DetailFlowTokenizer(config, params)
    size = config.model.image_size
    pixels = np.random.RandomState(0).randint(0, 256, (batch_size, size, size, 3), np.uint8)
    images = tokenizer.prepare(pixels)

    # The tokenizer's own jitted functions, compiled ahead of time to time the compiles.
    encode, encode_compile_s = timing.compile_seconds(tokenizer._encode, params, images)  # pylint: disable=protected-access
    indices = encode(params, images)
    decode_compile_s, decode_ips, decode_resolution = {}, {}, {}
    compiled = {}
    patch = config.model.decoder.patch_size
    for n in tuple(bench.prefix_lengths) or tokenizer.resolutions.prefix_lengths():
        resolution = tokenizer.resolutions.output_resolution(n)
        slots = indices[:, :tokenizer.decoder_slots(n, resolution)]
        if resolution not in compiled:
            compiled[resolution], decode_compile_s[resolution] = timing.compile_seconds(
                tokenizer._decode, params, slots, n, resolution // patch)  # pylint: disable=protected-access
        decode = compiled[resolution]
        decode_resolution[n] = resolution
        decode_ips[n] = timing.items_per_second(
            lambda: decode(params, slots, n), batch_size, iterations)  # pylint: disable=cell-var-from-loop
    return {
        "model": "detailflow",
        "variant": config.get("variant"),
        "device": jax.devices()[0].device_kind,
        "dtype": config.model.dtype,
        "image_size": size,
        "num_tokens": config.model.num_latent_tokens,
        "batch_size": batch_size,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "compile_seconds": {"encode": encode_compile_s, "decode": decode_compile_s},
        "encode_images_per_second": timing.items_per_second(
            lambda: encode(params, images), batch_size, iterations),
        "decode_images_per_second": decode_ips,
        "decode_resolution": decode_resolution,
        **timing.peak_memory(),
    }
