"""DetailFlow AR generation throughput: the cached sampler (one compiled program) beside the
full-recompute path (the original's loop), drawing the same samples in one run.

  python -m tokenizers_jax.benchmark detailflow_ar --config=configs/detailflow_ar.py:tiny
  python -m tokenizers_jax.benchmark detailflow_ar --config=configs/detailflow_ar.py:df16 \
      --batch_size=2 --iterations=1

Uses random weights of the configured shape unless params are given (speed does not depend on
the values), the config's sampler settings, labels 0, 1, 2, ... and seed config.seed. Both
paths make the same forward passes (23 for 128 tokens), each over the CFG batch of 2B rows;
the full-recompute path re-runs the whole prefix each time, the cached one computes each
position once.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokenizers_jax import sampling, timing
from tokenizers_jax.models import gpt, group_decoding
from tokenizers_jax.models.group_layout import decoding_passes


def run(config: ml_collections.ConfigDict, params: Any | None = None,
        batch_size: int | None = None, iterations: int | None = None) -> dict[str, Any]:
    """Times both samplers of a configs/detailflow_ar.py config.

    Args:
      config: the config; `config.benchmark` gives the default batch_size and iterations.
      params: optional weights (default: a random init).
      batch_size, iterations: override `config.benchmark`.
    Returns:
      A JSON-able dict: per sampler compile seconds, images/s, tokens/s and host CPU seconds
      per image (on a CPU backend the work itself, whatever else loads the machine; on an
      accelerator the host's dispatch overhead); the speedup in images/s and the ratio of CPU
      seconds; forward passes and sequence positions computed per image; whether both drew
      the same tokens; peak memory of the process (both samplers). The timed calls of the
      two paths alternate.
    """
    batch_size = batch_size or config.benchmark.batch_size
    iterations = iterations or config.benchmark.iterations
    m = config.model
    model = gpt.model_from_config(config)
    if params is None:
        params = gpt.init_params(config, jax.random.PRNGKey(config.seed))
    settings = group_decoding.SamplerSettings.from_config(config.sampler, m.vocab_size)
    labels = jnp.arange(batch_size, dtype=jnp.int32) % m.num_classes
    keys = sampling.sample_keys(config.seed, 0, batch_size)
    dynamic = (params, labels, keys, settings.cfg, settings.temperature)
    static = dict(top_k=settings.top_k, top_p=settings.top_p, gradual_cfg=settings.gradual_cfg)

    cached_jit = jax.jit(functools.partial(group_decoding.sample_cached, model),
                         static_argnames=tuple(static))
    cached, cached_compile_s = timing.compile_seconds(cached_jit, *dynamic, **static)
    reference = group_decoding.FullRecomputeSampler(model)
    paths = {"cached": lambda: cached(*dynamic)[0],
             "full_recompute": lambda: reference(*dynamic, **static)[0]}
    first_call_s, tokens = {}, {}
    for name, fn in paths.items():  # the reference compiles its forwards in its first call
        start = time.perf_counter()
        tokens[name] = np.asarray(jax.block_until_ready(fn()))
        first_call_s[name] = time.perf_counter() - start
    # Interleaved, so that both paths see the same load on a shared machine.
    totals = {name: np.zeros(2) for name in paths}  # wall, process CPU seconds
    for _ in range(iterations):
        for name, fn in paths.items():
            totals[name] += _timed(fn)
    images = batch_size * iterations
    reference_compile_s = max(
        first_call_s["full_recompute"] - totals["full_recompute"][0] / iterations, 0.0)
    tokens_per_image = m.num_tokens
    return {
        "model": "detailflow_ar",
        "variant": config.get("variant"),
        "device": jax.devices()[0].device_kind,
        "dtype": m.dtype,
        "batch_size": batch_size,
        "num_tokens": tokens_per_image,
        "group_size": m.group_size,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "sampler": settings._asdict(),
        "forward_passes_per_image": len(decoding_passes(m.num_tokens, m.group_size,
                                                        m.causal_num)),
        "positions_computed_per_image": {"cached": tokens_per_image,
                                         "full_recompute": reference.query_rows()},
        "cached": _path_report(cached_compile_s, totals["cached"], images, tokens_per_image),
        "full_recompute": _path_report(reference_compile_s, totals["full_recompute"], images,
                                       tokens_per_image),
        "speedup": totals["full_recompute"][0] / totals["cached"][0],
        "cpu_time_ratio": totals["full_recompute"][1] / totals["cached"][1],
        "same_tokens": bool(np.array_equal(tokens["cached"], tokens["full_recompute"])),
        **timing.peak_memory(),
    }


def _timed(fn) -> np.ndarray:
    """[wall seconds, process CPU seconds] of one blocking call."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return np.array([time.perf_counter() - wall, time.process_time() - cpu])


def _path_report(compile_s: float, totals: np.ndarray, images: int,
                 tokens_per_image: int) -> dict[str, float]:
    wall, cpu = totals
    return {"compile_seconds": compile_s, "images_per_second": images / wall,
            "tokens_per_second": images * tokens_per_image / wall,
            "host_cpu_seconds_per_image": cpu / images}
