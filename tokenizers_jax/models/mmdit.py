"""The Flux-style MMDiT trunk used by FlowMo's encoder and decoder (spec 1.2-1.4).

Two streams, latent ("txt", first) and image patches ("img"), run through double-stream blocks
with joint attention. With timesteps, every block is adaLN-modulated by a time embedding
(decoder); without, modulation is the identity (shift 0, scale 1 + 0, gate 1: encoder).

The encoder's modulation layers, time embedding and final adaLN exist in the original
checkpoint but are never called; they are created at init (and only then evaluated) so that
parameter trees, counts and checkpoints match the original exactly.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenizers_jax import layer_stack, layers
from tokenizers_jax.layers import EMBED, HEADS, IO, MLP, Dense, layer_norm, modulate

TIME_EMBED_DIM = 256


@dataclasses.dataclass(frozen=True)
class TrunkConfig:
    """Width and depth of one MMDiT (head_dim = hidden_size / num_heads = sum(axes_dim))."""

    hidden_size: int
    num_heads: int
    depth: int
    axes_dim: tuple[int, ...]
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} % num_heads {self.num_heads} != 0")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(
                f"sum(axes_dim)={sum(self.axes_dim)} must equal the head dim "
                f"hidden_size/num_heads={head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def timestep_embedding(t: jax.Array, dim: int = TIME_EMBED_DIM) -> jax.Array:
    """[B] times in [0, 1] -> [B, dim] fp32 [cos(1000 t f_k), sin(1000 t f_k)], f_k = 1e4^(-k/half)."""
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def position_ids(code_length: int, grid: tuple[int, int]) -> np.ndarray:
    """[code_length + gh * gw, 3] RoPE ids: latent i -> (i, i, i), then patch (r, c) -> (0, r, c)."""
    latent = np.repeat(np.arange(code_length)[:, None], 3, axis=1)
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    image = np.stack([np.zeros(rows.size, np.int64), rows.ravel(), cols.ravel()], axis=1)
    return np.concatenate([latent, image], axis=0)


class TimeEmbedder(nn.Module):
    """MLPEmbedder: Linear(256 -> h) -> SiLU -> Linear(h -> h)."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:  # [B] -> [B, h]
        h = Dense(self.hidden_size, kernel_axes=(None, MLP), dtype=self.dtype, name="in_layer")(
            timestep_embedding(t)
        )
        return Dense(self.hidden_size, kernel_axes=(MLP, EMBED), dtype=self.dtype,
                     name="out_layer")(nn.silu(h))


class Modulation(nn.Module):
    """silu(vec) -> Linear(h, 6h): (shift1, scale1, gate1, shift2, scale2, gate2), each [B, 1, h].

    The gate chunks (2 and 5) start at zero, so modulated residual branches vanish at init.
    """

    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, vec: jax.Array) -> tuple[jax.Array, ...]:
        out = Dense(
            6 * self.hidden_size,
            kernel_axes=(EMBED, MLP),
            dtype=self.dtype,
            kernel_init=layers.zero_chunks(layers.torch_kernel_init(), 6, (2, 5)),
            bias_init=lambda fan_in: layers.zero_chunks(layers.torch_bias_init(fan_in), 6, (2, 5)),
            name="lin",
        )(nn.silu(vec))
        return tuple(chunk[:, None, :] for chunk in jnp.split(out, 6, axis=-1))


class QKNorm(nn.Module):
    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return layers.RMSNorm(name="query_norm")(q), layers.RMSNorm(name="key_norm")(k)


class StreamAttention(nn.Module):
    """One stream's attention weights: fused qkv (+ q/k RMSNorm) and the output projection."""

    hidden_size: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.qkv = Dense(3 * self.hidden_size, kernel_axes=(EMBED, HEADS), dtype=self.dtype)
        self.norm = QKNorm()
        self.proj = Dense(self.hidden_size, kernel_axes=(HEADS, EMBED), dtype=self.dtype)

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[B, L, h] -> q, k, v [B, L, H, D]; the fused output is laid out (K H D)."""
        b, length, _ = x.shape
        qkv = self.qkv(x).reshape(b, length, 3, self.num_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = self.norm(q, k)
        return q, k, v

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class DoubleStreamBlock(nn.Module):
    """MMDiT block: separate weights per stream, joint attention over [txt; img]."""

    config: TrunkConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        c = self.config
        mlp_hidden = int(c.hidden_size * c.mlp_ratio)
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(c.hidden_size, self.dtype))
            setattr(self, f"{stream}_attn", StreamAttention(c.hidden_size, c.num_heads, self.dtype))
            setattr(self, f"{stream}_mlp", layers.FeedForward(mlp_hidden, self.dtype))

    def _modulations(self, stream: str, vec: jax.Array | None, reference: jax.Array):
        mod = getattr(self, f"{stream}_mod")
        if vec is not None:
            return mod(vec)
        if self.is_initializing():  # create the original's unused encoder parameters
            mod(jnp.zeros((1, self.config.hidden_size), self.dtype))
        zero = jnp.zeros((), reference.dtype)
        one = jnp.ones((), reference.dtype)
        return zero, zero, one, zero, zero, one

    def __call__(self, img, txt, vec, angles):
        """img [B, N, h], txt [B, L, h], vec [B, h] or None, angles [L + N, D/2]."""
        streams = {"txt": txt, "img": img}
        mods, qkv = {}, {}
        for name, x in streams.items():
            mods[name] = self._modulations(name, vec, x)
            shift1, scale1 = mods[name][0], mods[name][1]
            qkv[name] = getattr(self, f"{name}_attn").project_qkv(
                modulate(layer_norm(x), shift1, scale1)
            )
        q, k, v = (jnp.concatenate([qkv["txt"][i], qkv["img"][i]], axis=1) for i in range(3))
        q, k = layers.apply_rope(q, angles), layers.apply_rope(k, angles)
        out = layers.attention(
            q, k, v, scale=8.0 / self.config.head_dim, implementation=self.attention_impl
        )
        out = out.reshape(*out.shape[:2], -1)  # heads merged head-major
        split = {"txt": out[:, : txt.shape[1]], "img": out[:, txt.shape[1] :]}
        for name, x in streams.items():
            shift1, scale1, gate1, shift2, scale2, gate2 = mods[name]
            del shift1, scale1
            x = x + gate1 * getattr(self, f"{name}_attn")(split[name])
            mlp_in = modulate(layer_norm(x), shift2, scale2)
            streams[name] = x + gate2 * getattr(self, f"{name}_mlp")(mlp_in)
        return streams["img"], streams["txt"]


class _ScannedBlock(DoubleStreamBlock):
    """A DoubleStreamBlock with nn.scan's signature: ((img, txt), vec, angles) -> (carry, None)."""

    def __call__(self, carry, vec, angles):  # pylint: disable=arguments-differ
        return super().__call__(*carry, vec, angles), None


class LastLayer(nn.Module):
    """Final norm and readout. With vec: adaLN (shift, scale), then LayerNorm *again*."""

    hidden_size: int
    out_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, vec: jax.Array | None) -> jax.Array:
        ada = Dense(2 * self.hidden_size, kernel_axes=(EMBED, MLP), dtype=self.dtype,
                    name="adaLN_modulation")
        if vec is None:
            if self.is_initializing():  # the original's unused encoder parameters
                ada(jnp.zeros((1, self.hidden_size), self.dtype))
            x = layer_norm(x)
        else:
            shift, scale = jnp.split(ada(nn.silu(vec)), 2, axis=-1)
            x = layer_norm(modulate(layer_norm(x), shift[:, None], scale[:, None]))
        return Dense(self.out_features, kernel_axes=(EMBED, IO), dtype=self.dtype,
                     name="linear")(x)


class MMDiT(nn.Module):
    """The trunk. Returns (image-stream readout [B, N, patch_dim], latent readout [B, L, ctx])."""

    config: TrunkConfig
    patch_dim: int  # input/output features per image token (p * p * 3)
    context_dim: int  # input/output features per latent token
    rope_theta: float = 10000.0
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False  # recompute each block's activations in the backward pass
    # Run the blocks with nn.scan: one compiled block instead of `depth`, params stacked under
    # double_blocks_scan (see tokenizers_jax.layer_stack for the conversion).
    scan_layers: bool = False

    @nn.compact
    def __call__(self, img_tokens, txt_tokens, grid, timesteps=None):
        """
        Args:
          img_tokens: [B, gh * gw, patch_dim] patchified image.
          txt_tokens: [B, L, context_dim] latent tokens.
          grid: (gh, gw) static patch grid.
          timesteps: [B] flow times, or None (no modulation).
        """
        c = self.config
        img = Dense(c.hidden_size, kernel_axes=(IO, EMBED), dtype=self.dtype, name="img_in")(
            img_tokens
        )
        txt = Dense(c.hidden_size, kernel_axes=(IO, EMBED), dtype=self.dtype, name="txt_in")(
            txt_tokens
        )
        time_in = TimeEmbedder(c.hidden_size, self.dtype, name="time_in")
        if timesteps is not None:
            vec = time_in(timesteps)
        else:
            vec = None
            if self.is_initializing():  # the original's unused encoder parameters
                time_in(jnp.zeros((1,), jnp.float32))
        ids = position_ids(txt_tokens.shape[1], grid)
        angles = layers.rope_angles(ids, c.axes_dim, self.rope_theta)
        if self.scan_layers:
            block_class = _ScannedBlock
            if self.remat:  # the same policy as unrolled; no CSE barrier needed inside a scan
                block_class = nn.remat(block_class, prevent_cse=False)
            blocks = nn.scan(block_class, variable_axes={"params": 0},
                             split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                             length=c.depth, metadata_params={nn.PARTITION_NAME: None})
            (img, txt), _ = blocks(c, self.dtype, self.attention_impl,
                                   name=layer_stack.stacked_name("double_blocks"))(
                (img, txt), vec, angles)
        else:
            block_class = nn.remat(DoubleStreamBlock) if self.remat else DoubleStreamBlock
            for i in range(c.depth):
                img, txt = block_class(c, self.dtype, self.attention_impl,
                                       name=f"double_blocks_{i}")(img, txt, vec, angles)
        img_out = LastLayer(c.hidden_size, self.patch_dim, self.dtype, name="final_layer_img")(
            img, vec
        )
        txt_out = LastLayer(c.hidden_size, self.context_dim, self.dtype,
                            name="final_layer_txt")(txt, vec)
        return img_out, txt_out
