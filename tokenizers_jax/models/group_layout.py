"""The group layout of DetailFlow's GPT (spec 6.2-6.3): the sequence, its block mask, the 2D
RoPE angles and the forward passes of parallel group decoding.

Over N = num_tokens positions (g = group_size, c = causal_num, a multiple of g); the logit
at position p predicts token t_p:

  position   0     1 .. c            c+1 .. c+g-1               c+g .. N-1
  input      cls   t_0 .. t_{c-1}    placeholders 0 .. g-2      t_c .. t_{N-g-1}

  mask       row p < c sees positions q <= p (token-causal); row p >= c sees q with
             q // g <= p // g (its whole group and everything before: group-causal);
  RoPE       position p >= 1 sits at (row, col) = ((p-1) // g, (p-1) % g): rotary pairs
             0..D/4-1 turn by row, the rest by col (adjacent pairs, fp32); position 0 (cls)
             has cos = sin = 0, so its query and key vanish. The RoPE rows are offset by one
             from the mask groups p // g, as in the original.

A prefix of T tokens builds the first `sequence_length(T)` positions (training: T = N - g,
all N positions). No position sees a later group (or, below c, a later position), so a
position's keys and values are final once computed, whatever comes after.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tokenizers_jax import layers


def sequence_length(num_inputs: int, group_size: int, causal_num: int) -> int:
    """Length of the sequence built from the first `num_inputs` tokens (spec 6.2/6.3):
    [cls ; t_0..t_{T-1}] while T < c, else the placeholders are inserted after t_{c-1}."""
    return num_inputs + 1 if num_inputs < causal_num else num_inputs + group_size


def attention_mask(positions: jax.Array, num_keys: int, group_size: int,
                   causal_num: int) -> jax.Array:
    """The block mask of spec 6.2 for query rows at `positions` (True = may attend).

    Args:
      positions: int [Q] sequence positions of the queries (may be traced).
      num_keys: the key positions are 0..num_keys-1.
    Returns:
      bool [Q, num_keys].
    """
    p = jnp.asarray(positions)[:, None]
    q = jnp.arange(num_keys)[None, :]
    return jnp.where(p < causal_num, q <= p, q // group_size <= p // group_size)


def rope_angles(num_positions: int, group_size: int, head_dim: int, base: float) -> np.ndarray:
    """Rotary angles of positions 0..num_positions-1 (spec 6.1): [P, head_dim // 2] fp32.

    Position p >= 1 sits at (row, col) = ((p-1) // g, (p-1) % g); the first head_dim // 4
    pairs turn by row * base^(-k / (head_dim / 4)), the others by col likewise. Row 0 (cls)
    is a placeholder: `GPT` zeroes the cls query and key instead of rotating them.
    """
    if head_dim % 4:
        raise ValueError(f"the 2D RoPE needs a head dim divisible by 4, got {head_dim}")
    index = np.maximum(np.arange(num_positions) - 1, 0)
    grid = np.stack([index // group_size, index % group_size], axis=-1)
    return layers.rope_angles(grid, (head_dim // 2, head_dim // 2), base).astype(np.float32)


def input_slots(positions: jax.Array, group_size: int, causal_num: int
                ) -> tuple[jax.Array, jax.Array]:
    """What each position holds: (index of its input token or -1, placeholder index or -1).

    Position 0 holds cls (both -1).
    """
    p = jnp.asarray(positions)
    g, c = group_size, causal_num
    is_placeholder = (p > c) & (p < c + g)
    token = jnp.where(p == 0, -1, jnp.where(p <= c, p - 1, jnp.where(is_placeholder, -1, p - g)))
    return token, jnp.where(is_placeholder, p - c - 1, -1)


def decoding_passes(num_tokens: int, group_size: int, causal_num: int) -> list[tuple[int, int]]:
    """(first token, count) drawn by each forward pass of the sampler, in order: the first c
    tokens one by one, then each group of g (23 passes for N = 128, g = c = 8).

    The pass drawing from token f queries positions f .. f+count-1; a full recompute runs
    the `sequence_length(f)` positions built from the f tokens drawn so far.
    """
    return ([(j, 1) for j in range(causal_num)]
            + [(group_size * k, group_size)
               for k in range(causal_num // group_size, num_tokens // group_size)])
