"""FlowMo training task: stage 1A (pretraining) and stage 1B (mode-seeking post-training).

The stage is chosen by the config alone: `loss.posttrain`, `loss.perceptual` ('lpips' on the
one-step estimate, 'resnet' logit MSE on the integrator sample, or 'none'), `optim.freeze_after`.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from tokenizers_jax import flow, metrics
from tokenizers_jax.models import flowmo
from tokenizers_jax.tasks.base import Batch, Params, Task

# loss.perceptual -> (module, params loader, distance(params, images, estimate) -> [B] or []).
PERCEPTUAL = {
    "lpips": ("tokenizers_jax.perceptual.lpips", "load_lpips_params", "lpips_distance"),
    "resnet": ("tokenizers_jax.perceptual.resnet", "load_resnet50_params", "resnet_logit_mse"),
}


def _path_names(path) -> list[str]:
    return [str(getattr(entry, "key", entry)) for entry in path]


def images_to_float(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 in [-1, 1] (the original's x / 127.5 - 1)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


class FlowMoTask(Task):
    """FlowMo: params {"encoder", "decoder"}; batches {"image": uint8 [B, H, W, 3]}."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = flowmo.build_model(config)
        # The sampler is stored with the run (load_tokenizer decodes with it): fail fast on it.
        flow.sampler_times(config.sampler.steps, config.sampler.schedule)
        self._perceptual = self._load_perceptual(config)

    @staticmethod
    def _load_perceptual(config) -> tuple[Any, Any] | None:
        name = config.loss.perceptual
        if name == "none" or not config.loss.perceptual_weight:
            return None
        if name not in PERCEPTUAL:
            raise ValueError(f"unknown loss.perceptual {name!r}; choose lpips, resnet or none")
        module_name, loader, distance = PERCEPTUAL[name]
        module = importlib.import_module(module_name)
        random_init = config.train.perceptual_random_init
        if random_init:
            logging.warning(
                "*** loss.perceptual=%s uses RANDOMLY INITIALISED weights "
                "(train.perceptual_random_init=True): fine for smoke tests, meaningless for "
                "real training ***", name)
        params = getattr(module, loader)(config.train.perceptual_weights or None,
                                         allow_random_init=random_init)
        return params, getattr(module, distance)

    def init_params(self, key: jax.Array) -> Params:
        return self.model.init(key, *self.model.dummy_inputs(1))["params"]

    @property
    def constants(self) -> Any:
        return {} if self._perceptual is None else {"perceptual": self._perceptual[0]}

    def loss(self, params, constants, batch: Batch, key):
        perceptual_fn = None
        if self._perceptual is not None:
            distance = self._perceptual[1]
            perceptual_fn = lambda x, y: distance(constants["perceptual"], x, y)
        return flowmo.training_loss(self.model, params, images_to_float(batch["image"]), key,
                                    self.config, perceptual_fn)

    def freeze_mask(self, params):
        """Every encoder leaf."""
        return jax.tree_util.tree_map_with_path(
            lambda path, _: _path_names(path)[0] == "encoder", params)

    def fixed_norm_mask(self, params):
        """Dense kernels inside double_blocks_<i> (spec 3: 240 matrices in lo/hi)."""
        if not self.config.train.fix_initial_norms:
            return None
        return jax.tree_util.tree_map_with_path(
            lambda path, _: _path_names(path)[-1] == "kernel"
            and any(name.startswith("double_blocks_") for name in _path_names(path)),
            params)

    def evaluate(self, params, constants, batch: Batch, key):
        images = images_to_float(batch["image"])
        reconstructions = flowmo.reconstruct(self.model, params, images, key, self.config)
        # PSNR over the [-1, 1] range (data_range 2), i.e. the usual one on [0, 1].
        return {"psnr": jnp.mean(metrics.psnr(images, reconstructions, 2.0))}, reconstructions
