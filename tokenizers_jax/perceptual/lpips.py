"""LPIPS v0.1 with the VGG16 trunk (`lpips.LPIPS(net="vgg")`).

params = load_lpips_params()                  # converted weights, see below
distance = lpips_distance(params, x, y)       # x, y: [B, H, W, 3] in [-1, 1] -> [B]
noisy = lpips_distance(params, x, y, key)     # training mode: the heads' Dropout(0.5) active

Each linear head is torch's `Sequential(Dropout(0.5), Conv2d(C, 1, 1))`. In eval mode the
dropout is the identity (the metric). DetailFlow's generator loss runs LPIPS in training mode
(spec 5: `vq_loss.train()`), so the squared feature differences are dropped elementwise with
probability 0.5 and the kept ones doubled before each head (`dropout_keep` draws the masks).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenizers_jax.perceptual.common import load_weights
from tokenizers_jax.perceptual.vgg import LAYER_NAMES, VGG16Features

NAME = "lpips_vgg"
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
DROPOUT_RATE = 0.5  # torch nn.Dropout() in each head
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"


def unit_normalize(features: jax.Array, eps: float = 1e-10) -> jax.Array:
    """x / (||x||_2 over channels + eps). [..., C] -> [..., C]."""
    return features / (jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True)) + eps)


def dropout_keep(key: jax.Array, layer: int, shape: tuple[int, ...]) -> jax.Array:
    """The keep mask of head `layer`'s dropout: bool `shape`, True with probability 0.5."""
    return jax.random.bernoulli(jax.random.fold_in(key, layer), 1.0 - DROPOUT_RATE, shape)


class LPIPS(nn.Module):
    """LPIPS distance. Params: `vgg` (VGG16Features) and `lin0..lin4` (1x1 convs, no bias).

    Args of __call__: x, y [B, H, W, 3] in [-1, 1]; dropout_key: None for eval mode, else a
    key for the heads' training-mode dropout. Returns [B].
    """

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
        vgg = VGG16Features(name="vgg")
        features_x = vgg((x.astype(jnp.float32) - shift) / scale)
        features_y = vgg((y.astype(jnp.float32) - shift) / scale)
        distance = 0.0
        for k, layer in enumerate(LAYER_NAMES):
            diff = (unit_normalize(features_x[layer]) - unit_normalize(features_y[layer])) ** 2
            if dropout_key is not None:
                keep = dropout_keep(dropout_key, k, diff.shape)
                diff = jnp.where(keep, diff / (1.0 - DROPOUT_RATE), 0.0)
            weighted = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}")(diff)  # [B, h, w, 1]
            distance = distance + jnp.mean(weighted, axis=(1, 2, 3))
        return distance


def lpips_distance(params: Any, x: jax.Array, y: jax.Array,
                   dropout_key: jax.Array | None = None) -> jax.Array:
    """LPIPS-VGG between x and y, [B, H, W, 3] in [-1, 1] -> [B]; with `dropout_key`, in
    training mode (the heads' dropout active, as DetailFlow's generator loss)."""
    return LPIPS().apply({"params": params}, x, y, dropout_key)


def how_to_get(directory: str) -> str:
    """Download and conversion instructions for the LPIPS-VGG weights."""
    return (
        "Download the torchvision VGG16 trunk and the LPIPS v0.1 linear heads:\n"
        f"  {VGG16_FILE}  from {VGG16_URL}\n"
        f"  {LIN_FILE}  (lpips/weights/v0.1/vgg.pth) from {LIN_URL}\n"
        "  (or `pip install lpips --no-deps`, whose bundled heads the converter finds itself)\n"
        "then convert them:\n"
        f"  python -m tokenizers_jax.convert lpips --checkpoint {VGG16_FILE} "
        f"--lin-checkpoint {LIN_FILE} --output {directory}"
    )


def init_lpips_params(key: jax.Array) -> Any:
    """Random LPIPS params (on a 32x32 dummy input).

    The linear heads are made non-negative, as the trained ones are (LPIPS training clamps them at 0),
    so that random-init distances are non-negative too.
    """
    dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
    params = dict(LPIPS().init(key, dummy, dummy)["params"])
    for k in range(len(LAYER_NAMES)):
        params[f"lin{k}"] = jax.tree.map(jnp.abs, params[f"lin{k}"])
    return params


def load_lpips_params(path: str | os.PathLike | None = None, allow_random_init: bool = False):
    """Converted LPIPS-VGG params; see `perceptual.common.load_weights` for the arguments."""
    return load_weights(NAME, init_lpips_params, how_to_get, path, allow_random_init)
