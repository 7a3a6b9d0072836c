"""The FID InceptionV3 of pytorch-fid (`pt_inception-2015-12-05` weights).

It differs from torchvision's Inception v3 in the FID blocks: the average pools of
Mixed_5b..5d (A), 6b..6e (C) and 7b (E) exclude the zero padding from the count, and the
pool branch of the last block, Mixed_7c, is a 3x3 max pool instead.

    params = load_inception_params()
    features = inception_features(params, images01)   # [B, H, W, 3] in [0, 1] -> [B, 2048]
    outputs = inception_outputs(params, images01)     # pool, spatial and logits (below)

The weights are those of TensorFlow's 2015 Inception graph (`classify_image_graph_def.pb`),
which the ADM evaluator (and DetailFlow's gFID) runs; pytorch-fid ported them. The activations
the ADM evaluator reads correspond to ours as follows:
  pool_3:0                    -> `pool`: the 2048-d average pool after Mixed_7c.
  mixed_6/conv:0, [..., :7]   -> `spatial`: the TF graph names its blocks mixed, mixed_1, ...,
                                 mixed_10, so mixed_6 is Mixed_6d (mixed_3 is 6a); its `conv`
                                 is the 1x1 branch after BatchNorm and ReLU, torchvision's
                                 Mixed_6d.branch1x1, the first 192 channels of Mixed_6d's
                                 output. sFID uses its first 7 channels at 17x17 (for a 299
                                 input), flattened in (row, column, channel) order: 2023-d.
  softmax/logits/MatMul       -> `logits`: pool @ fc.weight.T WITHOUT fc.bias. The ADM
                                 evaluator (like improved-gan's Inception Score) takes the
                                 MatMul's weight and applies softmax to pool_3 @ W, so the
                                 bias is never added. 1008 classes.
The networks still differ before the trunk: pytorch-fid resizes to 299 with half-pixel
bilinear interpolation and scales [0, 1] -> [-1, 1] (2x - 1); the TF graph resizes with its
ResizeBilinear op and scales by (x - 128) / 128 from [0, 255]. So our numbers are close to the
ADM evaluator's but not identical.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenizers_jax.perceptual.common import FrozenBatchNorm, conv, load_weights, max_pool
from tokenizers_jax.resize import resize_bilinear

NAME = "inception_fid"
CHECKPOINT_FILE = "pt_inception-2015-12-05-6726825d.pth"
CHECKPOINT_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + CHECKPOINT_FILE
)
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes and 8 unused)
SPATIAL_CHANNELS = 7  # of mixed_6/conv, as the ADM evaluator's sFID


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; torch args (kernel, stride, padding)."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv(self.features, self.kernel, self.stride, self.padding, name="conv")(x)
        return nn.relu(FrozenBatchNorm(eps=1e-3, name="bn")(x))


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3, stride 1, pad 1 average that ignores the padding (count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b..5d: [B, H, W, C] -> [B, H, W, 224 + pool_features]."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(64, 1, name="branch1x1")(x)
        branch5x5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv2d(self.pool_features, 1, name="branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision's, unchanged): [B, H, W, C] -> [B, h, w, 480 + C], h = (H-3)//2+1."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convs. [B, H, W, C] -> [B, H, W, 768]."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = BasicConv2d(192, 1, name="branch1x1")(x)
        branch7x7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        dbl = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(dbl)
        dbl = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(dbl)
        dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(dbl)
        dbl = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(dbl)
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision's, unchanged): [B, H, W, C] -> [B, h, w, 512 + C]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (avg pool without padding) / 7c (max pool). [B, H, W, C] -> [B, H, W, 2048]."""

    max_pool_branch: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(320, 1, name="branch1x1")(x)
        branch3x3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        dbl = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        dbl = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(dbl)
        dbl = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl),
            ],
            axis=-1,
        )
        pooled = max_pool(x, 3, 1, padding=1) if self.max_pool_branch else avg_pool_3x3(x)
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class InceptionOutputs(NamedTuple):
    """The activations the generation metrics use (see the module docstring)."""

    pool: jax.Array  # [B, 2048] (FID, precision / recall)
    spatial: jax.Array  # [B, h * w * 7], Mixed_6d's first 7 channels (sFID); h = w = 17 at 299
    logits: jax.Array  # [B, 1008] without the fc bias (Inception Score)


class UnbiasedClassifier(nn.Module):
    """pytorch-fid's `fc` (Linear 2048 -> 1008); returns x @ kernel without the bias, as the
    ADM evaluator and improved-gan compute the Inception Score. The bias is a parameter only
    so the checkpoint converts whole."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 2048] -> [B, 1008]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
        self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
        return x @ kernel


class FIDInceptionV3(nn.Module):
    """pytorch-fid InceptionV3 blocks 0-3 and its fc; submodule names are torchvision's.

    Input: [B, H, W, 3] in [-1, 1], H, W >= 75 (299 for FID). Returns pool features [B, 2048],
    or with all_outputs=True the `InceptionOutputs`.
    """

    all_outputs: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | InceptionOutputs:
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x.astype(jnp.float32))
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = max_pool(x, 3, 2)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = max_pool(x, 3, 2)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, channels_7x7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = FIDInceptionC(channels_7x7, name=name)(x)
            if name == "Mixed_6d":  # channels [0, 192) are its branch1x1 (TF mixed_6/conv)
                spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE(max_pool_branch=False, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool_branch=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = UnbiasedClassifier(name="fc")(pool)  # always, so init creates its params
        return InceptionOutputs(pool, spatial, logits) if self.all_outputs else pool


def _network_input(images01: jax.Array, input_size: int) -> jax.Array:
    """[B, H, W, 3] in [0, 1] -> bilinear resize (no antialias) -> 2x - 1, as pytorch-fid."""
    x = resize_bilinear(images01, (input_size, input_size), antialias=False)
    return 2.0 * x - 1.0


def inception_features(params: Any, images01: jax.Array) -> jax.Array:
    """FID features: [B, H, W, 3] in [0, 1] -> resize to 299 -> [B, 2048]."""
    return FIDInceptionV3().apply({"params": params}, _network_input(images01, INPUT_SIZE))


def inception_outputs(params: Any, images01: jax.Array, input_size: int = INPUT_SIZE
                      ) -> InceptionOutputs:
    """Pool features, sFID spatial features and classifier logits of [B, H, W, 3] images in
    [0, 1], resized to `input_size` (299 for every published metric; tests use less)."""
    return FIDInceptionV3(all_outputs=True).apply({"params": params},
                                                  _network_input(images01, input_size))


def how_to_get(directory: str) -> str:
    """Download and conversion instructions for the FID Inception weights."""
    return (
        f"Download pytorch-fid's Inception weights {CHECKPOINT_FILE}\n"
        f"  from {CHECKPOINT_URL}\n"
        "then convert them:\n"
        f"  python -m tokenizers_jax.convert inception --checkpoint {CHECKPOINT_FILE} "
        f"--output {directory}"
    )


def init_inception_params(key: jax.Array) -> Any:
    """Random FID Inception params (on a 75x75 dummy input)."""
    return FIDInceptionV3().init(key, jnp.zeros((1, 75, 75, 3), jnp.float32))["params"]


def load_inception_params(path: str | os.PathLike | None = None, allow_random_init: bool = False):
    """Converted FID Inception params; see `perceptual.common.load_weights` for the arguments."""
    return load_weights(NAME, init_inception_params, how_to_get, path, allow_random_init)
