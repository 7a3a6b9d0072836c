"""Pieces shared by the pretrained perceptual networks: frozen BatchNorm and weight loading.

The networks (VGG16-LPIPS, ResNet-50, FID Inception) are frozen: their params, BatchNorm
statistics included, form one `params` tree, converted once from the released PyTorch files
into a model directory (`tokenizers_jax.exported`). `load_weights` finds that directory:
an explicit `path`, else `$TOKENIZERS_JAX_WEIGHTS/<name>`, else `~/.cache/tokenizers_jax/<name>`.

Convolutions run in the default matmul precision; for fp32-faithful metrics on TPU wrap the
call in `jax.default_matmul_precision("highest")`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenizers_jax import exported

WEIGHTS_ENV = "TOKENIZERS_JAX_WEIGHTS"


class FrozenBatchNorm(nn.Module):
    """Eval-mode BatchNorm over the last axis; statistics live in `params` (mean, var)."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., C] -> [..., C]
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        mean = self.param("mean", nn.initializers.zeros, (channels,))
        var = self.param("var", nn.initializers.ones, (channels,))
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


def conv(
    features: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    bias: bool = False,
    name: str | None = None,
):
    """An `nn.Conv` with torch's Conv2d arguments (symmetric explicit padding)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return nn.Conv(
        features,
        (kh, kw),
        strides=(stride, stride),
        padding=((ph, ph), (pw, pw)),
        use_bias=bias,
        name=name,
    )


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """torch `F.max_pool2d` (floor mode; padding is -inf). [B, H, W, C] -> [B, h, w, C]."""
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (kernel, kernel), (stride, stride), pad)


def default_weights_dir(name: str) -> str:
    """`$TOKENIZERS_JAX_WEIGHTS/<name>`, or `~/.cache/tokenizers_jax/<name>`."""
    root = os.environ.get(WEIGHTS_ENV) or os.path.join("~", ".cache", "tokenizers_jax")
    return os.path.join(os.path.expanduser(root), name)


def load_weights(
    name: str,
    init: Callable[[jax.Array], Any],
    how_to_get: Callable[[str], str],
    path: str | os.PathLike | None = None,
    allow_random_init: bool = False,
) -> Any:
    """Loads a converted perceptual network, or random params if allowed.

    Args:
      name: `model.name` in the model directory's config, and the default directory name.
      init: PRNG key -> params (the network's `init` on a dummy input).
      how_to_get: target directory -> instructions to download and convert the weights.
      path: a model directory; default `default_weights_dir(name)`.
      allow_random_init: return random params (with a loud warning) if the weights are absent.
    Returns:
      The params tree (fp32).
    Raises:
      FileNotFoundError: no model directory at `path`; the message says what to fetch.
      ValueError: the directory holds another model or params of the wrong shapes.
    """
    directory = os.path.abspath(os.path.expanduser(os.fspath(path or default_weights_dir(name))))
    template = jax.eval_shape(init, jax.random.key(0))
    if not exported.is_model_dir(directory):
        if not allow_random_init:
            raise FileNotFoundError(
                f"No converted {name} weights in {directory} (expected config.json and params/).\n"
                + how_to_get(directory)
                + f"\nOr pass path=<model dir>, or set ${WEIGHTS_ENV} to the folder with {name}/."
            )
        logging.warning(
            "\n" + "!" * 78 + "\n"
            f"!! {name}: weights not found in {directory}.\n"
            "!! Using RANDOMLY INITIALISED parameters (allow_random_init=True).\n"
            "!! Every loss and metric computed with this network is MEANINGLESS: use it only\n"
            "!! for tests and smoke runs. To get the real weights:\n"
            + "\n".join("!!   " + line for line in how_to_get(directory).splitlines())
            + "\n"
            + "!" * 78
        )
        return jax.jit(init)(jax.random.key(0))
    found = exported.load_config(directory).get("model", {}).get("name")
    if found != name:
        raise ValueError(f"{directory} holds model {found!r}, expected {name!r}")
    params = exported.load_params(directory)
    expected = jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), template)
    got = jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), params)
    if expected != got:
        raise ValueError(f"{directory}: params do not match the {name} network; re-convert them")
    return params
