"""Building blocks shared by the models: PyTorch-initialised dense layers, norms, N-d RoPE,
attention, MLPs, adaLN modulation and patchify.

Every parameter carries logical axis names (see `tokenizers_jax.training.sharding` for the
rules that map them onto a device mesh). Parameters are fp32; `dtype` is the compute dtype.
Norms, softmax and RoPE run in fp32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# Logical axis names used on parameters.
EMBED = "embed"  # model width (FSDP-sharded by default)
MLP = "mlp"  # hidden width of MLPs
HEADS = "heads"  # fused attention projections (q/k/v, out)
VOCAB = "vocab"  # codebooks, class tables, logits
NORM = "norm"  # per-channel scales of norms
IO = "io"  # small input/output feature dims (patch pixels, code channels)


def torch_kernel_init() -> Initializer:
    """PyTorch's default nn.Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default nn.Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def zero_chunks(init: Initializer, num_chunks: int, zero: Sequence[int]) -> Initializer:
    """Wraps an init so that the given chunks of the last axis (split into `num_chunks`) are 0."""

    def wrapped(key, shape, dtype=jnp.float32):
        value = init(key, shape, dtype)
        size = shape[-1] // num_chunks
        for chunk in zero:
            value = value.at[..., chunk * size : (chunk + 1) * size].set(0)
        return value

    return wrapped


class Dense(nn.Module):
    """Linear layer with PyTorch default init. Kernel is [in, out] (the transpose of torch's).

    Attributes:
      features: output width.
      kernel_axes: logical axis names of the kernel (in, out); the bias takes the second.
      kernel_init / bias_init: override the PyTorch default (bias_init gets fan_in).
    """

    features: int
    use_bias: bool = True
    kernel_axes: tuple[str | None, str | None] = (None, None)
    dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Callable[[int], Initializer] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., features]
        fan_in = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init or torch_kernel_init(), self.kernel_axes),
            (fan_in, self.features),
            jnp.float32,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    (self.bias_init or torch_bias_init)(fan_in), (self.kernel_axes[1],)
                ),
                (self.features,),
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, computed in fp32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with learned scale and bias (torch nn.LayerNorm), computed in fp32."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)), (width,)
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)), (width,)
        )
        y = layer_norm(x.astype(jnp.float32), self.eps) * scale + bias
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times a learned scale (init 1)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)), (x.shape[-1],)
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        # Round to the input dtype before the fp32 scale, as the original does.
        return (normed.astype(x.dtype).astype(jnp.float32) * scale).astype(x.dtype)


def rope_angles(positions: np.ndarray, axes_dim: Sequence[int], theta: float) -> np.ndarray:
    """N-d rotary angles, computed on the host in float64 like the original.

    Args:
      positions: [L, n_axes] integer position ids.
      axes_dim: per-axis rotary dims (each even); they sum to the head dim.
    Returns:
      [L, sum(axes_dim) // 2] fp32 angles: the pairs of axis 0, then axis 1, ...
    """
    positions = np.asarray(positions, np.float64)
    if positions.shape[-1] != len(axes_dim):
        raise ValueError(f"positions have {positions.shape[-1]} axes, axes_dim {len(axes_dim)}")
    per_axis = []
    for axis, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"every RoPE axis dim must be even, got axes_dim={tuple(axes_dim)}")
        omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        per_axis.append(np.outer(positions[:, axis], omega))
    return np.concatenate(per_axis, axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2j], x[2j+1]) by `angles`, in fp32.

    Args:
      x: [B, L, H, D].
      angles: [L, D // 2] (float64 on the host is fine; used as fp32).
    Returns:
      [B, L, H, D] in x's dtype.
    """
    angles = jnp.asarray(angles, jnp.float32)[None, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([cos * even - sin * odd, sin * even + cos * odd], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def check_cudnn_attention(dtype: Any):
    """Raises a ValueError unless cuDNN fused attention can run here: an NVIDIA GPU backend
    and a 16-bit compute dtype (what its kernels take)."""
    backend = jax.default_backend()
    if backend != "gpu" or not jax.devices()[0].device_kind.startswith("NVIDIA"):
        raise ValueError(
            f"model.attention_impl='cudnn' needs an NVIDIA GPU (cuDNN fused attention); this "
            f"process runs on {backend} ({jax.devices()[0].device_kind}): use "
            f"model.attention_impl='xla', which runs everywhere")
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention_impl='cudnn' takes bfloat16 or float16 inputs, got "
                         f"{jnp.dtype(dtype).name}: set model.dtype='bfloat16' (or use 'xla')")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    mask: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention with fp32 logits and softmax.

    The XLA path runs both products heads-major ([B, H, L, D], the layout every backend's
    batched matmul takes without copies of the [B, H, Lq, Lk] logits) and scales q (in fp32)
    rather than the logits. Results match `jax.nn.dot_product_attention` to rounding.

    Args:
      q, k, v: [B, L, H, D].
      scale: logit multiplier (e.g. 1/sqrt(D), or FlowMo's 8/D).
      mask: optional boolean [Lq, Lk] or [B, 1, Lq, Lk] (any axis may be 1); True means
        "may attend". Every query must see at least one key.
      implementation: None (XLA) or "cudnn" (fused kernel on NVIDIA GPUs, bf16/fp16 only;
        anywhere else a ValueError says so), as in `jax.nn.dot_product_attention`.
    Returns:
      [B, L, H, D] in v's dtype.
    """
    if mask is not None and mask.ndim == 2:
        mask = mask[None, None]
    if implementation == "cudnn":
        check_cudnn_attention(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation="cudnn")
    if implementation is not None:
        raise ValueError(f"unknown attention implementation {implementation!r}; use None (XLA) "
                         "or 'cudnn'")
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, L, D]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, v), 1, 2)


class FeedForward(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear, with biases (PyTorch inits by default)."""

    hidden: int
    dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Callable[[int], Initializer] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
        dense = lambda features, axes, name: Dense(
            features, kernel_axes=axes, dtype=self.dtype, kernel_init=self.kernel_init,
            bias_init=self.bias_init, name=name)
        h = nn.gelu(dense(self.hidden, (EMBED, MLP), "fc1")(x), approximate=True)
        return dense(x.shape[-1], (MLP, EMBED), "fc2")(h)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: (1 + scale) * x + shift, with shift/scale [B, 1, D] broadcast over tokens."""
    return (1 + scale) * x + shift


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]; row-major tokens, features in (py, px, c) order."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
    """Inverse of `patchify`: [B, gh*gw, p*p*C] -> [B, gh*p, gw*p, C]."""
    b, _, features = tokens.shape
    p = patch_size
    gh, gw = grid
    c = features // (p * p)
    x = tokens.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, c)
