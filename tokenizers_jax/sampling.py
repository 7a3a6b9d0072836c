"""Drawing tokens from logits: per-sample keys, classifier-free guidance, temperature, top-k
and top-p (as LlamaGen's `sample` / `top_k_top_p_filtering`).

Every draw takes an explicit key per sample, so a sample never depends on which batch it was
drawn in:

    keys = sample_keys(seed, first_index, batch)                  # uint32 [B, 2]
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
    tokens = draw(step_keys, guide(cond, null, cfg), temperature, top_k, top_p)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_keys(seed: int | jax.Array, first_index: int, count: int) -> jax.Array:
    """Key of sample first_index + i: fold_in(PRNGKey(seed), first_index + i) -> uint32 [count, 2]
    (the rule of `api.Generator`); `seed` may also be a key, used in place of PRNGKey(seed)."""
    base = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    indices = first_index + jnp.arange(count, dtype=jnp.uint32)
    return jax.vmap(jax.random.fold_in, (None, 0))(base, indices)


def guide(cond: jax.Array, uncond: jax.Array, scale: jax.Array | float) -> jax.Array:
    """Classifier-free guidance u + (c - u) * s, in fp32, before temperature."""
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    return uncond + (cond - uncond) * scale


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """LlamaGen's `top_k_top_p_filtering`: removed entries become -inf.

    top_k > 0 keeps the logits >= the k-th largest (ties kept); top_p < 1 then keeps the
    smallest prefix of the sorted distribution whose mass reaches top_p (the first entry whose
    cumulative probability exceeds top_p is kept too, and always the most likely one).

    Args:
      logits: fp32 [..., V]; top_k and top_p are static.
    """
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1, descending=True)
        ranked = jnp.take_along_axis(logits, order, axis=-1)
        beyond = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1) > top_p
        remove_ranked = jnp.concatenate([jnp.zeros_like(beyond[..., :1]), beyond[..., :-1]], -1)
        remove = jnp.take_along_axis(remove_ranked, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def draw(keys: jax.Array, logits: jax.Array, temperature: jax.Array | float,
         top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """One categorical draw per row of each sample's logits.

    Args:
      keys: [B, 2] uint32, one key per sample (its rows draw from it together).
      logits: fp32 [B, Q, V]; divided by max(temperature, 1e-5), then filtered.
      top_k, top_p: static (see `filter_logits`).
    Returns:
      int32 [B, Q].
    """
    logits = logits / jnp.maximum(temperature, 1e-5)
    logits = filter_logits(logits, top_k, top_p)
    tokens = jax.vmap(lambda key, rows: jax.random.categorical(key, rows, axis=-1))(keys, logits)
    return tokens.astype(jnp.int32)
