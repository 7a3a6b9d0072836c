"""The train state pytree and its creation directly in its sharded layout."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tokenizers_jax.tasks.base import MODEL, Networks
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
      partner_params: name -> params of the task's other trained networks (e.g. a GAN
        discriminator); {} for single-model tasks.
      partner_opt_state: name -> their optimizer states.
      variables: non-trained state the step updates (LeCam EMAs, spectral-norm vectors,
        BatchNorm statistics); {} when the task has none.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    reference_norms: Any
    rng: jax.Array
    partner_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    partner_opt_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    variables: Any = dataclasses.field(default_factory=dict)


Optimizers = dict[str, optax.GradientTransformation]  # MODEL and each partner name -> optimizer


def state_from_params(params: Any, rng: jax.Array, tx: optax.GradientTransformation,
                      partners: dict[str, Any] | None = None,
                      partner_txs: Optimizers | None = None,
                      variables: Any = None) -> TrainState:
    """A step-0 state: EMA = params, fresh optimizers, reference norms of these params."""
    partners = partners or {}
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        reference_norms=optimizer_lib.frobenius_norms(params),
        rng=rng,
        partner_params=partners,
        partner_opt_state={name: partner_txs[name].init(p) for name, p in partners.items()},
        variables={} if variables is None else variables,
    )


def state_from_networks(networks: Networks, rng: jax.Array, txs: Optimizers) -> TrainState:
    """A step-0 state from (unboxed) task networks and the optimizer of each."""
    return state_from_params(networks.params, rng, txs[MODEL], networks.partners, txs,
                             networks.variables)


def unbox_networks(networks: Networks) -> Networks:
    """Networks with their `nn.LogicallyPartitioned` leaves replaced by the plain values."""
    return Networks(*(nn.unbox(part) for part in networks))


def state_shardings(
    init_networks: Callable[[jax.Array], Networks],
    txs: Optimizers,
    mesh: Mesh,
    rules,
) -> TrainState:
    """NamedShardings of every TrainState leaf (params, EMA and Adam moments by logical axes;
    the non-trained variables replicated).

    Args:
      init_networks: key -> `Networks` with `nn.LogicallyPartitioned` leaves (only traced).
    """
    key = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(init_networks, key)
    params_sharding = sharding.param_shardings(boxed.params, mesh, rules)
    partner_shardings = {name: sharding.param_shardings(p, mesh, rules)
                         for name, p in boxed.partners.items()}
    abstract = jax.eval_shape(
        lambda k: state_from_networks(unbox_networks(init_networks(k)), k, txs), key)
    replicated = sharding.replicated(mesh)

    def opt_shardings(tx, opt_state, leaf_shardings):
        return optax.tree_map_params(tx, lambda _, leaf_sharding: leaf_sharding, opt_state,
                                     leaf_shardings, transform_non_params=lambda _: replicated)

    return TrainState(
        step=replicated,
        params=params_sharding,
        ema_params=params_sharding,
        opt_state=opt_shardings(txs[MODEL], abstract.opt_state, params_sharding),
        reference_norms=jax.tree.map(lambda _: replicated, abstract.reference_norms),
        rng=replicated,
        partner_params=partner_shardings,
        partner_opt_state={name: opt_shardings(txs[name], abstract.partner_opt_state[name],
                                               partner_shardings[name])
                           for name in partner_shardings},
        variables=jax.tree.map(lambda _: replicated, abstract.variables),
    )


def create_state(
    init_networks: Callable[[jax.Array], Networks],
    txs: Optimizers,
    shardings: TrainState,
    seed: int,
    params: Any | None = None,
) -> TrainState:
    """A step-0 state created on the mesh in its sharded layout (never on one device first).

    Args:
      params: start the model from these (sharded) params instead of a fresh init
        (`init_from`); partners and variables are initialised afresh.
    """
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))

    def init(ik, r, model_params):
        networks = unbox_networks(init_networks(ik))
        if model_params is not None:
            networks = networks._replace(params=model_params)
        return state_from_networks(networks, r, txs)

    return jax.jit(init, out_shardings=shardings)(init_key, rng, params)


def _overlay(fresh: Any, partial: Any, path: str) -> Any:
    """`fresh` with the leaves present in the nested dict `partial` replaced (same shapes)."""
    if isinstance(partial, Mapping):
        if not isinstance(fresh, Mapping):
            raise ValueError(f"pretrained value at {path or '/'}: expected an array, got a dict")
        unknown = sorted(set(partial) - set(fresh))
        if unknown:
            raise ValueError(f"pretrained values for {[f'{path}/{k}' for k in unknown]}, which "
                             f"the network does not have (it has {sorted(fresh)} at "
                             f"{path or '/'})")
        return {k: _overlay(v, partial[k], f"{path}/{k}") if k in partial else v
                for k, v in fresh.items()}
    if tuple(partial.shape) != tuple(fresh.shape):
        raise ValueError(f"pretrained value at {path} has shape {tuple(partial.shape)}, the "
                         f"network expects {tuple(fresh.shape)}")
    return jnp.asarray(partial, fresh.dtype)


def with_pretrained(state: TrainState, pretrained: Networks, shardings: TrainState) -> TrainState:
    """A fresh state with `Task.pretrained` values written over its networks (jitted, with the
    values as arguments; donates `state`). The EMA starts from the new params and the
    reference norms are re-measured; optimizer states (zeros at step 0) are kept.

    Raises:
      ValueError: a pretrained path that the networks lack, or a shape that differs.
    """

    def overlay(s, values):
        params = _overlay(s.params, values.params or {}, "params")
        return s.replace(
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            reference_norms=optimizer_lib.frobenius_norms(params),
            partner_params=_overlay(s.partner_params, values.partners or {}, "partners"),
            variables=_overlay(s.variables, values.variables or {}, "variables"),
        )

    return jax.jit(overlay, out_shardings=shardings, donate_argnums=(0,))(state, pretrained)
