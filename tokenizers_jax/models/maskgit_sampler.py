"""MaskGIT's masking schedule and iterative decoding (maskgit.md sections 3-4), one program.

Decoding works on N maskable units (the sub-tokens of an image, [B, N] flattened), all masked
at the start. Step k = 0 .. T-1, with r = (k + 1) / T and M_k units still masked:

  1. logits l = f(x, y); with CFG a second pass with the null label gives l_u and
     l = l_c + s_k (l_c - l_u)  (MaskBit's form; s_k from `sampler.cfg_ramp`).
  2. l <- l / tau_s  (softmax temperature; annealed 0.5 + 0.8 (1 - r) with softmax_annealing).
  3. x^ = argmax(l + g) (categorical sampling, Gumbel-max) or argmax(l + tau_k g) ("gumbel_max",
     1d-tokenizer's choice-temperature sampling), tau_k = choice_temperature * (1 - r). Known
     units keep their token.
  4. confidence c = log softmax(l)[x^] ("log_prob") or l[x^] ("logit"), + tau_k g' ; known
     units get +inf.
  5. m = clip(floor(N gamma(r)), 1, M_k - 1), gamma from `sampler.mask_schedule`.
  6. re-mask the units with c <= sorted(c)[m - 1] ("<=") or c < sorted(c)[m] ("<").
  7. the output is x^ of the last step.

Per-step quantities that depend only on k (counts, CFG scales, temperatures) are computed on
the host in float64 (`step_schedule`) and scanned over. Every random draw of sample i at step
k comes from `fold_in(key_i, k)` (`step_draws`), so a sample does not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

MASK_SCHEDULES = ("arccos", "cosine")
CFG_RAMPS = ("power_cosine", "linear", "constant")
TOKEN_SAMPLING = ("categorical", "gumbel_max")
CONFIDENCES = ("log_prob", "logit")
CUTOFFS = ("<=", "<")

# logits_fn(tokens [B, N] int32 (mask id = masked), labels [B] int32) -> logits [B, N, K] fp32
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def mask_ratio(r, schedule: str):
    """gamma(r), the fraction of units masked at progress r in [0, 1], clipped to [1e-6, 1].

    arccos (1d-tokenizer, MaskBit): arccos(r) / (pi / 2); cosine (MaskGIT): cos(pi r / 2).
    Works on numpy (float64, the decoding counts) and jax arrays (training masks).
    """
    xp = jnp if isinstance(r, jax.Array) else np
    if schedule == "arccos":
        ratio = xp.arccos(r) / (math.pi / 2)
    elif schedule == "cosine":
        ratio = xp.cos(r * (math.pi / 2))
    else:
        raise ValueError(f"unknown mask schedule {schedule!r}; choose one of {MASK_SCHEDULES}")
    return xp.clip(ratio, 1e-6, 1.0)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """The `sampler` section (see configs/maskgit.py), validated and hashable."""

    steps: int = 64
    cfg: float = 5.7
    cfg_ramp: str = "power_cosine"
    cfg_power: float = 2.5
    choice_temperature: float = 8.5
    softmax_temperature: float = 1.0
    softmax_annealing: bool = False
    token_sampling: str = "categorical"
    confidence: str = "log_prob"
    mask_schedule: str = "arccos"
    cutoff: str = "<="

    def __post_init__(self):
        for name, choices in (("cfg_ramp", CFG_RAMPS), ("token_sampling", TOKEN_SAMPLING),
                              ("confidence", CONFIDENCES), ("mask_schedule", MASK_SCHEDULES),
                              ("cutoff", CUTOFFS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"sampler.{name}={getattr(self, name)!r}; choose one of "
                                 f"{choices}")
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.softmax_temperature <= 0:
            raise ValueError(f"sampler.softmax_temperature must be > 0, got "
                             f"{self.softmax_temperature}")

    @classmethod
    def from_config(cls, sampler: ml_collections.ConfigDict | dict, **overrides
                    ) -> "SamplerConfig":
        """From a config section, with `overrides` (e.g. cfg=3.0) on top; unknown names fail."""
        fields = {**dict(sampler), **overrides}
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown sampler field(s) {unknown}; known: {sorted(known)}")
        return cls(**fields)

    @property
    def guided(self) -> bool:
        """Whether the unconditional pass runs (cfg = 0 needs none)."""
        return self.cfg != 0


class StepSchedule(NamedTuple):
    """Host-computed per-step values, each [T]."""

    remask_count: np.ndarray  # int32 floor(N gamma(r_k)), before the clamp to [1, M_k - 1]
    guidance: np.ndarray  # float32 s_k
    choice_temperature: np.ndarray  # float32 tau_k = tau (1 - r_k)
    softmax_temperature: np.ndarray  # float32 tau_s (annealed: 0.5 + 0.8 (1 - r_k))


def guidance_scales(sampler: SamplerConfig) -> np.ndarray:
    """s_k for k = 0 .. T-1 (float64): the multiplier of (l_c - l_u) added to l_c.

    constant: g; linear: g k / T (0 at the first step); power_cosine: g (1 - cos(pi (k/T)^p)) / 2
    (MaskBit; 1d-tokenizer's power-cosine ramp is this form with g - 1 in place of g).
    """
    progress = np.arange(sampler.steps, dtype=np.float64) / sampler.steps
    if sampler.cfg_ramp == "constant":
        ramp = np.ones_like(progress)
    elif sampler.cfg_ramp == "linear":
        ramp = progress
    else:
        ramp = (1.0 - np.cos(np.pi * progress**sampler.cfg_power)) / 2.0
    return sampler.cfg * ramp


def step_schedule(sampler: SamplerConfig, num_units: int) -> StepSchedule:
    """The per-step counts, CFG scales and temperatures of T steps over `num_units` units."""
    r = np.arange(1, sampler.steps + 1, dtype=np.float64) / sampler.steps
    counts = np.floor(num_units * mask_ratio(r, sampler.mask_schedule)).astype(np.int32)
    softmax_temperature = (0.5 + 0.8 * (1.0 - r) if sampler.softmax_annealing
                           else np.full_like(r, sampler.softmax_temperature))
    return StepSchedule(counts, guidance_scales(sampler).astype(np.float32),
                        (sampler.choice_temperature * (1.0 - r)).astype(np.float32),
                        softmax_temperature.astype(np.float32))


class StepDraws(NamedTuple):
    token_gumbel: jax.Array  # [N, K] Gumbel noise of the token choice
    confidence_gumbel: jax.Array  # [N] Gumbel noise of the confidence


def step_draws(key: jax.Array, step: jax.Array | int, num_units: int,
               codebook_size: int) -> StepDraws:
    """The random draws of one sample at decoding step `step` (from fold_in(key, step))."""
    token_key, confidence_key = jax.random.split(jax.random.fold_in(key, step))
    return StepDraws(jax.random.gumbel(token_key, (num_units, codebook_size), jnp.float32),
                     jax.random.gumbel(confidence_key, (num_units,), jnp.float32))


def guided_logits(conditional: jax.Array, unconditional: jax.Array,
                  scale: jax.Array) -> jax.Array:
    """l_c + s (l_c - l_u), in fp32."""
    return conditional + scale * (conditional - unconditional)


def remask(confidence: jax.Array, count: jax.Array, cutoff: str) -> jax.Array:
    """Bool [B, N]: the units to mask again, the `count` [B] least confident by `cutoff`.

    "<=": c <= sorted(c)[count - 1] (MaskBit, 1d-tokenizer; ties may add units; count 0 masks
    none); "<": c < sorted(c)[count] (MaskGIT; ties may drop units).
    """
    ordered = jnp.sort(confidence, axis=-1)
    if cutoff == "<=":
        threshold = jnp.take_along_axis(ordered, jnp.maximum(count - 1, 0)[:, None], axis=-1)
        return (confidence <= threshold) & (count[:, None] > 0)
    threshold = jnp.take_along_axis(ordered, count[:, None], axis=-1)
    return confidence < threshold


class DecodeHistory(NamedTuple):
    predicted: jax.Array  # int32 [T, B, N] x^ of each step
    masked: jax.Array  # bool [T, B, N] the units masked after each step


def sample(logits_fn: LogitsFn, labels: jax.Array, keys: jax.Array, num_units: int,
           codebook_size: int, null_label: int, sampler: SamplerConfig,
           with_history: bool = False):
    """Iterative decoding of class-conditional samples as one `lax.scan` over the T steps.

    Args:
      logits_fn: (tokens [B', N] with mask id `codebook_size` for masked units, labels [B'])
        -> logits [B', N, codebook_size] fp32.
      labels: int32 [B] class labels.
      keys: [B, 2] one PRNG key per sample (`step_draws` derives each step's draws).
      null_label: the label of the unconditional pass.
      with_history: also return the `DecodeHistory`.
    Returns:
      int32 [B, N] tokens (and the history).
    """
    batch = labels.shape[0]
    mask_id = codebook_size
    schedule = step_schedule(sampler, num_units)
    null_labels = jnp.full_like(labels, null_label)

    def step(carry, inputs):
        tokens, masked, _ = carry
        k, count, guidance, choice_temperature, softmax_temperature = inputs
        if sampler.guided:
            both = logits_fn(jnp.concatenate([tokens, tokens]),
                             jnp.concatenate([labels, null_labels])).astype(jnp.float32)
            logits = guided_logits(both[:batch], both[batch:], guidance)
        else:
            logits = logits_fn(tokens, labels).astype(jnp.float32)
        logits = logits / softmax_temperature
        draws = jax.vmap(lambda key: step_draws(key, k, num_units, codebook_size))(keys)
        token_noise = draws.token_gumbel
        if sampler.token_sampling == "gumbel_max":
            token_noise = choice_temperature * token_noise
        predicted = jnp.argmax(logits + token_noise, axis=-1).astype(jnp.int32)
        predicted = jnp.where(masked, predicted, tokens)
        scores = jax.nn.log_softmax(logits) if sampler.confidence == "log_prob" else logits
        confidence = jnp.take_along_axis(scores, predicted[..., None], axis=-1)[..., 0]
        confidence = confidence + choice_temperature * draws.confidence_gumbel
        confidence = jnp.where(masked, confidence, jnp.inf)
        still_masked = jnp.sum(masked, axis=-1, dtype=jnp.int32)
        remask_count = jnp.clip(count, 1, still_masked - 1)
        masked = remask(confidence, remask_count, sampler.cutoff)
        tokens = jnp.where(masked, mask_id, predicted)
        return (tokens, masked, predicted), (predicted, masked) if with_history else None

    tokens = jnp.full((batch, num_units), mask_id, jnp.int32)
    masked = jnp.ones((batch, num_units), bool)
    steps = (jnp.arange(sampler.steps), *(jnp.asarray(x) for x in schedule))
    (_, _, predicted), history = jax.lax.scan(step, (tokens, masked, tokens), steps)
    if with_history:
        return predicted, DecodeHistory(*history)
    return predicted
