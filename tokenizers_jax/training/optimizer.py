"""Optimizers (optax), encoder freezing, fix_initial_norms and EMA: pure functions on pytrees.

- `make_optimizer(config.optim)`: Adam(b1, b2, eps), or AdamW when `weight_decay` > 0 (decay on
  every parameter of rank >= 2, as DetailFlow's AR recipe), optionally after clipping the
  global gradient norm, at a constant or scheduled learning rate (`make_schedule`). With the
  defaults it is exactly `optax.adam(lr)`: FlowMo's optimizer (spec 2) and its state layout.
- `freeze_after(inner, steps, mask)`: from update number `steps` on, zeroes the updates of
  the masked leaves, and at that update restarts the inner optimizer's state, as the original
  does by rebuilding Adam over the decoder alone (spec 5). Its counter lives in the optimizer
  state, so a resumed run stays frozen.
- fix_initial_norms (spec 3): after every update, selected matrices are rescaled to their
  reference Frobenius norm (`renormalize`); the reference norms are kept in the train state.
- EMA (spec 5): every `every` steps, ema <- ema * decay**every + params * (1 - decay**every).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tokenizers_jax import layer_stack


class FreezeState(NamedTuple):
    count: jax.Array  # int32 [], number of updates seen
    inner: Any  # the wrapped optimizer's state


def freeze_after(inner: optax.GradientTransformation, steps: int,
                 mask: Any) -> optax.GradientTransformation:
    """Freezes the masked leaves from update `steps` on, restarting `inner` at that update.

    Args:
      inner: the optimizer (e.g. Adam); its state is re-initialised at update `steps`, so its
        moments and bias correction start afresh for the leaves that keep training.
      steps: first update index (0-based) that is frozen; 0 freezes from the start.
      mask: bool tree with the params' structure, or a callable params -> such a tree.
    """

    def init_fn(params):
        return FreezeState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

    def update_fn(updates, state, params=None):
        restart = state.count == steps
        inner_state = jax.tree.map(lambda fresh, old: jnp.where(restart, fresh, old),
                                   inner.init(updates), state.inner)
        updates, inner_state = inner.update(updates, inner_state, params)
        leaf_mask = mask(updates) if callable(mask) else mask
        frozen = state.count >= steps
        updates = jax.tree.map(
            lambda u, m: jnp.where(frozen, jnp.zeros_like(u), u) if m else u, updates, leaf_mask
        )
        return updates, FreezeState(count=optax.safe_increment(state.count), inner=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


SCHEDULES = ("constant", "warmup_cosine", "timm_cosine")


def default_optim_config(**overrides) -> ml_collections.ConfigDict:
    """The fields of an optimizer section (`config.optim`, or a task's second optimizer).

    Fields:
      lr, b1, b2, eps       Adam (torch defaults for eps).
      weight_decay          > 0: AdamW, decoupled decay on every parameter of rank >= 2.
      clip_grad_norm        > 0: clip the global gradient norm to this first (torch's
                            clip_grad_norm_ divides by norm + 1e-6, optax by norm: ~1e-6 apart).
      schedule              "constant" (lr); "warmup_cosine": linear warmup from
                            warmup_init_lr to lr over warmup_steps, then cosine to min_lr at
                            decay_steps (optax.warmup_cosine_decay_schedule; the LambdaLR of
                            LlamaGen-style AR training); "timm_cosine": the same warmup, but the
                            cosine is measured from step 0 (timm's CosineLRScheduler with
                            warmup_prefix=False), so it joins the warmup below lr.
      warmup_steps, warmup_init_lr, min_lr, decay_steps (0: train.num_steps)
      freeze_after          freeze the task's freeze mask from this update on (-1 never).
    """
    config = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_grad_norm=0.0,
        schedule="constant", warmup_steps=0, warmup_init_lr=0.0, min_lr=0.0, decay_steps=0,
        freeze_after=-1))
    config.update(overrides)
    return config


def make_schedule(optim_config: ml_collections.ConfigDict, num_steps: int) -> optax.ScalarOrSchedule:
    """The learning rate of update t (0-based): a float for "constant", else an optax schedule.

    Args:
      num_steps: the run's length, used when `decay_steps` is 0.
    """
    name = optim_config.schedule
    if name not in SCHEDULES:
        raise ValueError(f"unknown optim.schedule {name!r}; choose one of {SCHEDULES}")
    if name == "constant":
        return optim_config.lr
    decay_steps = optim_config.decay_steps or num_steps
    warmup = optim_config.warmup_steps
    if not 0 <= warmup < decay_steps:
        raise ValueError(f"optim.warmup_steps={warmup} must be in [0, decay_steps={decay_steps})")
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            optim_config.warmup_init_lr, optim_config.lr, warmup, decay_steps, optim_config.min_lr)
    warmup_part = optax.linear_schedule(optim_config.warmup_init_lr, optim_config.lr,
                                        max(warmup, 1))
    cosine = optax.cosine_decay_schedule(optim_config.lr, decay_steps,
                                         optim_config.min_lr / optim_config.lr)
    return lambda step: jnp.where(step < warmup, warmup_part(step), cosine(step))


def learning_rate(schedule: optax.ScalarOrSchedule, step: int) -> float:
    """The learning rate that update `step` (0-based) used, for logging."""
    return float(schedule(step)) if callable(schedule) else float(schedule)


def rank_at_least_2(params: Any) -> Any:
    """Bool tree: True for matrices, embeddings and kernels (the leaves weight decay applies to)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    optim_config: ml_collections.ConfigDict, freeze_mask: Any | None = None,
    num_steps: int = 0,
) -> optax.GradientTransformation:
    """The optimizer of an optimizer section (see `default_optim_config`).

    Args:
      freeze_mask: bool tree (or callable params -> tree) of the leaves that
        `optim_config.freeze_after` freezes; ignored when freeze_after is negative.
      num_steps: the run's length (for schedules whose decay_steps is 0).
    """
    schedule = make_schedule(optim_config, num_steps)
    kwargs = dict(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps)
    if optim_config.weight_decay > 0:
        tx = optax.adamw(schedule, weight_decay=optim_config.weight_decay, mask=rank_at_least_2,
                         **kwargs)
    else:
        tx = optax.adam(schedule, **kwargs)
    if optim_config.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim_config.clip_grad_norm), tx)
    if optim_config.freeze_after < 0:
        return tx
    if freeze_mask is None:
        raise ValueError("optim.freeze_after is set but the task defines nothing to freeze")
    return freeze_after(tx, optim_config.freeze_after, freeze_mask)


def _norm(w: jax.Array, stacked: bool) -> jax.Array:
    """fp32 Frobenius norm of a leaf: [], or [depth] (one per block) for stacked blocks."""
    w32 = w.astype(jnp.float32)
    if stacked:
        return jnp.linalg.norm(w32.reshape(w32.shape[0], -1), axis=1)
    return jnp.linalg.norm(w32.ravel())


def frobenius_norms(params: Any) -> Any:
    """The Frobenius norm of every leaf (the reference norms of fix_initial_norms), fp32: []
    per leaf, or [depth] for the leaves of stacked blocks (`layer_stack`), one per block."""
    return jax.tree_util.tree_map_with_path(
        lambda path, w: _norm(w, layer_stack.is_stacked_path(path)), params)


def renormalize(params: Any, reference_norms: Any, mask: Any) -> Any:
    """W <- W * |W_0|_F / |W|_F for the leaves where `mask` is True (in fp32; per block for
    stacked blocks)."""

    def rescale(path, w, norm0, selected):
        if not selected:
            return w
        stacked = layer_stack.is_stacked_path(path)
        scale = norm0 / _norm(w, stacked)
        w32 = w.astype(jnp.float32)
        return (w32 * scale.reshape(scale.shape + (1,) * (w.ndim - scale.ndim))).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(rescale, params, reference_norms, mask)


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float, every: int) -> Any:
    """The EMA after update number `step` (0-based): blended at steps 0, every, 2*every, ...

    ema <- ema * decay**every + params * (1 - decay**every), otherwise unchanged.
    """
    rate = decay**every

    def blend(operands):
        ema_, params_ = operands
        return jax.tree.map(lambda e, p: e * rate + p * (1.0 - rate), ema_, params_)

    return jax.lax.cond(step % every == 0, blend, lambda operands: operands[0], (ema, params))
