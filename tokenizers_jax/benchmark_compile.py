"""Compile seconds of FlowMo at any size, without allocating it:
`python -m tokenizers_jax.benchmark compile --config=configs/flowmo.py:lo`.

Lowers and compiles (`jax.jit(...).lower(...).compile()`) on abstract inputs
(`jax.ShapeDtypeStruct`s): the training loop's train step (the config's batch, micro-batches
and loss groups, on this host's mesh) and the reconstruction (encode, LFQ, the config's
sampler) of `--batch_size` images (default 8). Compare `--config.model.scan_layers=True` and
`False` to see what scanning the MMDiT blocks saves. The perceptual network of the train step
needs its weights, or `--config.train.perceptual_random_init=True` (compile time does not
depend on the values).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tokenizers_jax import timing
from tokenizers_jax.models import flowmo
from tokenizers_jax.training import loop
from tokenizers_jax.training import sharding as sharding_lib


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def train_step_seconds(config: ml_collections.ConfigDict) -> tuple[float, float]:
    """(lower seconds, compile seconds) of the train step of update 0, on abstract inputs."""
    run = loop.setup(config)
    static, draws = run.task.host_draws(0)
    batch = _abstract(run.task.synthetic_batch(1))
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((config.train.batch_size, *x.shape[1:]), x.dtype), batch)
    constants = sharding_lib.replicate(run.task.constants, run.mesh)
    start = time.perf_counter()
    lowered = loop.jit_train_step(run, config, static).lower(
        loop.abstract_state(run), constants, batch, _abstract(draws))
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def reconstruct_seconds(config: ml_collections.ConfigDict, batch_size: int) -> tuple[float, float]:
    """(lower seconds, compile seconds) of the reconstruction, on abstract inputs."""
    model = flowmo.build_model(config)
    size = config.model.image_size
    images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
    fn = jax.jit(lambda p, x, k: flowmo.reconstruct(model, p, x, k, config))
    start = time.perf_counter()
    lowered = fn.lower(flowmo.abstract_params(model), images, jax.eval_shape(jax.random.key, 0))
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def run(config: ml_collections.ConfigDict, batch_size: int | None = None) -> dict[str, Any]:
    """Compile seconds of the train step and the reconstruction of a FlowMo config."""
    if config.model.name != "flowmo":
        raise ValueError(f"the compile benchmark compiles FlowMo; got model.name="
                         f"{config.model.name!r}")
    batch_size = batch_size or 8
    train_lower, train_compile = train_step_seconds(config)
    recon_lower, recon_compile = reconstruct_seconds(config, batch_size)
    return {
        "benchmark": "compile",
        "model": "flowmo",
        "variant": config.get("variant"),
        "device": jax.devices()[0].device_kind,
        "scan_layers": config.model.get("scan_layers", False),
        "remat": config.model.remat,
        "train_batch_size": config.train.batch_size,
        "reconstruct_batch_size": batch_size,
        "sampler_steps": config.sampler.steps,
        "train_step": {"lower_seconds": train_lower, "compile_seconds": train_compile},
        "reconstruct": {"lower_seconds": recon_lower, "compile_seconds": recon_compile},
        **timing.peak_memory(),
    }
