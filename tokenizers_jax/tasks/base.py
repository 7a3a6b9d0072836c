"""The interface between the generic training loop and one trainable model.

A task owns everything model-specific: parameter init, the loss of one micro-batch, which
parameters freeze or keep their norms, and evaluation. The loop owns everything else
(sharding, accumulation, optimizer, EMA, checkpoints, logging).
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

Params = Any
Batch = Mapping[str, Any]


class Task(abc.ABC):
    """One trainable thing. Subclasses are constructed from the full config."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def init_params(self, key: jax.Array) -> Params:
        """Freshly initialised params with `nn.LogicallyPartitioned` (boxed) leaves."""

    @property
    def constants(self) -> Any:
        """Frozen inputs of the loss that are not trained (e.g. perceptual-network weights).

        Placed on the devices once (replicated) and passed to `loss` and `evaluate`.
        """
        return {}

    @abc.abstractmethod
    def loss(self, params: Params, constants: Any, batch: Batch, key: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Loss of one micro-batch: (scalar fp32 loss, dict of scalar metrics)."""

    def freeze_mask(self, params: Params) -> Any | None:
        """Bool tree of the params that `optim.freeze_after` freezes, or None."""
        return None

    def fixed_norm_mask(self, params: Params) -> Any | None:
        """Bool tree of the params kept at their reference norm (fix_initial_norms), or None."""
        return None

    @abc.abstractmethod
    def evaluate(self, params: Params, constants: Any, batch: Batch, key: jax.Array
                 ) -> tuple[dict[str, jax.Array], jax.Array]:
        """(dict of scalar metrics, images [B, H, W, 3] in [-1, 1] shown under the inputs)."""

    def synthetic_batch(self, batch_size: int) -> Batch:
        """A random batch shaped like the data pipeline's (for benchmarks): uint8 images."""
        size = self.config.data.image_size
        rng = np.random.default_rng(0)
        return {"image": rng.integers(0, 256, (batch_size, size, size, 3), np.uint8)}

    @staticmethod
    def batch_images(batch: Batch) -> np.ndarray:
        """The input images of a batch as float [B, H, W, 3] in [-1, 1] (for the image grid)."""
        return np.asarray(batch["image"], np.float32) / 127.5 - 1.0
