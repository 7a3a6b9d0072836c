"""The GAN losses of DetailFlow's tokenizer training (spec 5), as pure fp32 functions.

Generator side:   w_d(step) * hinge_G(D(DiffAug(x_hat))),  w_d = 0.2 once step >= disc_start.
Discriminator:    w_d(step) * (hinge_D(r, f) + 0.001 * LeCam(r, f))
                  + 4.0 * CR * [step >= disc_start]   (CR is not scaled by w_d)
with r = D(DiffAug(x)), f = D(DiffAug(sg x_hat)) and CR the MSE between [r; f] and the logits
of the strongly augmented inputs. The LeCam EMAs (decay 0.999, from 0) are updated on every
discriminator loss, before and after disc_start, and the regulariser uses the updated EMAs,
as the original does (its EMA takes the batch-mean logits as constants). `step` is the
original's global step (the caller passes it; it may be traced).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

DISC_WEIGHT = 0.2
LECAM_WEIGHT = 0.001
LECAM_DECAY = 0.999
CR_WEIGHT = 4.0


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """0.5 * (mean relu(1 - r) + mean relu(1 + f)). Logits of any shape -> scalar."""
    return 0.5 * (jnp.mean(jax.nn.relu(1 - _f32(real_logits)))
                  + jnp.mean(jax.nn.relu(1 + _f32(fake_logits))))


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    """-mean(f)."""
    return -jnp.mean(_f32(fake_logits))


def adversarial_weight(step: jax.Array | int, disc_start: int,
                       weight: float = DISC_WEIGHT) -> jax.Array:
    """w_d: `weight` from `disc_start` on, else 0 (the original's `adopt_weight`)."""
    return jnp.where(jnp.asarray(step) >= disc_start, weight, 0.0).astype(jnp.float32)


def generator_adversarial_loss(fake_logits: jax.Array, step: jax.Array | int, disc_start: int,
                               weight: float = DISC_WEIGHT) -> jax.Array:
    """The generator's weighted adversarial term w_d(step) * hinge_G (adaptive weight off)."""
    return adversarial_weight(step, disc_start, weight) * hinge_g_loss(fake_logits)


class LeCamState(NamedTuple):
    """EMAs of the mean real and mean fake logits (fp32 scalars)."""

    real_ema: jax.Array
    fake_ema: jax.Array


def lecam_init() -> LeCamState:
    return LeCamState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def lecam_update(state: LeCamState, real_logits: jax.Array, fake_logits: jax.Array,
                 decay: float = LECAM_DECAY) -> LeCamState:
    """ema <- decay * ema + (1 - decay) * mean(logits), without gradients."""
    mean = lambda x: jax.lax.stop_gradient(jnp.mean(_f32(x)))
    return LeCamState(decay * state.real_ema + (1 - decay) * mean(real_logits),
                      decay * state.fake_ema + (1 - decay) * mean(fake_logits))


def lecam_regularizer(real_logits: jax.Array, fake_logits: jax.Array,
                      state: LeCamState) -> jax.Array:
    """mean(relu(r - ema_fake)^2) + mean(relu(ema_real - f)^2)."""
    return (jnp.mean(jnp.square(jax.nn.relu(_f32(real_logits) - state.fake_ema)))
            + jnp.mean(jnp.square(jax.nn.relu(state.real_ema - _f32(fake_logits)))))


def consistency_loss(real_logits: jax.Array, fake_logits: jax.Array,
                     real_strong_logits: jax.Array, fake_strong_logits: jax.Array) -> jax.Array:
    """CR = MSE([r; f], [r_strong; f_strong]), gradients through both sides."""
    normal = jnp.concatenate([_f32(real_logits), _f32(fake_logits)], axis=0)
    strong = jnp.concatenate([_f32(real_strong_logits), _f32(fake_strong_logits)], axis=0)
    return jnp.mean(jnp.square(normal - strong))


class DiscriminatorLoss(NamedTuple):
    """The discriminator loss, its terms (for logging) and the updated LeCam state."""

    loss: jax.Array
    hinge: jax.Array
    lecam: jax.Array
    consistency: jax.Array
    lecam_state: LeCamState


def discriminator_loss(
    real_logits: jax.Array,
    fake_logits: jax.Array,
    real_strong_logits: jax.Array,
    fake_strong_logits: jax.Array,
    lecam_state: LeCamState,
    step: jax.Array | int,
    disc_start: int,
    disc_weight: float = DISC_WEIGHT,
    lecam_weight: float = LECAM_WEIGHT,
    cr_weight: float = CR_WEIGHT,
    lecam_decay: float = LECAM_DECAY,
) -> DiscriminatorLoss:
    """w_d * (hinge_D + lecam_weight * LeCam) + cr_weight * CR * [step >= disc_start].

    Args:
      real_logits, fake_logits: D(DiffAug(x)), D(DiffAug(sg x_hat)), e.g. [B, 980].
      real_strong_logits, fake_strong_logits: the same under the strong DiffAugment.
      lecam_state: the EMAs before this step; they are updated first, on every step.
      step: the global step (may be traced); disc_start: the first step of the GAN.
    """
    new_state = lecam_update(lecam_state, real_logits, fake_logits, lecam_decay)
    lecam = lecam_regularizer(real_logits, fake_logits, new_state)
    hinge = hinge_d_loss(real_logits, fake_logits)
    consistency = consistency_loss(real_logits, fake_logits, real_strong_logits,
                                   fake_strong_logits)
    cr_on = (jnp.asarray(step) >= disc_start).astype(jnp.float32)
    loss = (adversarial_weight(step, disc_start, disc_weight) * (hinge + lecam_weight * lecam)
            + cr_weight * cr_on * consistency)
    return DiscriminatorLoss(loss, hinge, lecam, consistency, new_state)
