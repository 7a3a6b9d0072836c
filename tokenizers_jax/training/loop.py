"""The generic training loop: `train_and_evaluate(config, workdir)`.

One `jax.jit` train step with explicit shardings and a donated state:

  batch [B, ...] -> micro-batches [n, B/n, ...] (lax.scan, gradients averaged)
    each micro-batch -> `train.loss_groups` interleaved groups (vmap; batch statistics such as
    LFQ entropy are per group, like the original's per-GPU statistics)
  -> Adam (+ encoder freeze) -> fix_initial_norms -> EMA
  -> a non-finite loss or gradient keeps the old state and stops the run on the host.

Row r of the global batch belongs to micro-batch r % n and, within it, to group (r // n) % G;
sub-batch (i, g) draws its randomness from fold_in(step key, i * G + g). So (n=2, G=1) and
(n=1, G=2) see the same sub-batches with the same noise.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tokenizers_jax import tasks, timing
from tokenizers_jax.training import checkpoint as checkpoint_lib
from tokenizers_jax.training import optimizer as optimizer_lib
from tokenizers_jax.training import sharding as sharding_lib
from tokenizers_jax.training import state as state_lib
from tokenizers_jax.training import workdir as workdir_lib
from tokenizers_jax.training.writer import MetricWriter, image_grid


def check_batch_size(train_config: ml_collections.ConfigDict, mesh: Mesh):
    """Raises a ValueError unless the global batch splits evenly over micro-batches and devices."""
    batch, accum, groups = train_config.batch_size, train_config.grad_accum_steps, train_config.loss_groups
    shards = sharding_lib.num_batch_shards(mesh)
    if accum < 1 or groups < 1:
        raise ValueError(f"train.grad_accum_steps ({accum}) and train.loss_groups ({groups}) "
                         "must be positive")
    if batch % (accum * shards):
        raise ValueError(
            f"train.batch_size={batch} does not divide over {accum} gradient-accumulation "
            f"micro-batches x {shards} devices (mesh {dict(mesh.shape)}); use a multiple of "
            f"{accum * shards}")
    if (batch // accum) % groups:
        raise ValueError(f"micro-batch size {batch // accum} (train.batch_size / "
                         f"train.grad_accum_steps) is not divisible by train.loss_groups={groups}")
    if batch % jax.process_count():
        raise ValueError(f"train.batch_size={batch} does not divide over "
                         f"{jax.process_count()} processes")


def _interleave(x: jax.Array, parts: int) -> jax.Array:
    """[N, ...] -> [parts, N / parts, ...] with part p holding rows p, p + parts, ..."""
    return jnp.swapaxes(x.reshape(x.shape[0] // parts, parts, *x.shape[1:]), 0, 1)


def make_train_step(task: tasks.Task, tx: optax.GradientTransformation,
                    train_config: ml_collections.ConfigDict, mesh: Mesh, fixed_norm_mask: Any):
    """(state, constants, batch) -> (state, metrics): the whole update, to be jitted."""
    accum, groups = train_config.grad_accum_steps, train_config.loss_groups
    micro_sharding = NamedSharding(mesh, P(None, sharding_lib.BATCH_AXES))

    def micro_batch_loss(params, constants, micro_batch, keys):
        """Mean loss over the groups of one micro-batch (vmapped over groups; keys [G, 2])."""
        grouped = jax.tree.map(lambda x: _interleave(x, groups), micro_batch)
        losses, metrics = jax.vmap(task.loss, in_axes=(None, None, 0, 0))(
            params, constants, grouped, keys)
        return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)

    grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)

    def train_step(state: state_lib.TrainState, constants, batch):
        step_key = jax.random.fold_in(state.rng, state.step)
        micro_batches = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(_interleave(x, accum), micro_sharding),
            batch)

        def accumulate(grads, inputs):
            micro_batch, index = inputs
            sub_batches = index * groups + jnp.arange(groups)
            keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(sub_batches)
            (loss, metrics), micro_grads = grad_fn(state.params, constants, micro_batch, keys)
            grads = jax.tree.map(lambda g, m: g + m / accum, grads, micro_grads)
            return grads, dict(metrics, loss=loss)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, metrics = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(accum)))
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if fixed_norm_mask is not None:
            params = optimizer_lib.renormalize(params, state.reference_norms, fixed_norm_mask)
        ema_params = optimizer_lib.ema_update(state.ema_params, params, state.step,
                                              train_config.ema_decay, train_config.ema_every)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        # A non-finite update is dropped (only the step advances, so that the host can stop).
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        new_state = new_state.replace(step=state.step + 1)
        metrics.update(grad_norm=grad_norm, param_norm=optax.global_norm(new_state.params),
                       update_norm=optax.global_norm(updates), finite=finite)
        return new_state, metrics

    return train_step


def compile_train_step(task, tx, config, mesh, shardings, fixed_norm_mask, state, constants,
                       batch):
    """The AOT-compiled train step and its compile time in seconds."""
    replicated = sharding_lib.replicated(mesh)
    jitted = jax.jit(
        make_train_step(task, tx, config.train, mesh, fixed_norm_mask),
        in_shardings=(shardings, replicated, sharding_lib.batch_sharding(mesh)),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )
    return timing.compile_seconds(jitted, state, constants, batch)


def abstract_state(task, tx) -> state_lib.TrainState:
    return jax.eval_shape(
        lambda k: state_lib.state_from_params(nn.unbox(task.init_params(k)), k, tx),
        jax.random.PRNGKey(0))


def setup(config: ml_collections.ConfigDict):
    """(task, mesh, optimizer, state shardings, fixed-norm mask): everything but the data."""
    task = tasks.build_task(config)
    mesh = sharding_lib.make_mesh(config.mesh)
    check_batch_size(config.train, mesh)
    params_shape = nn.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    tx = optimizer_lib.make_optimizer(config.optim, task.freeze_mask(params_shape))
    shardings = state_lib.state_shardings(task.init_params, tx, mesh,
                                          sharding_lib.logical_rules(config.mesh))
    return task, mesh, tx, shardings, task.fixed_norm_mask(params_shape)


class FreshStep(NamedTuple):
    """A step-0 state and the train step compiled for it (benchmarks, tests)."""

    step: Callable[..., Any]  # (state, constants, batch) -> (state, metrics), donates state
    state: state_lib.TrainState
    constants: Any
    batch: Any
    compile_seconds: float


def fresh_step(config: ml_collections.ConfigDict, local_batch: Any | None = None) -> FreshStep:
    """A freshly initialised sharded state and the step compiled for `local_batch`.

    Args:
      local_batch: this process's rows of a global batch; None for the task's synthetic batch.
    """
    task, mesh, tx, shardings, fixed_norm_mask = setup(config)
    if local_batch is None:
        local_batch = task.synthetic_batch(config.train.batch_size // jax.process_count())
    state = state_lib.create_state(task.init_params, tx, shardings, config.seed)
    constants = sharding_lib.replicate(task.constants, mesh)
    batch = sharding_lib.global_batch(local_batch, mesh)
    step, seconds = compile_train_step(task, tx, config, mesh, shardings, fixed_norm_mask, state,
                                       constants, batch)
    return FreshStep(step, state, constants, batch, seconds)


def _initial_state(config, task, tx, shardings, checkpointer, train_iterator):
    """Latest checkpoint in the workdir, else `init_from`'s params, else a fresh init."""
    latest = checkpointer.latest_step()
    if latest is not None:
        return checkpointer.restore(latest, abstract_state(task, tx), shardings, train_iterator)
    params = None
    if config.init_from:
        params = checkpoint_lib.restore_params(
            config.init_from, abstract_state(task, tx).params, shardings.params, item="params")
    return state_lib.create_state(task.init_params, tx, shardings, config.seed, params)


def input_pipelines(config) -> tuple[Iterator[Any], Any]:
    """(checkpointable train iterator of this process's rows, eval batch) from `config.data`.

    The eval batch (the first `eval.num_images` evaluation images) is the same on every
    process.
    """
    from tokenizers_jax import data  # pylint: disable=import-outside-toplevel

    train_iterator = data.make_train_iterator(config.data,
                                              global_batch_size=config.train.batch_size)
    eval_iterator = data.make_eval_iterator(config.data, global_batch_size=config.eval.num_images,
                                            process_index=0, process_count=1)
    return train_iterator, {"image": next(iter(eval_iterator))["image"]}


class _Evaluator:
    """Evaluates (EMA) params on a fixed batch with a fixed key; logs metrics and a grid."""

    def __init__(self, task, config, mesh, params_shardings, constants, eval_batch, writer):
        replicated = sharding_lib.replicated(mesh)
        self.writer = writer
        self.use_ema = config.eval.use_ema
        self.batch = sharding_lib.replicate(eval_batch, mesh)
        self.inputs = task.batch_images(eval_batch)
        self.constants = constants
        self.key = jax.random.PRNGKey(config.eval.seed)
        self.fn = jax.jit(task.evaluate, in_shardings=(params_shardings, replicated, replicated,
                                                       replicated), out_shardings=replicated)

    def __call__(self, state, step: int) -> dict[str, float]:
        params = state.ema_params if self.use_ema else state.params
        metrics, images = jax.device_get(self.fn(params, self.constants, self.batch, self.key))
        metrics = {f"eval/{name}": float(value) for name, value in metrics.items()}
        self.writer.write_scalars(step, metrics)
        self.writer.write_image(step, "reconstruction", image_grid([self.inputs, images]))
        logging.info("eval at step %d: %s", step, metrics)
        return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Nothing is written until the run has been validated: an existing workdir is resumed only
    with a compatible config (`workdir.check_resumable`), and config.json is written
    (atomically) once the task, the mesh and the data pipelines have been built. On resume,
    the rows of metrics.jsonl (and TensorBoard events) after the restored step are dropped, so
    the replayed steps appear once.

    Returns:
      a summary: final step, last train metrics, last eval metrics, compile seconds, and
      `stopped`: "done", or "preempted" (SIGTERM / SIGINT; `signal` names it) after saving.
    Raises:
      workdir.WorkdirMismatchError: the workdir holds a run of another config.
      checkpoint.CheckpointSaveError: a checkpoint could not be written (the run stops).
      FloatingPointError: a non-finite loss or gradient.
      ValueError: an invalid config.
    """
    workdir = os.path.abspath(workdir)
    workdir_lib.check_resumable(workdir, config)
    task, mesh, tx, shardings, fixed_norm_mask = setup(config)
    train_iterator, eval_batch = input_pipelines(config)
    workdir_lib.save_config(workdir, config)
    summary: dict[str, Any] = {"stopped": "done", "eval": {}, "train": {}}
    with contextlib.ExitStack() as cleanup:
        watcher = checkpoint_lib.PreemptionWatcher()  # closed last: covers the final save
        cleanup.callback(watcher.close)
        checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
        cleanup.callback(checkpointer.close)
        restored_step = checkpointer.latest_step()
        state = _initial_state(config, task, tx, shardings, checkpointer, train_iterator)
        total = config.train.num_steps
        # A run from scratch rewrites every row; a resumed one those after its checkpoint.
        writer = MetricWriter(workdir, total,
                              restart_step=-1 if restored_step is None else restored_step)
        cleanup.callback(writer.close)
        constants = sharding_lib.replicate(task.constants, mesh)
        evaluator = _Evaluator(task, config, mesh, shardings.params, constants, eval_batch,
                               writer)
        step = int(jax.device_get(state.step))
        if step == 0 and config.eval.every > 0:
            summary["eval"] = evaluator(state, step)
        train_step = None
        pending = None  # (step, device metrics) not yet checked on the host
        rate_window = (time.perf_counter(), step)

        def report(step_, metrics):
            nonlocal rate_window
            host = jax.device_get(metrics)
            if not host.pop("finite"):
                raise FloatingPointError(
                    f"non-finite loss ({host['loss']}) or gradient norm ({host['grad_norm']}) at "
                    f"step {step_}: the update was not applied and training stops. The last "
                    f"checkpoint (step {checkpointer.latest_step()}) is intact; lower "
                    "optim.lr or check the data.")
            summary["train"] = host
            if step_ % config.logging.every and step_ != total:
                return
            now = time.perf_counter()
            steps_per_second = (step_ - rate_window[1]) / max(now - rate_window[0], 1e-9)
            rate_window = (now, step_)
            scalars = {f"train/{name}": value for name, value in host.items()}
            scalars.update({"train/learning_rate": config.optim.lr,
                            "perf/steps_per_second": steps_per_second,
                            "perf/images_per_second": steps_per_second * config.train.batch_size})
            writer.write_scalars(step_, scalars)
            writer.console(step_, {"loss": host["loss"]}, steps_per_second)

        def save():
            if pending is not None:
                report(*pending)
            if checkpointer.latest_step() != int(jax.device_get(state.step)):
                checkpointer.save(state, train_iterator)

        while step < total:
            checkpointer.check_for_errors()  # a failed async save stops the run at once
            if watcher.reached(step):
                summary.update(stopped="preempted", signal=watcher.signal_name)
                logging.warning("%s: saving a checkpoint at step %d and stopping",
                                watcher.signal_name, step)
                break
            batch = sharding_lib.global_batch(next(train_iterator), mesh)
            if train_step is None:
                train_step, compile_seconds = compile_train_step(
                    task, tx, config, mesh, shardings, fixed_norm_mask, state, constants, batch)
                summary["compile_seconds"] = compile_seconds
                # Logged at the step it produces, after the restored one: never replayed twice.
                writer.write_scalars(step + 1, {"perf/compile_seconds": compile_seconds})
                logging.info("train step compiled in %.1fs", compile_seconds)
                rate_window = (time.perf_counter(), step)
            state, metrics = train_step(state, constants, batch)
            step += 1
            if pending is not None:
                report(*pending)
            pending = (step, metrics)
            if step % config.checkpoint.every == 0:
                save()
                pending = None
            if config.eval.every > 0 and (step % config.eval.every == 0 or step == total):
                summary["eval"] = evaluator(state, step)
        save()
        pending = None
        checkpointer.wait_until_finished()
        summary["step"] = step
        return summary
