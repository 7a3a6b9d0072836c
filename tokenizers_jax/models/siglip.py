"""SigLIP2-style vision transformer (Hugging Face `Siglip2VisionTransformer` without its head).

Pre-LN blocks (LayerNorm eps 1e-6, biased q/k/v/o, tanh-GELU MLP) and a final
`post_layernorm`. The learned position table (S*S entries) is resized to the patch grid with
antialiased bilinear interpolation (torch `F.interpolate(..., antialias=True)`), as SigLIP2's
NaFlex embeddings do. DetailFlow uses it three times: the encoder (the first 12 so400m
layers), the decoder (random init, no patch embedding) and the frozen 27-layer teacher.

Parameter names follow Hugging Face (`layers_i/self_attn/q_proj`, `layers_i/mlp/fc1`, ...)
so that the importers are a table of renames. Initialisation follows HF `_init_weights`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tokenizers_jax import layers
from tokenizers_jax.layers import EMBED, HEADS, IO, Dense, LayerNorm
from tokenizers_jax.resize import resize_bilinear

Dtype = Any

_xavier = nn.initializers.xavier_uniform()


def _zeros_bias(fan_in: int) -> layers.Initializer:
    del fan_in
    return nn.initializers.zeros


def _tiny_normal_bias(fan_in: int) -> layers.Initializer:
    del fan_in
    return nn.initializers.normal(1e-6)


class SiglipAttention(nn.Module):
    """Multi-head self-attention with separate biased q/k/v/out projections."""

    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D]; mask: boolean, broadcastable to [B, 1, L, L] (True = attend)."""
        b, length, width = x.shape
        head_dim = width // self.num_heads

        def project(name, axes):
            return Dense(width, kernel_axes=axes, dtype=self.dtype, kernel_init=_xavier,
                         bias_init=_zeros_bias, name=name)

        def heads(t):
            return t.reshape(b, length, self.num_heads, head_dim)

        q = heads(project("q_proj", (EMBED, HEADS))(x))
        k = heads(project("k_proj", (EMBED, HEADS))(x))
        v = heads(project("v_proj", (EMBED, HEADS))(x))
        out = layers.attention(q, k, v, head_dim**-0.5, mask, self.attention_impl)
        return project("out_proj", (HEADS, EMBED))(out.reshape(b, length, width))


class SiglipBlock(nn.Module):
    """x + attn(LN1(x)); x + mlp(LN2(x))."""

    num_heads: int
    mlp_dim: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        attn = SiglipAttention(self.num_heads, self.dtype, self.attention_impl, name="self_attn")
        x = x + attn(LayerNorm(self.eps, name="layer_norm1")(x), mask)
        mlp = layers.FeedForward(self.mlp_dim, self.dtype, kernel_init=_xavier,
                                 bias_init=_tiny_normal_bias, name="mlp")  # HF inits
        return x + mlp(LayerNorm(self.eps, name="layer_norm2")(x))


class SiglipViT(nn.Module):
    """SigLIP2 vision tower: patch embedding + resized position table, blocks, post LayerNorm.

    Attributes:
      width, depth, num_heads, mlp_dim: transformer shape.
      patch_size: pixels per patch side.
      position_grid: side S of the learned S x S position table.
      use_patch_embedding: whether the tower has its Linear(p*p*3 -> width) patch embedding
        (the DetailFlow decoder replaces it by the identity).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 16
    position_grid: int = 16
    use_patch_embedding: bool = True
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
        if self.use_patch_embedding:
            self.patch_embedding = Dense(
                self.width, kernel_axes=(IO, EMBED), dtype=self.dtype,
                kernel_init=nn.initializers.lecun_normal(), bias_init=_zeros_bias,
            )
        self.position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.width**-0.5), (None, EMBED)),
            (self.position_grid**2, self.width),
        )
        self.layers = [
            SiglipBlock(self.num_heads, self.mlp_dim, self.eps, self.dtype, self.attention_impl)
            for _ in range(self.depth)
        ]
        self.post_layernorm = LayerNorm(self.eps)

    def positions(self, grid: tuple[int, int]) -> jax.Array:
        """The position table resized to the patch grid: [gh * gw, width] fp32, row-major."""
        s = self.position_grid
        table = jnp.asarray(self.position_embedding, jnp.float32).reshape(s, s, self.width)
        return resize_bilinear(table, grid, antialias=True).reshape(grid[0] * grid[1], self.width)

    def embed(self, patches: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """[B, gh*gw, p*p*3] patch vectors -> [B, gh*gw, width] tokens (patch embed + positions)."""
        if not self.use_patch_embedding:
            raise ValueError("this tower has no patch embedding")
        return self.patch_embedding(patches) + self.positions(grid).astype(self.dtype)

    def transform(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The blocks and post LayerNorm: [B, L, width] -> [B, L, width]."""
        x = tokens.astype(self.dtype)
        for block in self.layers:
            x = block(x, mask)
        return self.post_layernorm(x)

    def __call__(self, images: jax.Array) -> jax.Array:
        """The HF forward on a full image: [B, H, W, 3] in [-1, 1] -> [B, (H/p)(W/p), width]."""
        p = self.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)
        return self.transform(self.embed(layers.patchify(images, p), grid))


def vit_from_config(
    cfg: ml_collections.ConfigDict,
    dtype: Dtype = jnp.float32,
    attention_impl: str = "xla",
    use_patch_embedding: bool = True,
) -> SiglipViT:
    """A `SiglipViT` from a config section with width, depth, num_heads, mlp_dim, patch_size,
    position_grid (and optionally layer_norm_eps)."""
    return SiglipViT(
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        patch_size=cfg.patch_size,
        position_grid=cfg.position_grid,
        use_patch_embedding=use_patch_embedding,
        eps=cfg.get("layer_norm_eps", 1e-6),
        dtype=dtype,
        attention_impl=None if attention_impl == "xla" else attention_impl,
    )
