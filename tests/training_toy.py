"""A toy task and config for fast training-loop tests (a linear autoencoder on 8x8 photos).

Registered as model.name "toy". Its params mirror FlowMo's layout: an "encoder" subtree (for
freezing) and a "decoder/double_blocks_0" kernel (for fix_initial_norms).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenizers_jax import tasks
from tokenizers_jax.config_file import load_config
from tokenizers_jax.tasks.base import Task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tasks.TASKS["toy"] = "training_toy:ToyTask"

IMAGE_SIZE = 8
PIXELS = IMAGE_SIZE * IMAGE_SIZE * 3
WIDTH = 16


class ToyTask(Task):
    """x -> tanh(x We) Wd + b; loss = MSE (+ `toy_nan` to force a NaN)."""

    def init_params(self, key):
        k1, k2 = jax.random.split(key)
        boxed = lambda value, names: nn.LogicallyPartitioned(value, names)
        return {
            "encoder": {"kernel": boxed(jax.random.normal(k1, (PIXELS, WIDTH)) * 0.05,
                                        ("io", "embed"))},
            "decoder": {"double_blocks_0": {
                "kernel": boxed(jax.random.normal(k2, (WIDTH, PIXELS)) * 0.05, ("embed", "io")),
                "bias": boxed(jnp.zeros((PIXELS,)), ("io",)),
            }},
        }

    def _reconstruct(self, params, images):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 127.5 - 1.0
        hidden = jnp.tanh(x @ params["encoder"]["kernel"])
        block = params["decoder"]["double_blocks_0"]
        return x, hidden @ block["kernel"] + block["bias"]

    def loss(self, params, constants, batch, key):
        x, y = self._reconstruct(params, batch["image"])
        noise = self.config.get("toy_noise", 0.01) * jax.random.normal(key, x.shape)
        mse = jnp.mean(jnp.square(y - x - noise))
        if self.config.get("toy_nan", False):
            mse = mse * jnp.nan
        return mse, {"mse": mse}

    def freeze_mask(self, params):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "encoder", params)

    def fixed_norm_mask(self, params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: len(path) > 1 and path[1].key == "double_blocks_0"
            and path[-1].key == "kernel", params)

    def evaluate(self, params, constants, batch, key):
        x, y = self._reconstruct(params, batch["image"])
        return {"mse": jnp.mean(jnp.square(y - x))}, jnp.clip(y, -1, 1).reshape(batch["image"].shape)


def toy_config(**train):
    """The tiny FlowMo training config with the toy model on 8x8 sample-photo crops."""
    config = load_config(os.path.join(ROOT, "configs", "flowmo.py") + ":tiny")
    config.unlock()
    config.model.name = "toy"
    config.data.image_size = IMAGE_SIZE
    config.data.read_threads = 1
    config.train.update(dict(num_steps=6, batch_size=8), **train)
    config.optim.lr = 1e-2
    config.checkpoint.update(every=3, keep=5)
    config.logging.every = 1
    config.eval.update(every=3, num_images=4)
    return config
