"""A toy task and config for fast training-loop tests (a linear autoencoder on 8x8 photos).

Registered as model.name "toy". Its params mirror FlowMo's layout: an "encoder" subtree (for
freezing) and a "decoder/double_blocks_0" kernel (for fix_initial_norms).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


class ToyGanTask(ToyTask):
    """The toy autoencoder with a linear critic as a partner network (a GAN in miniature).

    Objectives per micro-batch: the model's MSE + 0.1 * (-mean critic(recon)), then the
    critic's hinge loss on the same (stopped) reconstructions. Non-trained state: an EMA of
    the critic's mean real score, updated by each critic objective. Host draws: a static
    variant (step % 2, the sign of a score offset) and a replicated `shift` array.
    """

    def init_partners(self, key):
        weights = jax.random.normal(key, (PIXELS,)) * 0.05
        return {"critic": {"w": nn.LogicallyPartitioned(weights, ("io",))}}

    def init_variables(self, key):
        del key
        return {"ema_real": jnp.zeros(())}

    def optimizer_configs(self):
        return {tasks.MODEL: self.config.optim, "critic": self.config.critic_optim}

    def host_draws(self, step):
        rng = np.random.default_rng([self.config.seed, step])
        return step % 2, {"shift": np.float32(rng.uniform(-0.5, 0.5))}

    @staticmethod
    def critic(params, images, context):
        sign = 1.0 if context.static else -1.0
        return images.reshape(images.shape[0], -1) @ params["critic"]["w"] + sign * context.draws["shift"]

    def objectives(self):
        def generator(params, context, batch, key):
            x, y = self._reconstruct(params[tasks.MODEL], batch["image"])
            mse = jnp.mean(jnp.square(y - x))
            adversarial = -jnp.mean(self.critic(params, y, context))
            return mse + 0.1 * adversarial, tasks.LossOutput(
                {"mse": mse, "adversarial": adversarial}, carry=(x, jax.lax.stop_gradient(y)))

        def critic(params, context, batch, key):
            x, y = context.carry
            real, fake = self.critic(params, x, context), self.critic(params, y, context)
            hinge = 0.5 * (jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake)))
            ema = 0.9 * context.variables["ema_real"] + 0.1 * jnp.mean(real)
            return hinge, tasks.LossOutput({"ema_real": ema}, variables={"ema_real": ema})

        return (tasks.Objective("loss", tasks.MODEL, generator),
                tasks.Objective("critic_loss", "critic", critic))


tasks.TASKS["toy_gan"] = "training_toy:ToyGanTask"


def toy_gan_config(**train):
    """toy_config with the ToyGanTask and an SGD-like critic optimizer section."""
    from tokenizers_jax.training.optimizer import default_optim_config

    config = toy_config(**train)
    config.model.name = "toy_gan"
    config.critic_optim = default_optim_config(lr=1e-3, clip_grad_norm=1.0)
    return config
