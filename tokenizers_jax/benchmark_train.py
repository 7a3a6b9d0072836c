"""Train-step benchmark: `python -m tokenizers_jax.benchmark train --config=FILE[:variant]`.

Times the sharded, jitted train step of a training config on synthetic batches of the
configured shape (the data pipeline is not timed): compile seconds, steps/s, images/s, memory,
matrix FLOPs per step (`timing.matmul_flops`, every loop iteration and recomputed block
counted) and, on GPU/TPU, MFU per device against its bf16 peak (`timing.PEAK_BF16_FLOPS`).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np

from tokenizers_jax import timing
from tokenizers_jax.training import loop


def run(config: ml_collections.ConfigDict, iterations: int = 3) -> dict[str, Any]:
    """Compiles the train step, runs one warm-up and `iterations` timed steps."""
    step, state, constants, batch, compile_seconds, compiled = loop.fresh_step(config)
    run = loop.setup(config)
    static, draws = run.task.host_draws(0)
    flops = timing.matmul_flops(loop.make_train_step(run.task, run.txs, config.train, run.mesh,
                                                     run.fixed_norm_mask, static),
                                state, constants, batch, draws)
    state, metrics = step(state, constants, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(iterations):
        state, metrics = step(state, constants, batch)
    jax.block_until_ready(metrics)
    seconds_per_step = (time.perf_counter() - start) / iterations
    memory = compiled.memory_analysis()
    return {
        "benchmark": "train",
        "model": config.model.name,
        "variant": config.get("variant"),
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "mesh": dict(jax.tree.leaves(batch)[0].sharding.mesh.shape),
        "dtype": config.model.get("dtype"),
        "global_batch_size": config.train.batch_size,
        "grad_accum_steps": config.train.grad_accum_steps,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
        "compile_seconds": compile_seconds,
        "steps_per_second": 1.0 / seconds_per_step,
        "images_per_second": config.train.batch_size / seconds_per_step,
        "flops_per_step": flops,
        "xla_cost_analysis_flops": timing.xla_flops(compiled),
        "flops_per_second": flops / seconds_per_step,
        "mfu": timing.utilisation(flops / jax.device_count(), seconds_per_step),
        "loss": float(metrics["loss"]),
        "compiled_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "compiled_argument_bytes": getattr(memory, "argument_size_in_bytes", None),
        **timing.peak_memory(),
    }
