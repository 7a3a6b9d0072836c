"""Optimizer (optax), encoder freezing, fix_initial_norms and EMA: pure functions on pytrees.

- Adam(b1, b2, eps) at a constant learning rate, no weight decay or clipping (FlowMo spec 2).
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


def make_optimizer(
    optim_config: ml_collections.ConfigDict, freeze_mask: Any | None = None
) -> optax.GradientTransformation:
    """Adam from `config.optim` (lr, b1, b2, eps, freeze_after).

    Args:
      freeze_mask: bool tree (or callable params -> tree) of the leaves that
        `optim_config.freeze_after` freezes; ignored when freeze_after is negative.
    """
    adam = optax.adam(optim_config.lr, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps)
    if optim_config.freeze_after < 0:
        return adam
    if freeze_mask is None:
        raise ValueError("optim.freeze_after is set but the task defines nothing to freeze")
    return freeze_after(adam, optim_config.freeze_after, freeze_mask)


def frobenius_norms(params: Any) -> Any:
    """A float32 [] Frobenius norm per leaf (the reference norms of fix_initial_norms)."""
    return jax.tree.map(lambda w: jnp.linalg.norm(w.astype(jnp.float32).ravel()), params)


def renormalize(params: Any, reference_norms: Any, mask: Any) -> Any:
    """W <- W * |W_0|_F / |W|_F for the leaves where `mask` is True (in fp32)."""

    def rescale(w, norm0, selected):
        if not selected:
            return w
        w32 = w.astype(jnp.float32)
        return (w32 * (norm0 / jnp.linalg.norm(w32.ravel()))).astype(w.dtype)

    return jax.tree.map(rescale, params, reference_norms, mask)


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float, every: int) -> Any:
    """The EMA after update number `step` (0-based): blended at steps 0, every, 2*every, ...

    ema <- ema * decay**every + params * (1 - decay**every), otherwise unchanged.
    """
    rate = decay**every

    def blend(operands):
        ema_, params_ = operands
        return jax.tree.map(lambda e, p: e * rate + p * (1.0 - rate), ema_, params_)

    return jax.lax.cond(step % every == 0, blend, lambda operands: operands[0], (ema, params))
