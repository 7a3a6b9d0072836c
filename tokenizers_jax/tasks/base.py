"""The interface between the generic training loop and one trainable model.

A task owns everything model-specific; the loop owns everything else (sharding, host draws,
micro-batch accumulation, optimizers, EMA, checkpoints, logging). What a task provides:

  networks   `init_params`: the model (the params that are exported, EMA-averaged, evaluated
             and loaded by `load_tokenizer`); `init_partners`: other trained networks with
             optimizers of their own (a GAN discriminator); `init_variables`: non-trained
             state that the step updates (LeCam EMAs, spectral-norm vectors, BatchNorm
             statistics). All three live in the train state and its checkpoints.
             `pretrained`: released weights written over parts of them when a run starts
             from scratch (e.g. DetailFlow's encoder from SigLIP2).
  optimizers `optimizer_configs`: one optimizer section per trained network.
  objectives `objectives`: the losses of a micro-batch in order, each differentiated with
             respect to one network at the state's current values. They run in sequence
             inside one jitted step: each sees the non-trained state left by the previous one
             and a `carry` from it (e.g. the generator's reconstructions for the
             discriminator), then every network takes one optimizer update. A single-model
             task only defines `loss` (the default objective).
  host draws `host_draws(step)`: random choices made on the host before tracing: a static
             variant (the loop compiles one step per variant, e.g. DetailFlow's decoder output
             size) and small replicated arrays (e.g. its prefix length and noise index).
  evaluation `evaluate`, `batch_images`, `synthetic_batch`.

One step, for micro-batch i and loss group g (keys fold_in(step key, i * G + g)):

  for objective in objectives():   loss, LossOutput(metrics, variables, carry)
                                     = objective.loss(params, context, batch, key)
                                   grads[objective.trains] += d loss / d params[...] / n
  then: each network's optimizer; for the model also fix_initial_norms and the EMA.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Hashable, Mapping, NamedTuple

import jax
import ml_collections
import numpy as np

Params = Any
Batch = Mapping[str, Any]
MODEL = "model"  # the name of the task's model among its trained networks


class Networks(NamedTuple):
    """What a task initialises: the model, the partner networks and the non-trained state."""

    params: Params  # the model, with nn.LogicallyPartitioned leaves when freshly initialised
    partners: dict[str, Params]  # name -> params of another trained network (boxed likewise)
    variables: Any  # non-trained state updated by the step (plain arrays, replicated)


class StepContext(NamedTuple):
    """What an objective reads besides the params, batch and key (nothing is differentiated)."""

    constants: Any  # `Task.constants`, replicated
    variables: Any  # non-trained state as left by the previous objective
    draws: Mapping[str, jax.Array]  # this step's host draws (replicated arrays)
    static: Hashable  # this step's static variant (a Python value)
    carry: Any  # the previous objective's carry for this micro-batch group (None first)


class LossOutput(NamedTuple):
    """The auxiliary outputs of an objective."""

    metrics: Mapping[str, jax.Array]  # scalar metrics (averaged over groups and micro-batches)
    variables: Any = None  # the updated non-trained state; None leaves it unchanged
    carry: Any = None  # passed to the next objective of the same micro-batch


class Objective(NamedTuple):
    """One differentiated loss of the train step.

    Attributes:
      name: the metric name of its loss ("loss" for the model's main objective).
      trains: MODEL or a partner name: the network this loss is differentiated against.
      loss: (params {MODEL: ..., **partners}, StepContext, batch, key) -> (fp32 scalar,
        LossOutput).
    """

    name: str
    trains: str
    loss: Callable[..., tuple[jax.Array, LossOutput]]


class Task(abc.ABC):
    """One trainable thing. Subclasses are constructed from the full config."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # --- networks ---------------------------------------------------------------------------

    @abc.abstractmethod
    def init_params(self, key: jax.Array) -> Params:
        """Freshly initialised model params with `nn.LogicallyPartitioned` (boxed) leaves."""

    def init_partners(self, key: jax.Array) -> dict[str, Params]:
        """Other trained networks, each with its own optimizer (boxed leaves); none by default."""
        del key
        return {}

    def init_variables(self, key: jax.Array) -> Any:
        """Initial non-trained state that the step updates (plain arrays); none by default."""
        del key
        return {}

    def init_networks(self, key: jax.Array) -> Networks:
        """All three, from one key (the model gets `key` itself)."""
        return Networks(self.init_params(key), self.init_partners(jax.random.fold_in(key, 1)),
                        self.init_variables(jax.random.fold_in(key, 2)))

    def pretrained(self) -> Networks | None:
        """Pretrained values for parts of a fresh run's networks, or None (the default).

        Each field is a partial tree: nested dicts following the params' (or variables')
        paths, with host arrays of the same shapes at the leaves to replace; paths left out
        keep their fresh initialisation. The loop writes them over a run that starts from
        scratch (not over a resumed one; the model part not over `init_from`'s params), as jit
        arguments rather than compiled-in constants, so they may be large.
        """
        return None

    def optimizer_configs(self) -> dict[str, ml_collections.ConfigDict]:
        """Optimizer section per trained network (see `training.optimizer.default_optim_config`)."""
        return {MODEL: self.config.optim}

    @property
    def constants(self) -> Any:
        """Frozen inputs of the loss that are not trained (e.g. perceptual-network weights).

        Placed on the devices once (replicated) and passed to the objectives and `evaluate`.
        """
        return {}

    # --- the step -----------------------------------------------------------------------------

    def objectives(self) -> tuple[Objective, ...]:
        """The losses of one micro-batch, in order. Default: `loss` on the model."""

        def model_loss(params, context: StepContext, batch, key):
            loss, metrics = self.loss(params[MODEL], context.constants, batch, key)
            return loss, LossOutput(metrics)

        return (Objective("loss", MODEL, model_loss),)

    def loss(self, params: Params, constants: Any, batch: Batch, key: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Loss of one micro-batch for single-model tasks: (fp32 scalar, dict of scalars)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither loss nor objectives")

    def host_draws(self, step: int) -> tuple[Hashable, dict[str, np.ndarray]]:
        """(static variant, replicated arrays) for update `step`; a pure function of the step
        (and the config's seed) so that a resumed run draws the same. Default: (None, {})."""
        del step
        return None, {}

    def freeze_mask(self, params: Params) -> Any | None:
        """Bool tree of the model params that `optim.freeze_after` freezes, or None."""
        return None

    def fixed_norm_mask(self, params: Params) -> Any | None:
        """Bool tree of the model params kept at their reference norm (fix_initial_norms)."""
        return None

    # --- evaluation and benchmarks ------------------------------------------------------------

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
