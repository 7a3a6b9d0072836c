"""The train state pytree and its creation directly in its sharded layout."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tokenizers_jax.training import optimizer as optimizer_lib
from tokenizers_jax.training import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    Attributes:
      step: int32 [], number of updates made.
      params: fp32 params (plain arrays).
      ema_params: exponential moving average of params (same layout).
      opt_state: optax state (its counters include the encoder-freeze step count).
      reference_norms: fp32 [] Frobenius norm per params leaf, taken when the state is created
        (used by fix_initial_norms for the masked leaves).
      rng: uint32 [2] base PRNG key; the key of update `step` is fold_in(rng, step).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    reference_norms: Any
    rng: jax.Array


def state_from_params(params: Any, rng: jax.Array, tx: optax.GradientTransformation) -> TrainState:
    """A step-0 state: EMA = params, fresh optimizer, reference norms of these params."""
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        reference_norms=optimizer_lib.frobenius_norms(params),
        rng=rng,
    )


def state_shardings(
    init_boxed_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules,
) -> TrainState:
    """NamedShardings of every TrainState leaf (params, EMA and Adam moments by logical axes).

    Args:
      init_boxed_params: key -> params with `nn.LogicallyPartitioned` leaves (only traced).
    """
    key = jax.random.PRNGKey(0)
    params_sharding = sharding.param_shardings(jax.eval_shape(init_boxed_params, key), mesh, rules)
    abstract = jax.eval_shape(
        lambda k: state_from_params(nn.unbox(init_boxed_params(k)), k, tx), key
    )
    replicated = sharding.replicated(mesh)
    return TrainState(
        step=replicated,
        params=params_sharding,
        ema_params=params_sharding,
        opt_state=optax.tree_map_params(
            tx,
            lambda _, leaf_sharding: leaf_sharding,
            abstract.opt_state,
            params_sharding,
            transform_non_params=lambda _: replicated,
        ),
        reference_norms=jax.tree.map(lambda _: replicated, abstract.reference_norms),
        rng=replicated,
    )


def create_state(
    init_boxed_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    shardings: TrainState,
    seed: int,
    params: Any | None = None,
) -> TrainState:
    """A step-0 state created on the mesh in its sharded layout (never on one device first).

    Args:
      params: start from these (sharded) params instead of a fresh init (`init_from`).
    """
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    if params is None:
        init = lambda ik, r: state_from_params(nn.unbox(init_boxed_params(ik)), r, tx)
        return jax.jit(init, out_shardings=shardings)(init_key, rng)
    init = lambda p, r: state_from_params(p, r, tx)
    return jax.jit(init, out_shardings=shardings)(params, rng)
