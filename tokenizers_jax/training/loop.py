"""The generic training loop: `train_and_evaluate(config, workdir)`.

One `jax.jit` train step with explicit shardings and a donated state (per static variant of
the task's host draws; see `tasks.base` for the task interface):

  batch [B, ...] -> micro-batches [n, B/n, ...] (lax.scan, gradients averaged)
    each micro-batch -> `train.loss_groups` interleaved groups (vmap; batch statistics such as
    LFQ entropy are per group, like the original's per-GPU statistics)
    -> the task's objectives in order (e.g. generator, then discriminator on the same
       reconstructions), each differentiated against one network, threading the
       non-trained state
  -> each network's optimizer; for the model (+ encoder freeze) fix_initial_norms and EMA
  -> a non-finite loss or gradient keeps the old state and stops the run on the host.

Row r of the global batch belongs to micro-batch r % n and, within it, to group (r // n) % G;
sub-batch (i, g) draws its randomness from fold_in(step key, i * G + g). So (n=2, G=1) and
(n=1, G=2) see the same sub-batches with the same noise.
"""

from __future__ import annotations

import contextlib
import os
import time
import functools
from typing import Any, Callable, Hashable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tokenizers_jax import exported, tasks, timing
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


def _group_outputs_of_one(tree: Any) -> Any:
    """Drops the group axis of vmapped objective outputs (valid only for one loss group)."""
    return jax.tree.map(lambda x: x[0], tree)


def make_train_step(task: tasks.Task, txs: state_lib.Optimizers,
                    train_config: ml_collections.ConfigDict, mesh: Mesh, fixed_norm_mask: Any,
                    static: Hashable = None):
    """(state, constants, batch, draws) -> (state, metrics): the whole update, to be jitted.

    Args:
      txs: the optimizer of the model and of each partner network.
      static: the step's static variant (`Task.host_draws`), fixed for this compiled step.
    """
    accum, groups = train_config.grad_accum_steps, train_config.loss_groups
    micro_sharding = NamedSharding(mesh, P(None, sharding_lib.BATCH_AXES))
    objectives = task.objectives()

    def objective_loss(objective, trained, params, context, micro_batch, keys):
        """Mean loss over the groups of one micro-batch (vmapped over groups; keys [G, 2])."""
        params = {**params, objective.trains: trained}
        grouped = jax.tree.map(lambda x: _interleave(x, groups), micro_batch)

        def group_loss(group_batch, key, carry):
            return objective.loss(params, context._replace(carry=carry), group_batch, key)

        losses, output = jax.vmap(group_loss)(grouped, keys, context.carry)
        return jnp.mean(losses), output

    grad_fns = [jax.value_and_grad(functools.partial(objective_loss, objective), has_aux=True)
                for objective in objectives]

    def train_step(state: state_lib.TrainState, constants, batch, draws):
        step_key = jax.random.fold_in(state.rng, state.step)
        micro_batches = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(_interleave(x, accum), micro_sharding),
            batch)
        params = {tasks.MODEL: state.params, **state.partner_params}

        def accumulate(carry, inputs):
            grads, variables = carry
            micro_batch, index = inputs
            sub_batches = index * groups + jnp.arange(groups)
            keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(sub_batches)
            context = tasks.StepContext(constants, variables, draws, static, None)
            metrics = {}
            for objective, grad_fn in zip(objectives, grad_fns):
                (loss, output), objective_grads = grad_fn(
                    params[objective.trains], params, context, micro_batch, keys)
                grads = {**grads, objective.trains: jax.tree.map(
                    lambda g, m: g + m / accum, grads[objective.trains], objective_grads)}
                metrics.update(jax.tree.map(jnp.mean, dict(output.metrics)))
                metrics[objective.name] = loss
                if output.variables is not None:
                    context = context._replace(variables=_group_outputs_of_one(output.variables))
                context = context._replace(carry=output.carry)
            return (grads, context.variables), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, variables), metrics = jax.lax.scan(
            accumulate, (zeros, state.variables), (micro_batches, jnp.arange(accum)))
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

        updates, opt_state = txs[tasks.MODEL].update(grads[tasks.MODEL], state.opt_state,
                                                     state.params)
        model_params = optax.apply_updates(state.params, updates)
        if fixed_norm_mask is not None:
            model_params = optimizer_lib.renormalize(model_params, state.reference_norms,
                                                     fixed_norm_mask)
        ema_params = optimizer_lib.ema_update(state.ema_params, model_params, state.step,
                                              train_config.ema_decay, train_config.ema_every)
        partner_params, partner_opt_state = {}, {}
        for name, partner in state.partner_params.items():
            partner_updates, partner_opt_state[name] = txs[name].update(
                grads[name], state.partner_opt_state[name], partner)
            partner_params[name] = optax.apply_updates(partner, partner_updates)
        new_state = state.replace(step=state.step + 1, params=model_params, opt_state=opt_state,
                                  ema_params=ema_params, partner_params=partner_params,
                                  partner_opt_state=partner_opt_state, variables=variables)
        grad_norms = {name: optax.global_norm(g) for name, g in grads.items()}
        finite = jnp.all(jnp.stack(
            [jnp.isfinite(metrics[o.name]) for o in objectives]
            + [jnp.isfinite(norm) for norm in grad_norms.values()]))
        # A non-finite update is dropped (only the step advances, so that the host can stop).
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        new_state = new_state.replace(step=state.step + 1)
        metrics.update(grad_norm=grad_norms.pop(tasks.MODEL),
                       param_norm=optax.global_norm(new_state.params),
                       update_norm=optax.global_norm(updates), finite=finite)
        metrics.update({f"{name}_grad_norm": norm for name, norm in grad_norms.items()})
        return new_state, metrics

    return train_step


class Setup(NamedTuple):
    """Everything a run needs but the data and the state."""

    task: tasks.Task
    mesh: Mesh
    txs: state_lib.Optimizers  # the model's and each partner's optimizer
    schedules: dict[str, optax.ScalarOrSchedule]  # their learning rates (for logging)
    shardings: state_lib.TrainState
    fixed_norm_mask: Any


def check_task_layout(task: tasks.Task, train_config: ml_collections.ConfigDict,
                      networks: tasks.Networks):
    """Raises a ValueError for objectives or optimizers that do not fit the task's networks."""
    names = {tasks.MODEL, *networks.partners}
    configured = set(task.optimizer_configs())
    if configured != names:
        raise ValueError(f"{type(task).__name__} trains {sorted(names)} but has optimizer "
                         f"sections for {sorted(configured)}")
    for objective in task.objectives():
        if objective.trains not in names:
            raise ValueError(f"objective {objective.name!r} trains {objective.trains!r}, "
                             f"which is none of {sorted(names)}")
    if jax.tree.leaves(networks.variables) and train_config.loss_groups != 1:
        raise ValueError(f"{type(task).__name__} keeps non-trained state across the batch "
                         "(e.g. BatchNorm statistics); set train.loss_groups=1")


def setup(config: ml_collections.ConfigDict) -> Setup:
    """The task, mesh, optimizers, state shardings and fixed-norm mask of a config."""
    task = tasks.build_task(config)
    mesh = sharding_lib.make_mesh(config.mesh)
    check_batch_size(config.train, mesh)
    networks = jax.eval_shape(task.init_networks, jax.random.PRNGKey(0))
    check_task_layout(task, config.train, networks)
    params_shape = nn.unbox(networks.params)
    num_steps = config.train.num_steps
    txs, schedules = {}, {}
    for name, optim_config in task.optimizer_configs().items():
        freeze_mask = task.freeze_mask(params_shape) if name == tasks.MODEL else None
        txs[name] = optimizer_lib.make_optimizer(optim_config, freeze_mask, num_steps)
        schedules[name] = optimizer_lib.make_schedule(optim_config, num_steps)
    shardings = state_lib.state_shardings(task.init_networks, txs, mesh,
                                          sharding_lib.logical_rules(config.mesh))
    return Setup(task, mesh, txs, schedules, shardings, task.fixed_norm_mask(params_shape))


class StepCompiler:
    """The train step compiled once per static variant (`Task.host_draws`), cached."""

    def __init__(self, run: Setup, config: ml_collections.ConfigDict):
        self.run = run
        self.config = config
        self.compiled: dict[Hashable, Any] = {}
        self.compile_seconds: dict[Hashable, float] = {}

    def __call__(self, static: Hashable, state, constants, batch, draws):
        """The compiled step for `static` (compiling it for these arguments if it is new)."""
        if static not in self.compiled:
            self.compiled[static], self.compile_seconds[static] = timing.compile_seconds(
                jit_train_step(self.run, self.config, static), state, constants, batch, draws)
        return self.compiled[static]


def jit_train_step(run: Setup, config: ml_collections.ConfigDict, static: Hashable = None):
    """The `jax.jit` train step of variant `static` with its shardings (state donated)."""
    replicated = sharding_lib.replicated(run.mesh)
    return jax.jit(
        make_train_step(run.task, run.txs, config.train, run.mesh, run.fixed_norm_mask, static),
        in_shardings=(run.shardings, replicated, sharding_lib.batch_sharding(run.mesh),
                      replicated),
        out_shardings=(run.shardings, replicated),
        donate_argnums=(0,),
    )


def abstract_state(run: Setup) -> state_lib.TrainState:
    return jax.eval_shape(
        lambda k: state_lib.state_from_networks(state_lib.unbox_networks(run.task.init_networks(k)), k,
                                                run.txs),
        jax.random.PRNGKey(0))


class FreshStep(NamedTuple):
    """A step-0 state and the train step compiled for it (benchmarks, tests)."""

    step: Callable[..., Any]  # (state, constants, batch) -> (state, metrics), donates state
    state: state_lib.TrainState
    constants: Any
    batch: Any
    compile_seconds: float
    compiled: Any  # the AOT-compiled step (memory and cost analysis)


def fresh_step(config: ml_collections.ConfigDict, local_batch: Any | None = None) -> FreshStep:
    """A freshly initialised sharded state and the step of update 0 compiled for `local_batch`.

    Args:
      local_batch: this process's rows of a global batch; None for the task's synthetic batch.
    """
    run = setup(config)
    if local_batch is None:
        local_batch = run.task.synthetic_batch(config.train.batch_size // jax.process_count())
    state = state_lib.create_state(run.task.init_networks, run.txs, run.shardings, config.seed)
    constants = sharding_lib.replicate(run.task.constants, run.mesh)
    batch = sharding_lib.global_batch(local_batch, run.mesh)
    static, host_draws = run.task.host_draws(0)
    draws = sharding_lib.replicate(host_draws, run.mesh)
    compiler = StepCompiler(run, config)
    compiled = compiler(static, state, constants, batch, draws)
    return FreshStep(lambda s, c, b: compiled(s, c, b, draws), state, constants, batch,
                     compiler.compile_seconds[static], compiled)


def _init_from_params(init_from: str, run: Setup) -> Any:
    """The model params of `init_from`: a workdir's latest raw params, or a model directory's
    (e.g. a converted release), placed in their sharded layout."""
    abstract = abstract_state(run).params
    if exported.is_model_dir(init_from):
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, run.shardings.params)
        return exported.load_params(init_from, target)
    return checkpoint_lib.restore_params(init_from, abstract, run.shardings.params, item="params")


def _initial_state(config, run: Setup, checkpointer, train_iterator):
    """Latest checkpoint in the workdir, else a fresh state with `init_from`'s model params
    and the task's pretrained parts (`Task.pretrained`), else a fresh init."""
    latest = checkpointer.latest_step()
    if latest is not None:
        return checkpointer.restore(latest, abstract_state(run), run.shardings, train_iterator)
    params = _init_from_params(config.init_from, run) if config.init_from else None
    state = state_lib.create_state(run.task.init_networks, run.txs, run.shardings, config.seed,
                                   params)
    pretrained = run.task.pretrained()
    if pretrained is not None:
        if params is not None:
            pretrained = pretrained._replace(params=None)
        state = state_lib.with_pretrained(state, pretrained, run.shardings)
    return state


def input_pipelines(config) -> tuple[Iterator[Any], Any]:
    """(checkpointable train iterator of this process's rows, eval batch) from `config.data`.

    The eval batch (the first `eval.num_images` evaluation examples, without the padding
    mask) is the same on every process.
    """
    from tokenizers_jax import data  # pylint: disable=import-outside-toplevel

    train_iterator = data.make_train_iterator(config.data,
                                              global_batch_size=config.train.batch_size)
    eval_iterator = data.make_eval_iterator(config.data, global_batch_size=config.eval.num_images,
                                            process_index=0, process_count=1)
    eval_batch = next(iter(eval_iterator))
    return train_iterator, {name: value for name, value in eval_batch.items() if name != "mask"}


class _Evaluator:
    """Evaluates (EMA) params on a fixed batch with a fixed key; logs metrics and a grid.

    The grid shows the batch's input images (if the task has any) above the task's output
    images: one row for [B, H, W, 3], R rows for [R, B, H, W, 3].
    """

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
        rows = list(images) if images.ndim == 5 else [images]
        if self.inputs is not None:
            rows.insert(0, self.inputs)
        self.writer.write_image(step, "reconstruction", image_grid(rows))
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
      a summary: final step, last train metrics, last eval metrics, compile seconds (summed
      over the compiled step variants), and `stopped`: "done", or "preempted" (SIGTERM /
      SIGINT; `signal` names it) after saving.
    Raises:
      workdir.WorkdirMismatchError: the workdir holds a run of another config.
      checkpoint.CheckpointSaveError: a checkpoint could not be written (the run stops).
      FloatingPointError: a non-finite loss or gradient.
      ValueError: an invalid config.
    """
    workdir = os.path.abspath(workdir)
    workdir_lib.check_resumable(workdir, config)
    run = setup(config)
    task, mesh = run.task, run.mesh
    train_iterator, eval_batch = input_pipelines(config)
    workdir_lib.save_config(workdir, config)
    summary: dict[str, Any] = {"stopped": "done", "eval": {}, "train": {}}
    with contextlib.ExitStack() as cleanup:
        watcher = checkpoint_lib.PreemptionWatcher()  # closed last: covers the final save
        cleanup.callback(watcher.close)
        checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
        cleanup.callback(checkpointer.close)
        restored_step = checkpointer.latest_step()
        state = _initial_state(config, run, checkpointer, train_iterator)
        total = config.train.num_steps
        # A run from scratch rewrites every row; a resumed one those after its checkpoint.
        writer = MetricWriter(workdir, total,
                              restart_step=-1 if restored_step is None else restored_step)
        cleanup.callback(writer.close)
        constants = sharding_lib.replicate(task.constants, mesh)
        evaluator = _Evaluator(task, config, mesh, run.shardings.params, constants, eval_batch,
                               writer)
        compiler = StepCompiler(run, config)
        step = int(jax.device_get(state.step))
        if step == 0 and config.eval.every > 0:
            summary["eval"] = evaluator(state, step)
        pending = None  # (step, device metrics) not yet checked on the host
        rate_window = (time.perf_counter(), step)

        def learning_rates(step_) -> dict[str, float]:
            """The learning rates update `step_` - 1 used, per trained network."""
            return {"train/learning_rate" + ("" if name == tasks.MODEL else f"_{name}"):
                    optimizer_lib.learning_rate(schedule, step_ - 1)
                    for name, schedule in run.schedules.items()}

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
            scalars.update(learning_rates(step_))
            scalars.update({"perf/steps_per_second": steps_per_second,
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
            static, host_draws = task.host_draws(step)
            draws = sharding_lib.replicate(host_draws, mesh)
            if static not in compiler.compiled:
                train_step = compiler(static, state, constants, batch, draws)
                seconds = compiler.compile_seconds[static]
                summary["compile_seconds"] = sum(compiler.compile_seconds.values())
                # Logged at the step it produces, after any restored one: never replayed twice.
                writer.write_scalars(step + 1, {"perf/compile_seconds": seconds})
                logging.info("train step compiled in %.1fs%s", seconds,
                             "" if static is None else f" (variant {static})")
                rate_window = (time.perf_counter(), step)
            train_step = compiler.compiled[static]
            state, metrics = train_step(state, constants, batch, draws)
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
