"""Vector quantizer with l2-normalised codes and codebook (DetailFlow, spec 1.2).

The codebook parameter is stored un-normalised (as in the released checkpoints) and
normalised at use. All quantizer math runs in fp32 at full matmul precision, whatever the
compute dtype, so nearest-code choices do not depend on the backend's default precision.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenizers_jax.layers import IO, VOCAB


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis (torch `F.normalize`)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """||z||^2 + ||e||^2 - 2 z.e, as the original computes it.

    Args:
      z: [..., D] fp32.
      codebook: [K, D] fp32.
    Returns:
      [..., K] fp32.
    """
    cross = jnp.einsum("...d,kd->...k", z, codebook, precision=jax.lax.Precision.HIGHEST)
    return (
        jnp.sum(jnp.square(z), axis=-1, keepdims=True)
        + jnp.sum(jnp.square(codebook), axis=-1)
        - 2.0 * cross
    )


def straight_through(z: jax.Array, codes: jax.Array) -> jax.Array:
    """z + sg(codes - z): the value of `codes` with the gradient of `z`."""
    return z + jax.lax.stop_gradient(codes - z)


def masked_mse(a: jax.Array, b: jax.Array, start: jax.Array | int) -> jax.Array:
    """mean((a - b)^2) over tokens `start..L-1` (all batch entries and channels).

    Args:
      a, b: [B, L, D].
      start: int scalar (may be traced), 0 <= start < L.
    """
    positions = jnp.arange(a.shape[1])[None, :, None]
    keep = (positions >= start).astype(jnp.float32)
    count = a.shape[0] * a.shape[2] * (a.shape[1] - start)
    return jnp.sum(jnp.square(a - b) * keep) / count


def draw_neighbour_ranks(key: jax.Array, shape: tuple[int, ...], top_k: int) -> jax.Array:
    """Uniform ranks in [0, top_k) (one per token) picking a random near neighbour."""
    return jax.random.randint(key, shape, 0, top_k, dtype=jnp.int32)


class VQOutput(NamedTuple):
    """Result of `VectorQuantizer.__call__`; shapes for z of [B, L, D]."""

    quantized: jax.Array  # [B, L, D] straight-through unit codes (the decoder input)
    indices: jax.Array  # [B, L] int32 nearest codes
    codebook_loss: jax.Array  # scalar: mean((e - sg(z))^2) from loss_start on
    commitment_loss: jax.Array  # scalar: beta * mean((sg(e) - z)^2) from loss_start on
    neighbours: jax.Array | None  # [B, L, D] straight-through random near-neighbour codes
    neighbour_indices: jax.Array | None  # [B, L] int32


class VectorQuantizer(nn.Module):
    """Nearest-code VQ over an l2-normalised codebook, no EMA (spec 1.2).

    Attributes:
      codebook_size: K.
      dim: code channels D.
      beta: commitment weight.
    """

    codebook_size: int
    dim: int
    beta: float = 0.25

    def setup(self):
        k = self.codebook_size

        def init(key, shape, dtype=jnp.float32):
            return l2_normalize(jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k))

        self.codebook = self.param(
            "codebook", nn.with_logical_partitioning(init, (VOCAB, IO)), (k, self.dim)
        )

    def normalized_codebook(self) -> jax.Array:  # [K, D]
        return l2_normalize(jnp.asarray(self.codebook, jnp.float32))

    def lookup(self, indices: jax.Array) -> jax.Array:
        """[...] int indices -> [..., D] unit codes."""
        return jnp.take(self.normalized_codebook(), indices, axis=0)

    def __call__(
        self,
        z: jax.Array,
        loss_start: jax.Array | int = 0,
        neighbour_ranks: jax.Array | None = None,
        top_k: int = 50,
    ) -> VQOutput:
        """Quantizes z.

        Args:
          z: [B, L, D] encoder outputs (any dtype; computed in fp32 after l2-normalising).
          loss_start: losses average over tokens loss_start..L-1 (may be traced).
          neighbour_ranks: optional [B, L] ints in [0, top_k): also return, per token, the
            code of that rank among the `top_k` nearest (rank 0 = the nearest code).
          top_k: neighbourhood size for `neighbour_ranks`.
        Returns:
          VQOutput.
        """
        z = l2_normalize(z.astype(jnp.float32))
        codebook = self.normalized_codebook()
        distances = squared_distances(z, codebook)
        if neighbour_ranks is None:
            indices = jnp.argmin(distances, axis=-1).astype(jnp.int32)
            neighbours = neighbour_indices = None
        else:
            _, nearest = jax.lax.top_k(-distances, top_k)  # [B, L, top_k], nearest first
            nearest = nearest.astype(jnp.int32)
            indices = nearest[..., 0]
            neighbour_indices = jnp.take_along_axis(nearest, neighbour_ranks[..., None], -1)[..., 0]
            neighbours = straight_through(z, jnp.take(codebook, neighbour_indices, axis=0))
        codes = jnp.take(codebook, indices, axis=0)
        sg = jax.lax.stop_gradient
        return VQOutput(
            quantized=straight_through(z, codes),
            indices=indices,
            codebook_loss=masked_mse(codes, sg(z), loss_start),
            commitment_loss=self.beta * masked_mse(sg(codes), z, loss_start),
            neighbours=neighbours,
            neighbour_indices=neighbour_indices,
        )
