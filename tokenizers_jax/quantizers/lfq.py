"""Lookup-free quantization (LFQ) as in FlowMo (spec 4).

A code [B, T, F] (F = context_dim) is quantized channel-wise by sign. For the entropy loss and
for token indices, the F channels of a token are split into `F // fg` codewords of fg bits
with a *strided* grouping: codeword j of token t holds channels {g * fh + j : g < fg}, where
fh = F // fg. Codeword indices are little-endian: index = sum_g [bit_g > 0] * 2**g.

Shapes: B batch, T code length, F channels, fg bits per codeword, fh = F // fg codewords per
token, N = T * fh codewords per image, K = 2**fg.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LFQOutput(NamedTuple):
    codes: jax.Array  # [B, T, F] straight-through +-1 codes (x + stop_gradient(q - x))
    indices: jax.Array  # [B, N] int32 codeword indices in [0, 2**fg)
    sample_entropy: jax.Array  # [] mean per-codeword entropy (H_s)
    codebook_entropy: jax.Array  # [] entropy of the batch-mean distribution (H_b)
    commitment: jax.Array  # [] mean (x - stop_gradient(q))**2
    loss: jax.Array  # [] entropy_weight * (H_s - H_b) + commit_weight * commitment


def to_codewords(code: jax.Array, bits: int) -> jax.Array:
    """[B, T, F] -> [B, T * fh, fg]: the strided grouping "b t (fg fh) -> b (t fh) fg"."""
    b, t, f = code.shape
    if f % bits:
        raise ValueError(f"context_dim {f} is not divisible by codebook_size_for_entropy {bits}")
    return code.reshape(b, t, bits, f // bits).transpose(0, 1, 3, 2).reshape(b, -1, bits)


def from_codewords(codewords: jax.Array, code_length: int) -> jax.Array:
    """Inverse of `to_codewords`: [B, T * fh, fg] -> [B, T, F]."""
    b, n, bits = codewords.shape
    fh = n // code_length
    return codewords.reshape(b, code_length, fh, bits).transpose(0, 1, 3, 2).reshape(
        b, code_length, bits * fh
    )


def sign_quantize(x: jax.Array) -> jax.Array:
    """+1 where x > 0, else -1 (so 0 maps to -1)."""
    return jnp.where(x > 0, 1.0, -1.0).astype(x.dtype)


def index_bits(indices: jax.Array, bits: int) -> jax.Array:
    """[...] int indices -> [..., fg] float32 +-1 vectors (little-endian bits)."""
    weights = jnp.asarray(2 ** np.arange(bits), jnp.int32)
    set_bits = (jnp.asarray(indices, jnp.int32)[..., None] // weights) % 2
    return set_bits.astype(jnp.float32) * 2.0 - 1.0


def codes_to_indices(code: jax.Array, bits: int) -> jax.Array:
    """[B, T, F] codes (sign decides) -> [B, N] int32 little-endian codeword indices."""
    positive = (to_codewords(code, bits) > 0).astype(jnp.int32)
    return jnp.sum(positive << jnp.arange(bits, dtype=jnp.int32), axis=-1)


def indices_to_codes(indices: jax.Array, bits: int, code_length: int) -> jax.Array:
    """[B, N] codeword indices -> [B, T, F] float32 +-1 codes."""
    return from_codewords(index_bits(indices, bits), code_length)


def codebook(bits: int) -> jax.Array:
    """[2**fg, fg] the +-1 vector of every index, in index order."""
    return index_bits(jnp.arange(2**bits), bits)


def entropy_terms(codewords: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """Sample and codebook entropies of softmax(2 x . C^T / temperature) over all 2**fg codes.

    The distribution factorises per bit, p(bit_g = +1) = sigmoid(4 x_g / temperature), which
    gives the sample entropy exactly as a sum of binary entropies and the log-probabilities of
    all codes as one matmul, without forming the logits. Computed in fp32.

    Args:
      codewords: [..., fg] continuous (pre-quantization) values.
    Returns:
      (H_s, H_b): mean per-codeword entropy and the entropy of the mean distribution.
    """
    x = codewords.reshape(-1, codewords.shape[-1]).astype(jnp.float32)  # [M, fg]
    scaled = 4.0 * x / temperature
    log_p_pos = jax.nn.log_sigmoid(scaled)  # [M, fg]
    log_p_neg = jax.nn.log_sigmoid(-scaled)
    p_pos = jnp.exp(log_p_pos)
    sample_entropy = -jnp.sum(p_pos * log_p_pos + (1 - p_pos) * log_p_neg, -1).mean()
    positive = (codebook(x.shape[-1]) > 0).astype(jnp.float32)  # [K, fg]
    hp = jax.lax.Precision.HIGHEST
    log_probs = jnp.dot(log_p_pos, positive.T, precision=hp) + jnp.dot(
        log_p_neg, 1 - positive.T, precision=hp
    )  # [M, K]
    mean_probs = jnp.exp(log_probs).mean(0)
    codebook_entropy = -jnp.sum(mean_probs * jnp.log(mean_probs + 1e-5))
    return sample_entropy, codebook_entropy


def lfq(
    code: jax.Array,
    bits: int,
    entropy_weight: float,
    commit_weight: float,
    temperature: float = 0.1,
    with_losses: bool = True,
) -> LFQOutput:
    """Quantizes a code and computes the LFQ losses from the batch it is given.

    Args:
      code: [B, T, F] continuous encoder output.
      bits: codebook_size_for_entropy (fg).
      with_losses: False in evaluation: the losses are 0 (the original's eval mode).
    """
    quantized = sign_quantize(code)
    codes = code + jax.lax.stop_gradient(quantized - code)
    indices = codes_to_indices(quantized, bits)
    zero = jnp.zeros((), jnp.float32)
    if not with_losses:
        return LFQOutput(codes, indices, zero, zero, zero, zero)
    sample_entropy, codebook_entropy = entropy_terms(to_codewords(code, bits), temperature)
    x32 = code.astype(jnp.float32)
    commitment = jnp.mean(jnp.square(x32 - jax.lax.stop_gradient(quantized.astype(jnp.float32))))
    loss = entropy_weight * (sample_entropy - codebook_entropy) + commit_weight * commitment
    return LFQOutput(codes, indices, sample_entropy, codebook_entropy, commitment, loss)
