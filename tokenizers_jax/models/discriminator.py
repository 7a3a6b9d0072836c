"""DetailFlow's DINO discriminator heads (spec 5, 8): five small 1-D conv nets over the
tokens of the frozen DINO trunk (`tokenizers_jax.models.dino`).

  variables = init_discriminator_variables(key)            # params, spectral, batch_stats
  logits, state = discriminator_logits(
      variables["params"], {"spectral": ..., "batch_stats": ...}, dino_params, key, images)
  # images [B, H, W, 3] in [-1, 1] -> logits [B, 980] fp32 (5 heads x 196 patch tokens)

Head k reads DINO activation k (the embedding output, then blocks 2, 5, 8, 11) as patch
tokens plus the cls token ([B, 197, 384] -> [B, 196, 384]) and runs

  [SNConv1d(k=1) -> BatchNorm -> LeakyReLU(0.2)]
  -> residual (f(h) + h) / sqrt(2), f = [SNConv1d(k=9, circular padding 4) -> BatchNorm -> LReLU]
  -> SNConv1d(384 -> 1, k=1)

Spectral norm is `torch.nn.utils.spectral_norm` (dim 0, eps 1e-12) with one power iteration
on every forward that updates its state; the u and v vectors live in the "spectral"
collection (v in torch's flattening of the (out, in, k) weight, so they import 1:1).
BatchNorm always normalises with the batch statistics (eps 1e-6), as the original's SyncBN
in train mode, and updates torch-style running statistics in "batch_stats" (momentum 0.1,
unbiased running variance, num_batches_tracked), which the original never reads but saves.

Global batch statistics: the statistics are plain `jnp.mean`s over the batch and token axes.
Inside a jitted step whose batch is sharded over the mesh (GSPMD), those means are over the
global batch (the compiler inserts the cross-device reductions), exactly what SyncBN computes
over all GPUs; no axis_name is needed. Under `shard_map`/`pmap` they would be per-device.
Per call: the original runs real and fake through separate discriminator calls, so each call
has its own statistics and updates the state once.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenizers_jax import exported, layers
from tokenizers_jax.layers import EMBED, MLP, NORM
from tokenizers_jax.models.dino import DinoViT, dino_features

Dtype = Any

NAME = "detailflow_discriminator"  # model.name of a converted heads directory
STATE_COLLECTIONS = ("spectral", "batch_stats")
NUM_HEADS = 5
KERNEL_SIZE = 9
LEAKY_SLOPE = 0.2


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """torch `F.normalize(x, dim=0, eps)`: x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


class SpectralConv1d(nn.Module):
    """Conv1d (`same` length, circular padding) whose weight is divided by its spectral norm,
    estimated by torch's power iteration.

    Params: kernel [k, in, out] (torch's weight_orig, transposed), bias [out].
    State ("spectral"): u [out], v [in * k] (torch's weight_u, weight_v).

    Attributes:
      features: output channels.
      kernel_size: odd; padding kernel_size // 2 on each side, wrapping around the tokens.
      kernel_axes: logical names of the kernel's (k, in, out) axes; the bias takes the last.
    """

    features: int
    kernel_size: int = 1
    kernel_axes: tuple[str | None, str | None, str | None] = (None, EMBED, MLP)
    eps: float = 1e-12
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update: bool) -> jax.Array:  # [B, L, in] -> [B, L, out]
        k, fan_in = self.kernel_size, x.shape[-1] * self.kernel_size
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(layers.torch_kernel_init(), self.kernel_axes),
            (k, x.shape[-1], self.features))
        bias = self.param(
            "bias", nn.with_logical_partitioning(layers.torch_bias_init(fan_in),
                                                 (self.kernel_axes[-1],)),
            (self.features,))
        u = self.variable("spectral", "u", lambda: l2_normalize(
            jax.random.normal(self.make_rng("params"), (self.features,)), self.eps))
        v = self.variable("spectral", "v", lambda: l2_normalize(
            jax.random.normal(self.make_rng("params"), (fan_in,)), self.eps))

        matrix = jnp.transpose(kernel, (2, 1, 0)).reshape(self.features, fan_in)  # torch order
        u_vec, v_vec = u.value, v.value
        if update and not self.is_initializing():  # torch's training-mode power iteration
            v_vec = jax.lax.stop_gradient(l2_normalize(matrix.T @ u_vec, self.eps))
            u_vec = jax.lax.stop_gradient(l2_normalize(matrix @ v_vec, self.eps))
            u.value, v.value = u_vec, v_vec
        sigma = jnp.dot(u_vec, matrix @ v_vec)
        weight = (kernel / sigma).astype(self.dtype)

        pad = k // 2
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (pad, pad), (0, 0)), mode="wrap")
        y = jax.lax.conv_general_dilated(x, weight, (1,), "VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y + bias.astype(self.dtype)


class TrainBatchNorm(nn.Module):
    """BatchNorm over all axes but the last, always with the batch statistics (torch
    `BatchNorm1d` in train mode), in fp32.

    Params: scale, bias [C]. State ("batch_stats"): mean, var [C] (torch running_mean /
    running_var, updated with `momentum`, the variance unbiased) and num_batches_tracked [].
    """

    eps: float = 1e-6
    momentum: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, update: bool) -> jax.Array:  # [B, L, C] -> [B, L, C]
        channels = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                           (channels,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
                          (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        count = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)

        x32 = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = x32.mean(axes)
        var = jnp.square(x32 - mean).mean(axes)
        if update and not self.is_initializing():
            n = math.prod(x.shape[:-1])
            m = self.momentum
            running_mean.value = (1 - m) * running_mean.value + m * jax.lax.stop_gradient(mean)
            running_var.value = ((1 - m) * running_var.value
                                 + m * jax.lax.stop_gradient(var) * n / max(n - 1, 1))
            count.value = count.value + 1
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


class DiscriminatorHead(nn.Module):
    """One head: [B, L, C] tokens -> [B, L] logits (fp32)."""

    kernel_size: int = KERNEL_SIZE
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, update: bool) -> jax.Array:
        channels = x.shape[-1]

        def block(h, kernel_size, name):
            h = SpectralConv1d(channels, kernel_size, dtype=self.dtype, name=f"conv_{name}")(h, update)
            h = TrainBatchNorm(self.eps, name=f"norm_{name}")(h, update)
            return nn.leaky_relu(h, LEAKY_SLOPE)

        h = block(x, 1, "in")
        h = (block(h, self.kernel_size, "res") + h) / math.sqrt(2)
        out = SpectralConv1d(1, 1, kernel_axes=(None, EMBED, None), dtype=self.dtype,
                             name="conv_out")(h, update)
        return out[..., 0].astype(jnp.float32)


def readout(activation: jax.Array) -> jax.Array:
    """Patch tokens plus the cls token: [B, 1 + L, C] -> [B, L, C]."""
    return activation[:, 1:] + activation[:, :1]


class DiscriminatorHeads(nn.Module):
    """The heads over the trunk's activations: 5 x [B, 1 + L, C] -> [B, 5 * L] fp32 logits,
    head 0 (the embedding output) first, each head's L patch logits in token order."""

    num_heads: int = NUM_HEADS
    kernel_size: int = KERNEL_SIZE
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, activations: Sequence[jax.Array], update: bool = True) -> jax.Array:
        if len(activations) != self.num_heads:
            raise ValueError(f"{self.num_heads} discriminator heads need as many activations, "
                             f"got {len(activations)}")
        logits = [
            DiscriminatorHead(self.kernel_size, self.eps, self.dtype, name=f"heads_{i}")(
                readout(a.astype(jnp.float32)), update)
            for i, a in enumerate(activations)
        ]
        return jnp.concatenate(logits, axis=1)


def init_discriminator_variables(
    key: jax.Array, heads: DiscriminatorHeads | None = None, channels: int = 384,
    num_tokens: int = 197,
) -> dict:
    """Fresh head variables with boxed (`nn.LogicallyPartitioned`) params:
    {"params", "spectral", "batch_stats"}. The state starts as torch's: u, v ~ normalised
    N(0, 1), running mean 0, running var 1, no batches tracked."""
    heads = DiscriminatorHeads() if heads is None else heads
    activations = [jnp.zeros((2, num_tokens, channels), jnp.float32)] * heads.num_heads
    return heads.init(key, activations)


def discriminator_logits(
    head_params: Any,
    head_state: dict,
    dino_params: Any,
    key: jax.Array,
    images: jax.Array,
    heads: DiscriminatorHeads | None = None,
    vit: DinoViT | None = None,
    update: bool = True,
) -> tuple[jax.Array, dict]:
    """One discriminator call: DINO input mapping + frozen trunk + heads.

    Args:
      head_params: the trained head params (unboxed).
      head_state: {"spectral": ..., "batch_stats": ...} before this call.
      dino_params: the frozen trunk (`load_dino_params`).
      key: the input mapping's crop-or-resize draw.
      images: [B, H, W, 3] in [-1, 1] (already DiffAugment-ed by the caller).
      update: run the power iteration and update the running statistics (the original's
        training mode; False leaves the state as it is).
    Returns:
      (logits [B, num_heads * 196] fp32, the updated head state).
    """
    heads = DiscriminatorHeads() if heads is None else heads
    activations = dino_features(dino_params, key, images, vit)
    logits, new_state = heads.apply({"params": head_params, **head_state}, activations, update,
                                    mutable=list(STATE_COLLECTIONS))
    return logits, dict(new_state)


def load_discriminator_variables(
    directory: str | os.PathLike, heads: DiscriminatorHeads | None = None, channels: int = 384
) -> dict:
    """The head variables {"params", "spectral", "batch_stats"} of a directory written by
    `python -m tokenizers_jax.convert detailflow ... --discriminator` (OUTPUT/discriminator).

    Raises:
      FileNotFoundError / ValueError: no such directory, another model, or other shapes.
    """
    directory = os.fspath(directory)
    if not exported.is_model_dir(directory):
        raise FileNotFoundError(
            f"no converted discriminator in {directory}; write one with `python -m "
            "tokenizers_jax.convert detailflow --checkpoint 128.pt ... --discriminator`")
    found = exported.load_config(directory).get("model", {}).get("name")
    if found != NAME:
        raise ValueError(f"{directory} holds model {found!r}, expected {NAME!r}")
    heads = DiscriminatorHeads() if heads is None else heads
    template = jax.eval_shape(
        lambda k: nn.unbox(init_discriminator_variables(k, heads, channels)), jax.random.key(0))
    variables = exported.load_params(directory)
    shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)
    if shapes(variables) != shapes(template):
        raise ValueError(f"{directory}: the variables do not match {heads}; re-convert them")
    return variables
