"""Speed and memory benchmarks, printed as JSON.

  python -m tokenizers_jax.benchmark flowmo --config=configs/flowmo.py:tiny
  python -m tokenizers_jax.benchmark detailflow --config=configs/detailflow.py:tiny
  python -m tokenizers_jax.benchmark train --config=configs/flowmo.py:tiny
  python -m tokenizers_jax.benchmark detailflow_ar --config=configs/detailflow_ar.py:tiny
  python -m tokenizers_jax.benchmark compile --config=configs/flowmo.py:lo

`flowmo` and `detailflow` time inference (random weights of the configured shape, or a model
directory with --checkpoint); `train` times the sharded train step of any training config;
`detailflow_ar` times DetailFlow's cached AR sampler beside the full-recompute path;
`compile` compiles FlowMo's train step and reconstruction on abstract inputs (nothing of the
full size is allocated) and reports the seconds. The same command runs unchanged on CPU, GPU
and TPU.

With --compare-torch, `train`, `flowmo` and `detailflow` instead run side by side with the
PyTorch re-statements of the originals, alternating, on the same weights, shapes and threads
(see `tokenizers_jax.benchmark_torch`; the shapes of the README are configs/benchmark.py).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from tokenizers_jax import cli, exported, flow, timing
from tokenizers_jax.models import flowmo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory with weights to time "
                                  "(default: random weights).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per call (default: 4, or the "
                                   "config's benchmark section).")
_ITERATIONS = flags.DEFINE_integer("iterations", None, "Timed calls after one warm-up call "
                                   "(default: 3, or the config's benchmark section).")

_COMPARE_TORCH = flags.DEFINE_bool("compare-torch", False, "Run side by side with eager "
                                   "PyTorch (train, flowmo, detailflow; needs torch).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "--compare-torch: alternating rounds (medians are "
                               "reported).")

flags.adopt_module_key_flags(cli)

BENCHMARKS = ("flowmo", "detailflow", "train", "detailflow_ar", "compile")


def benchmark_flowmo(config: ml_collections.ConfigDict, params: Any, batch_size: int,
                     iterations: int) -> dict[str, Any]:
    """Encode and reconstruct throughput of FlowMo at the config's sampler settings."""
    model = flowmo.build_model(config)
    if params is None:
        params = flowmo.init_params(model, jax.random.key(config.seed))
    size = config.model.image_size
    images = jax.random.uniform(jax.random.key(1), (batch_size, size, size, 3), minval=-1,
                                maxval=1)
    key = jax.random.key(2)

    def encode(p, x):
        code = model.apply({"params": p}, x, method=flowmo.FlowMo.encode)
        return flowmo.quantize(code, model.config, with_losses=False).indices

    reconstruct = lambda p, x, k: flowmo.reconstruct(model, p, x, k, config)
    encode_fn, encode_compile_s = timing.compile_seconds(jax.jit(encode), params, images)
    recon_fn, recon_compile_s = timing.compile_seconds(jax.jit(reconstruct), params, images, key)
    recon_flops = timing.matmul_flops(reconstruct, params, images, key)
    recon_ips = timing.items_per_second(lambda: recon_fn(params, images, key), batch_size,
                                        iterations)
    sampler = config.sampler
    times = flow.sampler_times(sampler.steps, sampler.schedule)
    guided = flow.guided_steps(times, sampler.cfg, sampler.cfg_interval_sigma)
    return {
        "model": "flowmo",
        "variant": config.get("variant"),
        "device": jax.devices()[0].device_kind,
        "dtype": config.model.dtype,
        "image_size": size,
        "batch_size": batch_size,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "compile_seconds": {"encode": encode_compile_s, "reconstruct": recon_compile_s},
        "encode_images_per_second": timing.items_per_second(
            lambda: encode_fn(params, images), batch_size, iterations),
        "reconstruct_images_per_second": recon_ips,
        "sampler": {"steps": sampler.steps, "schedule": sampler.schedule, "cfg": sampler.cfg},
        "decoder_evaluations_per_reconstruction": flow.decoder_evaluations(guided),
        "reconstruct_flops": recon_flops,
        "reconstruct_mfu": timing.utilisation(recon_flops, batch_size / recon_ips),
        **timing.peak_memory(),
    }


def run(name: str, config: ml_collections.ConfigDict, checkpoint: str | None = None,
        batch_size: int | None = None, iterations: int | None = None) -> dict[str, Any]:
    """Runs one benchmark and returns its JSON-able result."""
    params = exported.load_params(checkpoint) if checkpoint else None
    if name == "flowmo":
        return benchmark_flowmo(config, params, batch_size or 4, iterations or 3)
    if name == "detailflow":
        from tokenizers_jax import benchmark_detailflow  # pylint: disable=import-outside-toplevel

        return benchmark_detailflow.run(config, params, batch_size, iterations)
    if name == "detailflow_ar":
        from tokenizers_jax import benchmark_generation  # pylint: disable=import-outside-toplevel

        return benchmark_generation.run(config, params, batch_size, iterations)
    if name == "train":
        from tokenizers_jax import benchmark_train  # pylint: disable=import-outside-toplevel

        return benchmark_train.run(config, iterations or 3)
    if name == "compile":
        from tokenizers_jax import benchmark_compile  # pylint: disable=import-outside-toplevel

        return benchmark_compile.run(config, batch_size)
    raise app.UsageError(f"unknown benchmark {name!r}; choose one of {BENCHMARKS}")


def main(argv: list[str]):
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        raise app.UsageError(f"usage: python -m tokenizers_jax.benchmark {{{','.join(BENCHMARKS)}}}"
                             " --config=FILE[:variant]")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/flowmo.py:tiny")
    if _COMPARE_TORCH.value:
        if _CHECKPOINT.value:
            raise app.UsageError("--compare-torch times random weights; drop --checkpoint")
        from tokenizers_jax import benchmark_torch  # pylint: disable=import-outside-toplevel

        result = benchmark_torch.run(argv[1], _CONFIG.value, _BATCH_SIZE.value, _ROUNDS.value,
                                     _ITERATIONS.value or 1)
    else:
        result = run(argv[1], _CONFIG.value, _CHECKPOINT.value, _BATCH_SIZE.value,
                     _ITERATIONS.value)
    json.dump(result, sys.stdout, indent=2, default=str)
    print()


if __name__ == "__main__":
    cli.run(main)
