"""The frozen DINO ViT-S/16 trunk of DetailFlow's discriminator (spec 5).

  params = load_dino_params()                          # converted dino_deitsmall16_pretrain.pth
  features = dino_features(params, key, images)        # images [B, H, W, 3] in [-1, 1]
  # -> 5 x [B, 197, 384]: the embedding output (cls + patches + positions) and the outputs
  #    of blocks 2, 5, 8 and 11, fp32.

The trunk is timm's `VisionTransformer` as DINO trained it: a 16x16 patch embedding, a cls
token and a learned 197-entry position table for 224 x 224 inputs, 12 pre-LN blocks
(LayerNorm eps 1e-6, fused biased qkv, exact-erf GELU MLP of width 4 x 384). Its final
LayerNorm is not read by the discriminator and not kept. The original zeroes the key bias
of every qkv; that adds q . b_k to every logit of a query row, which the softmax cancels, so
the bias is kept as loaded.

`dino_input` is the original's input mapping: [-1, 1] -> ImageNet normalisation, then to
224 x 224: if H and W exceed 224, with probability 0.5 one random 224 crop for the whole
batch, otherwise (and always for smaller images) a resize, torch `area` when H > 224 and
`bicubic` otherwise, in fp32. The choice and the crop location come from an explicit key and
are traced.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenizers_jax import layers
from tokenizers_jax.layers import EMBED, HEADS, IO, MLP, Dense, LayerNorm
from tokenizers_jax.perceptual.common import load_weights
from tokenizers_jax.resize import apply_resize_matrices, resize_matrix

Dtype = Any

NAME = "dino_vits16"
CHECKPOINT_FILE = "dino_deitsmall16_pretrain.pth"
CHECKPOINT_URL = (
    "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_BLOCKS = (2, 5, 8, 11)

_trunc_normal = nn.initializers.truncated_normal(0.02)


def _zeros_bias(fan_in: int) -> layers.Initializer:
    del fan_in
    return nn.initializers.zeros


class DinoAttention(nn.Module):
    """timm `Attention`: one fused biased qkv projection, softmax(q k^T / sqrt(d)) v, proj."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
        b, length, width = x.shape
        head_dim = width // self.num_heads
        dense = lambda features, axes, name: Dense(
            features, kernel_axes=axes, dtype=self.dtype, kernel_init=_trunc_normal,
            bias_init=_zeros_bias, name=name)
        qkv = dense(3 * width, (EMBED, HEADS), "qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(b, length, 3, self.num_heads, head_dim), 2, 0)
        out = layers.attention(q, k, v, head_dim**-0.5)
        return dense(width, (HEADS, EMBED), "proj")(out.reshape(b, length, width))


class DinoBlock(nn.Module):
    """x + attn(norm1(x)); x + fc2(gelu(fc1(norm2(x)))) with the exact (erf) GELU."""

    num_heads: int
    mlp_dim: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + DinoAttention(self.num_heads, self.dtype, name="attn")(
            LayerNorm(self.eps, name="norm1")(x))
        dense = lambda features, axes, name: Dense(
            features, kernel_axes=axes, dtype=self.dtype, kernel_init=_trunc_normal,
            bias_init=_zeros_bias, name=name)
        h = LayerNorm(self.eps, name="norm2")(x)
        h = nn.gelu(dense(self.mlp_dim, (EMBED, MLP), "fc1")(h), approximate=False)
        return x + dense(x.shape[-1], (MLP, EMBED), "fc2")(h)


class DinoViT(nn.Module):
    """DINO ViT trunk returning the activations the discriminator heads read.

    Attributes:
      width, depth, num_heads, mlp_dim, patch_size: the ViT shape (ViT-S/16 by default).
      image_size: the input side the position table is for (224: 14 x 14 patches + cls).
      feature_blocks: blocks whose outputs are returned, after the embedding output.
      dtype: compute dtype of the blocks; the embedding and the returned features are fp32.
    """

    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    patch_size: int = 16
    image_size: int = 224
    feature_blocks: Sequence[int] = FEATURE_BLOCKS
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @property
    def num_tokens(self) -> int:
        """cls + patches: 197 for ViT-S/16 at 224."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
        if not all(0 <= i < self.depth for i in self.feature_blocks):
            raise ValueError(f"feature_blocks {tuple(self.feature_blocks)} must lie in "
                             f"[0, depth={self.depth})")
        self.patch_embed = Dense(self.width, kernel_axes=(IO, EMBED), name="patch_embed")
        self.cls_token = self.param(
            "cls_token", nn.with_logical_partitioning(nn.initializers.normal(1e-6), (EMBED,)),
            (self.width,))
        self.pos_embed = self.param(
            "pos_embed", nn.with_logical_partitioning(_trunc_normal, (None, EMBED)),
            (self.num_tokens, self.width))
        self.blocks = [
            DinoBlock(self.num_heads, self.mlp_dim, self.eps, self.dtype) for _ in range(self.depth)
        ]

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        """Normalised images [B, S, S, 3] (S = image_size, see `dino_input`) -> the embedding
        output and the `feature_blocks` outputs, each [B, num_tokens, width] fp32."""
        size = (self.image_size, self.image_size)
        if tuple(images.shape[1:3]) != size:
            raise ValueError(f"DINO expects {size} inputs (see dino_input), got {images.shape}")
        b = images.shape[0]
        patches = self.patch_embed(layers.patchify(jnp.asarray(images, jnp.float32),
                                                   self.patch_size))
        cls = jnp.broadcast_to(self.cls_token, (b, 1, self.width))
        x = jnp.concatenate([cls, patches], axis=1) + self.pos_embed  # [B, L, D] fp32
        features = [x]
        x = x.astype(self.dtype)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.feature_blocks:
                features.append(x.astype(jnp.float32))
        return features


class DinoCrop(NamedTuple):
    """The random choices of one `dino_input` call."""

    use_crop: jax.Array  # [] bool: crop (True) or resize
    top: jax.Array  # [] int32 crop location (the same for the whole batch)
    left: jax.Array


def draw_dino_crop(
    key: jax.Array, height: int, width: int, image_size: int = 224, crop_probability: float = 0.5
) -> DinoCrop:
    """Crop or resize (P(crop) = `crop_probability`; never for sides <= image_size), and a
    uniformly drawn crop location."""
    coin_key, top_key, left_key = jax.random.split(key, 3)
    can_crop = height > image_size and width > image_size
    return DinoCrop(
        use_crop=(jax.random.uniform(coin_key) < crop_probability) & can_crop,
        top=jax.random.randint(top_key, (), 0, max(height - image_size, 0) + 1),
        left=jax.random.randint(left_key, (), 0, max(width - image_size, 0) + 1),
    )


def map_dino_input(images: jax.Array, crop: DinoCrop, image_size: int = 224) -> jax.Array:
    """`dino_input` with given random choices: [B, H, W, 3] in [-1, 1] -> [B, S, S, 3] fp32."""
    mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
    x = jnp.asarray(images, jnp.float32) * (0.5 / std) + (0.5 - mean) / std
    b, height, width, channels = x.shape
    if (height, width) == (image_size, image_size):
        return x
    method = "area" if height > image_size else "bicubic"  # the original looks at H only
    resized = apply_resize_matrices(x, resize_matrix(height, image_size, method),
                                    resize_matrix(width, image_size, method))
    if not (height > image_size and width > image_size):
        return resized
    cropped = jax.lax.dynamic_slice(
        x, (0, crop.top, crop.left, 0), (b, image_size, image_size, channels))
    return jnp.where(crop.use_crop, cropped, resized)


def dino_input(
    key: jax.Array, images: jax.Array, image_size: int = 224, crop_probability: float = 0.5
) -> jax.Array:
    """The discriminator's input mapping (spec 5): [B, H, W, 3] in [-1, 1] -> [B, S, S, 3].

    ImageNet normalisation of (x + 1) / 2, then: if H and W exceed S, with probability
    `crop_probability` a crop at one uniformly drawn location for the whole batch, else a
    resize to S x S (torch `area` when H > S, `bicubic` otherwise; identity at S). fp32.
    """
    _, height, width, _ = images.shape
    crop = draw_dino_crop(key, height, width, image_size, crop_probability)
    return map_dino_input(images, crop, image_size)


def dino_features(
    params: Any, key: jax.Array, images: jax.Array, vit: DinoViT | None = None
) -> list[jax.Array]:
    """`dino_input` then the trunk: [B, H, W, 3] in [-1, 1] -> 5 x [B, 197, 384] fp32."""
    vit = DinoViT() if vit is None else vit
    return vit.apply({"params": params}, dino_input(key, images, vit.image_size))


def init_dino_params(key: jax.Array, vit: DinoViT | None = None) -> Any:
    """Random trunk params (unboxed), e.g. for tests; real ones come from `load_dino_params`."""
    vit = DinoViT() if vit is None else vit
    images = jnp.zeros((1, vit.image_size, vit.image_size, 3), jnp.float32)
    return nn.unbox(vit.init(key, images)["params"])


def how_to_get(directory: str) -> str:
    """Download and conversion instructions for the DINO ViT-S/16 weights."""
    return (
        f"Download DINO ViT-S/16 ({CHECKPOINT_FILE}, facebookresearch/dino) from\n"
        f"  {CHECKPOINT_URL}\n"
        "then convert it:\n"
        f"  python -m tokenizers_jax.convert dino --checkpoint {CHECKPOINT_FILE} "
        f"--output {directory}"
    )


def load_dino_params(path: str | os.PathLike | None = None, allow_random_init: bool = False,
                     vit: DinoViT | None = None):
    """Converted DINO ViT-S/16 params; see `perceptual.common.load_weights` for the arguments
    (default directory `$TOKENIZERS_JAX_WEIGHTS/dino_vits16` or ~/.cache/tokenizers_jax/...).

    Args:
      vit: the trunk's shape (default ViT-S/16); the loaded params must fit it, and random
        params are drawn for it (e.g. a small trunk for smoke tests).
    """
    init = functools.partial(init_dino_params, vit=vit)
    return load_weights(NAME, init, how_to_get, path, allow_random_init)
