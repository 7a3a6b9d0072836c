"""Params of a model module that defines `dummy_inputs(batch_size)` (FlowMo, MaskGIT)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

Params = Any


def abstract_params(model: nn.Module) -> Params:
    """Shapes and dtypes of the params (unboxed), without allocating them."""
    variables = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs(1))
    return nn.unbox(variables["params"])


def init_params(model: nn.Module, key: jax.Array) -> Params:
    """Randomly initialised params (unboxed), with the module's own initialisers."""
    return nn.unbox(jax.jit(model.init)(key, *model.dummy_inputs(1))["params"])
