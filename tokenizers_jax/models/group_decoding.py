"""Parallel group decoding for the DetailFlow GPT (spec 6.3): a cached sampler compiled as one
program, and the original's full-recompute loop as the reference path.

Forward pass s draws (N tokens, groups of g, the first c token by token):
  s = 0 .. c-1          token s, from the logit at position s (pass 0 sees [cls] alone);
  s = c .. c+G-c/g-1    group k = s - c + c/g: tokens gk .. gk+g-1, each drawn independently
                        from its own logit at positions gk .. gk+g-1,
so 23 passes for N = 128 (c = g = 8). Each pass runs on the CFG batch (a conditional and a
null-class row per sample), guides u + s (c - u) (s decreasing per group with gradual_cfg:
s (G - k + 1) / (G + 1)), then draws with temperature, top-k and top-p (`sampling.draw`).

Random draws: sample b's pass s draws from fold_in(keys[b], s), in both samplers, so they
return the same tokens given the same keys, whatever the batch.

`sample_cached`: `GPT.decode_step` with a preallocated KV cache of all N positions, inside
two `lax.fori_loop`s (c one-query passes, then one g-query pass per group): each position is
computed once. `FullRecomputeSampler`: a Python loop that re-runs the whole prefix every pass
(`GPT.__call__`, one compiled forward per prefix length), as the original does.

The CFG batch pairs rows (sample b conditional at 2b, null at 2b + 1), so a batch split over
devices keeps each sample's pair on one device; the original concatenates [cond ; null],
which gives the same numbers (rows are independent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from tokenizers_jax import sampling
from tokenizers_jax.models.group_layout import decoding_passes, sequence_length

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers_jax.models.gpt import GPT


class SamplerSettings(NamedTuple):
    """cfg >= 1 (1: no guidance), temperature >= 0, top_k (0: off), top_p in (0, 1] (1: off),
    gradual_cfg (a scale decreasing over the groups)."""

    cfg: float
    temperature: float
    top_k: int
    top_p: float
    gradual_cfg: bool

    @classmethod
    def from_config(cls, sampler: ml_collections.ConfigDict, vocab_size: int,
                    **overrides) -> "SamplerSettings":
        """The config's `sampler` section with `overrides`, validated."""
        unknown = sorted(set(overrides) - set(cls._fields))
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}; the settings are "
                             f"{list(cls._fields)}")
        values = {name: overrides.get(name, sampler[name]) for name in cls._fields}
        settings = cls(cfg=float(values["cfg"]), temperature=float(values["temperature"]),
                       top_k=int(values["top_k"]), top_p=float(values["top_p"]),
                       gradual_cfg=bool(values["gradual_cfg"]))
        problems = []
        if not settings.cfg >= 1.0:
            problems.append(f"cfg={settings.cfg} (must be >= 1; 1 turns guidance off)")
        if not settings.temperature >= 0.0:
            problems.append(f"temperature={settings.temperature} (must be >= 0)")
        if not 0 <= settings.top_k <= vocab_size:
            problems.append(f"top_k={settings.top_k} (must be in [0, {vocab_size}]; 0 = off)")
        if not 0.0 < settings.top_p <= 1.0:
            problems.append(f"top_p={settings.top_p} (must be in (0, 1]; 1 = off)")
        if problems:
            raise ValueError("bad sampling settings: " + "; ".join(problems))
        return settings


def guidance_scale(cfg: jax.Array | float, first_token: jax.Array | int, gradual_cfg: bool,
                   num_tokens: int, group_size: int, causal_num: int) -> jax.Array:
    """The CFG scale of the pass drawing from `first_token`: cfg, or with gradual_cfg, for
    group k >= c/g, cfg (G - k + 1) / (G + 1) (spec 6.3; the first c tokens keep cfg)."""
    if not gradual_cfg:
        return jnp.asarray(cfg, jnp.float32)
    groups = num_tokens // group_size
    k = jnp.asarray(first_token) // group_size
    decreasing = cfg * (groups - k + 1) / (groups + 1)
    return jnp.where(jnp.asarray(first_token) < causal_num, cfg, decreasing).astype(jnp.float32)


def cfg_labels(labels: jax.Array, null_class: int) -> jax.Array:
    """[B] labels -> [2B] labels of the paired CFG batch (label, null, label, null, ...); its
    tokens are each sample's row twice (`jnp.repeat(tokens, 2, axis=0)`)."""
    return jnp.stack([labels, jnp.full_like(labels, null_class)], axis=1).reshape(-1)


def draw_pass(logits: jax.Array, keys: jax.Array, pass_index: jax.Array | int,
              scale: jax.Array, temperature: jax.Array | float, top_k: int, top_p: float
              ) -> tuple[jax.Array, jax.Array]:
    """Guides the paired logits [2B, Q, V] and draws [B, Q] tokens with the keys of pass
    `pass_index`. Returns (int32 tokens [B, Q], fp32 guided logits [B, Q, V])."""
    guided = sampling.guide(logits[0::2], logits[1::2], scale)
    pass_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, jnp.asarray(pass_index, jnp.uint32))
    return sampling.draw(pass_keys, guided, temperature, top_k, top_p), guided


def sample_cached(model: "GPT", params: Any, labels: jax.Array, keys: jax.Array,
                  cfg: jax.Array | float, temperature: jax.Array | float, top_k: int = 0,
                  top_p: float = 1.0, gradual_cfg: bool = False, return_logits: bool = False
                  ) -> tuple[jax.Array, jax.Array | None]:
    """Parallel group decoding with a KV cache: c one-query passes, then a g-query pass per
    group, in two `lax.fori_loop`s (jit it; top_k, top_p, gradual_cfg and return_logits are
    static).

    Args:
      model: the `GPT` module; params: its params.
      labels: int [B] class labels; keys: uint32 [B, 2], one per sample.
      cfg, temperature: scalars (may be traced).
      return_logits: also return the guided logits each token was drawn from.
    Returns:
      (int32 tokens [B, N], fp32 guided logits [B, N, V] or None).
    """
    n, g, c = model.num_tokens, model.group_size, model.causal_num
    batch = labels.shape[0]
    pair_labels = cfg_labels(labels, model.num_classes)
    tokens = jnp.zeros((batch, n), jnp.int32)
    logits_out = jnp.zeros((batch, n, model.vocab_size), jnp.float32) if return_logits else None

    def one_pass(pass_index, first, count, carry):
        tokens, caches, logits_out = carry
        logits, caches = model.apply({"params": params}, pair_labels, jnp.repeat(tokens, 2, 0),
                                     first, count, caches, method=model.decode_step)
        scale = guidance_scale(cfg, first, gradual_cfg, n, g, c)
        drawn, guided = draw_pass(logits, keys, pass_index, scale, temperature, top_k, top_p)
        tokens = jax.lax.dynamic_update_slice(tokens, drawn, (0, first))
        if return_logits:
            logits_out = jax.lax.dynamic_update_slice(logits_out, guided, (0, first, 0))
        return tokens, caches, logits_out

    carry = (tokens, model.init_cache(2 * batch), logits_out)
    carry = jax.lax.fori_loop(0, c, lambda j, carry: one_pass(j, j, 1, carry), carry)
    carry = jax.lax.fori_loop(
        c // g, n // g, lambda k, carry: one_pass(c + k - c // g, g * k, g, carry), carry)
    return carry[0], carry[2]


class FullRecomputeSampler:
    """The reference path: the original's `generate_group_par` loop, re-running the whole
    prefix with `GPT.__call__` on every pass (one compiled forward per prefix length).

      sampler = FullRecomputeSampler(model)
      tokens, logits = sampler(params, labels, keys, cfg, temperature)
    """

    def __init__(self, model: "GPT"):
        self.model = model
        self._forward = jax.jit(self._last_logits, static_argnums=3)
        self._draw = jax.jit(draw_pass, static_argnums=(5, 6))

    def _last_logits(self, params, pair_labels, pair_tokens, count):
        return self.model.apply({"params": params}, pair_labels, pair_tokens)[:, -count:]

    def passes(self) -> list[tuple[int, int]]:
        return decoding_passes(self.model.num_tokens, self.model.group_size,
                               self.model.causal_num)

    def __call__(self, params: Any, labels: jax.Array, keys: jax.Array,
                 cfg: float, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 gradual_cfg: bool = False, return_logits: bool = False
                 ) -> tuple[jax.Array, jax.Array | None]:
        """Same arguments and results as `sample_cached`."""
        m = self.model
        tokens = jnp.zeros((labels.shape[0], m.num_tokens), jnp.int32)
        pair_labels = cfg_labels(labels, m.num_classes)
        logits_out = []
        for pass_index, (first, count) in enumerate(self.passes()):
            logits = self._forward(params, pair_labels, jnp.repeat(tokens[:, :first], 2, 0),
                                   count)
            scale = guidance_scale(cfg, first, gradual_cfg, m.num_tokens, m.group_size,
                                   m.causal_num)
            drawn, guided = self._draw(logits, keys, pass_index, scale, temperature, top_k, top_p)
            tokens = tokens.at[:, first:first + count].set(drawn)
            logits_out.append(guided)
        return tokens, (jnp.concatenate(logits_out, axis=1) if return_logits else None)

    def query_rows(self) -> int:
        """Sequence positions computed per sample and CFG branch over all passes."""
        m = self.model
        return sum(sequence_length(first, m.group_size, m.causal_num)
                   for first, _ in self.passes())
