"""Rectified flow (t = 1 is noise): training time schedules, sampler schedules, the compiled
Euler ODE sampler with a CFG interval, and FlowMo's random-step post-training integrator.

Convention: x_t = (1 - t) * x + t * eps, velocity v = eps - x, and an Euler step from t_i to
t_{i+1} < t_i is z <- z - (t_i - t_{i+1}) * v(z, t_i).
"""

from __future__ import annotations

import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# velocity_fn(z [B, H, W, C], t [B], code [B, L, C']) -> v [B, H, W, C]
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

TRAIN_TIME_SCHEDULES = ("lognormal", "fat_lognormal", "uniform")


def sample_train_times(key: jax.Array, batch_size: int, schedule: str) -> jax.Array:
    """Training times t [B] in (0, 1) (spec 5).

    lognormal: sigmoid(N(0, 1)). fat_lognormal: lognormal, but each sample is replaced by an
    independent U(0, 1) with probability 0.1. uniform: U(0, 1).
    """
    k_normal, k_coin, k_uniform = jax.random.split(key, 3)
    uniform = jax.random.uniform(k_uniform, (batch_size,))
    if schedule == "uniform":
        return uniform
    lognormal = jax.nn.sigmoid(jax.random.normal(k_normal, (batch_size,)))
    if schedule == "lognormal":
        return lognormal
    if schedule == "fat_lognormal":
        keep = jax.random.uniform(k_coin, (batch_size,)) <= 0.9
        return jnp.where(keep, lognormal, uniform)
    raise ValueError(f"unknown time schedule {schedule!r}; choose one of {TRAIN_TIME_SCHEDULES}")


def sampler_times(steps: int, schedule: str) -> np.ndarray:
    """The sampler's times [steps + 1], from 1 down to 0 (host-side, float64).

    `linear`: t_i = 1 - i / steps. `pow_p` (e.g. `pow_0.25`): t_i = ((steps - i) / steps)^(1/p).
    """
    if steps < 1:
        raise ValueError(f"the sampler needs at least one step, got steps={steps}")
    fraction = (steps - np.arange(steps + 1, dtype=np.float64)) / steps
    if schedule == "linear":
        return fraction
    if schedule.startswith("pow_"):
        try:
            p = float(schedule[len("pow_") :])
        except ValueError:
            p = 0.0
        if p > 0:
            return fraction ** (1.0 / p)
    raise ValueError(f"unknown sampler schedule {schedule!r}; use 'linear' or 'pow_<p>' (p > 0)")


def sigma_to_time(sigma: float) -> float:
    """EDM sigma -> flow time: t = sigma / (1 + sigma)."""
    return sigma / (1.0 + sigma)


def guided_steps(times: np.ndarray, cfg: float, cfg_interval_sigma) -> np.ndarray:
    """bool [steps]: which Euler steps apply classifier-free guidance.

    Guidance applies at step i when cfg != 1 and t_i lies in the interval (given in EDM sigma,
    inclusive at both ends). `cfg_interval_sigma=None` guides every step.
    """
    start_times = np.asarray(times[:-1])
    if cfg == 1.0:
        return np.zeros(len(start_times), bool)
    if cfg_interval_sigma is None:
        return np.ones(len(start_times), bool)
    low, high = (sigma_to_time(float(s)) for s in cfg_interval_sigma)
    return (start_times >= low) & (start_times <= high)


def decoder_evaluations(guided: np.ndarray) -> int:
    """Decoder evaluations (per image) of a sampler run: 2 per guided step, 1 otherwise."""
    return int(len(guided) + np.sum(guided))


def euler_sample(
    velocity_fn: VelocityFn,
    noise: jax.Array,
    code: jax.Array,
    null_code: jax.Array,
    times: np.ndarray,
    guided: np.ndarray,
    cfg: float,
) -> jax.Array:
    """Integrates the ODE from t = 1 (noise) to t = 0 with Euler steps.

    Consecutive steps with the same guidance setting form one `lax.scan`; unguided segments
    evaluate the conditional branch only, guided ones evaluate [code; null_code] in one batch
    and combine v = v_null + cfg * (v_code - v_null). The whole integration traces to a few
    scans inside one program.

    Args:
      noise: [B, H, W, C] the starting point z_1 (fp32).
      code / null_code: [B, L, C'] conditioning and its null version.
      times: [steps + 1] host array from `sampler_times`.
      guided: [steps] host bool array from `guided_steps`.
    Returns:
      z_0: [B, H, W, C] fp32 (not clipped).
    """
    times = np.asarray(times, np.float64)
    guided = np.asarray(guided, bool)
    batch = noise.shape[0]
    both_codes = jnp.concatenate([code, null_code], axis=0)

    def step(z, t, dt, with_guidance):
        t_batch = jnp.full((batch,), t, jnp.float32)
        if with_guidance:
            v = velocity_fn(
                jnp.concatenate([z, z]), jnp.concatenate([t_batch, t_batch]), both_codes
            ).astype(jnp.float32)
            v_code, v_null = v[:batch], v[batch:]
            v = v_null + cfg * (v_code - v_null)
        else:
            v = velocity_fn(z, t_batch, code).astype(jnp.float32)
        return z - dt * v

    z = noise.astype(jnp.float32)
    index = 0
    for with_guidance, group in itertools.groupby(guided.tolist()):
        length = len(list(group))
        segment = slice(index, index + length)
        t_start = jnp.asarray(times[segment], jnp.float32)
        dt = jnp.asarray(times[segment] - times[index + 1 : index + length + 1], jnp.float32)

        def body(z, xs, with_guidance=with_guidance):
            return step(z, xs[0], xs[1], with_guidance), None

        z, _ = jax.lax.scan(body, z, (t_start, dt))
        index += length
    return z


def random_step_times(uniforms: jax.Array) -> jax.Array:
    """Per-sample times for the post-training integrator (spec 6).

    Args:
      uniforms: [B, k + 1] draws from U(0, 1); the first column is discarded.
    Returns:
      [B, k + 1] times from 1 down to 0 with steps proportional to uniforms[:, 1:].
    """
    cumulative = jnp.cumsum(uniforms.astype(jnp.float32), axis=1)
    cumulative = cumulative - cumulative[:, :1]
    return jnp.flip(cumulative / cumulative[:, -1:], axis=1)


def integrate_random_steps(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    noise: jax.Array,
    times: jax.Array,
) -> jax.Array:
    """Euler integration with per-sample times, differentiable through every step.

    Each step is rematerialised (`jax.checkpoint`), so memory stays at one step's activations
    plus the k carried states.

    Args:
      velocity_fn: (z [B, H, W, C], t [B]) -> v.
      noise: [B, H, W, C] z_1.
      times: [B, k + 1] from `random_step_times`.
    Returns:
      z_0 [B, H, W, C] fp32.
    """

    @jax.checkpoint
    def body(z, ts):
        t, t_next = ts
        dt = (t - t_next)[:, None, None, None]
        return z - dt * velocity_fn(z, t).astype(jnp.float32), None

    times = times.astype(jnp.float32)
    z, _ = jax.lax.scan(body, noise.astype(jnp.float32), (times[:, :-1].T, times[:, 1:].T))
    return z
