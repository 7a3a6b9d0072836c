"""torchvision ResNet-50 (IMAGENET1K_V1) and FlowMo's post-training "perceptual" loss.

The loss (MaskBit's PerceptualLoss as used by FlowMo, spec flowmo.md section 6) is the MSE
between the 1000 ImageNet logits of two images:

    params = load_resnet50_params()
    loss = resnet_logit_mse(params, x, y)        # x, y: [B, H, W, 3] in [-1, 1] -> scalar
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenizers_jax.perceptual.common import FrozenBatchNorm, conv, load_weights, max_pool
from tokenizers_jax.resize import resize_bilinear

NAME = "resnet50"
CHECKPOINT_FILE = "resnet50-0676ba61.pth"
CHECKPOINT_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
# (bottleneck width, number of blocks) of layer1..layer4; the first block of layer2..4
# downsamples by 2.
STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))
EXPANSION = 4


class Bottleneck(nn.Module):
    """torchvision Bottleneck, v1.5 (stride on the 3x3 conv). [B, H, W, C] -> [B, h, w, 4 width]."""

    width: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = nn.relu(FrozenBatchNorm(name="bn1")(conv(self.width, 1, name="conv1")(x)))
        out = conv(self.width, 3, self.stride, padding=1, name="conv2")(out)
        out = nn.relu(FrozenBatchNorm(name="bn2")(out))
        out = FrozenBatchNorm(name="bn3")(conv(self.width * EXPANSION, 1, name="conv3")(out))
        if self.downsample:
            x = conv(self.width * EXPANSION, 1, self.stride, name="downsample_0")(x)
            x = FrozenBatchNorm(name="downsample_1")(x)
        return nn.relu(out + x)


class ResNet50(nn.Module):
    """torchvision resnet50. Module `layerI.J` is `layerI_J`, `downsample.K` is `downsample_K`.

    Input: [B, H, W, 3] ImageNet-normalised. Returns logits [B, num_classes].
    """

    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv(64, 7, 2, padding=3, name="conv1")(x.astype(jnp.float32))
        x = max_pool(nn.relu(FrozenBatchNorm(name="bn1")(x)), 3, 2, padding=1)
        for stage, (width, num_blocks) in enumerate(STAGES):
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(
                    width, stride, downsample=block == 0, name=f"layer{stage + 1}_{block}"
                )(x)
        return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


def resnet_logits(params: Any, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] -> [0, 1] -> antialiased resize to 224 -> ImageNet norm -> logits
    [B, 1000]."""
    images01 = (jnp.asarray(images, jnp.float32) + 1.0) / 2.0
    images01 = resize_bilinear(images01, (INPUT_SIZE, INPUT_SIZE), antialias=True)
    normalized = (images01 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return ResNet50().apply({"params": params}, normalized)


def resnet_logit_mse(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over batch and classes of (logits(x) - logits(y))^2. x, y: [B, H, W, 3] in [-1, 1]."""
    return jnp.mean((resnet_logits(params, x) - resnet_logits(params, y)) ** 2)


def how_to_get(directory: str) -> str:
    """Download and conversion instructions for the ResNet-50 weights."""
    return (
        f"Download torchvision's ResNet-50 IMAGENET1K_V1 weights {CHECKPOINT_FILE}\n"
        f"  from {CHECKPOINT_URL}\n"
        "then convert them:\n"
        f"  python -m tokenizers_jax.convert resnet50 --checkpoint {CHECKPOINT_FILE} "
        f"--output {directory}"
    )


def init_resnet50_params(key: jax.Array) -> Any:
    """Random ResNet-50 params (on a 32x32 dummy input)."""
    return ResNet50().init(key, jnp.zeros((1, 32, 32, 3), jnp.float32))["params"]


def load_resnet50_params(path: str | os.PathLike | None = None, allow_random_init: bool = False):
    """Converted ResNet-50 params; see `perceptual.common.load_weights` for the arguments."""
    return load_weights(NAME, init_resnet50_params, how_to_get, path, allow_random_init)
