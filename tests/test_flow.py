"""Rectified-flow schedules, the compiled CFG sampler and the post-training integrator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from tokenizers_jax import flow


def test_pow_quarter_times_match_the_spec():
    times = flow.sampler_times(25, "pow_0.25")
    assert times.shape == (26,)
    np.testing.assert_allclose(
        times[:11], [1, .8493, .7164, .5997, .4979, .4096, .3336, .2687, .2138, .1678, .1296],
        atol=5e-5)
    np.testing.assert_allclose(times[24], 2.56e-6, rtol=1e-6)
    assert times[25] == 0.0
    np.testing.assert_allclose(flow.sampler_times(4, "linear"), [1, .75, .5, .25, 0])
    for bad in ("pow_x", "pow_0", "cosine"):
        with pytest.raises(ValueError, match="schedule"):
            flow.sampler_times(4, bad)


def test_cfg_interval_converts_edm_sigma_and_selects_steps_4_to_9():
    assert abs(flow.sigma_to_time(0.17) - 0.14530) < 1e-5
    assert abs(flow.sigma_to_time(1.02) - 0.50495) < 1e-5
    guided = flow.guided_steps(flow.sampler_times(25, "pow_0.25"), 1.5, (0.17, 1.02))
    assert list(np.flatnonzero(guided)) == [4, 5, 6, 7, 8, 9]
    assert flow.decoder_evaluations(guided) == 31
    assert not flow.guided_steps(flow.sampler_times(25, "pow_0.25"), 1.0, (0.17, 1.02)).any()


def test_default_sampler_runs_31_decoder_evaluations():
    """Counts the decoder's executed batch rows at run time inside the compiled program."""
    rows = []

    def velocity_fn(z, t, code):
        jax.debug.callback(lambda n: rows.append(int(n)), z.shape[0])
        return z * 0.1 + code.mean() * t[:, None, None, None]

    times = flow.sampler_times(25, "pow_0.25")
    guided = flow.guided_steps(times, 1.5, (0.17, 1.02))
    noise = jnp.ones((2, 4, 4, 3))
    code = jnp.ones((2, 3, 5))
    run = jax.jit(lambda n, c: flow.euler_sample(velocity_fn, n, c, jnp.zeros_like(c), times,
                                                 guided, 1.5))
    jax.block_until_ready(run(noise, code))
    jax.effects_barrier()
    assert len(rows) == 25  # one decoder call per step
    assert sum(rows) == 31 * 2  # rows per image: 31 evaluations


def test_euler_sampler_integrates_and_applies_guidance():
    # v(z, t, c) = c: z_0 = z_1 - sum(dt) * v = noise - v; guided v = v_null + s (v_c - v_null).
    times = flow.sampler_times(5, "linear")
    noise = jnp.full((1, 2, 2, 1), 3.0)
    code = jnp.full((1, 1, 1), 1.0)
    null = jnp.full((1, 1, 1), 0.5)
    velocity_fn = lambda z, t, c: jnp.broadcast_to(c[:, :1, :1, None], z.shape)
    unguided = flow.euler_sample(velocity_fn, noise, code, null, times, np.zeros(5, bool), 2.0)
    np.testing.assert_allclose(unguided, 2.0, rtol=1e-6)
    guided = np.array([False, True, True, False, False])
    out = flow.euler_sample(velocity_fn, noise, code, null, times, guided, 2.0)
    # guided steps (dt 0.2 each) use v = 0.5 + 2 * 0.5 = 1.5
    np.testing.assert_allclose(out, 3.0 - 0.6 * 1.0 - 0.4 * 1.5, rtol=1e-6)


@pytest.mark.parametrize("schedule", flow.TRAIN_TIME_SCHEDULES)
def test_train_time_schedules(schedule):
    t = np.asarray(flow.sample_train_times(jax.random.key(0), 20000, schedule))
    assert t.shape == (20000,) and (t > 0).all() and (t < 1).all()
    tail = np.mean(t < 0.05)
    lognormal_tail = scipy.stats.norm.cdf(np.log(0.05 / 0.95))  # P(sigmoid(z) < 0.05)
    expected_tail = {"uniform": 0.05, "lognormal": lognormal_tail,
                     "fat_lognormal": 0.9 * lognormal_tail + 0.1 * 0.05}[schedule]
    assert abs(tail - expected_tail) < 4 * np.sqrt(expected_tail / len(t))
    middle = np.mean((t > 0.4) & (t < 0.6))
    expected_middle = 0.2 if schedule == "uniform" else (
        scipy.stats.norm.cdf(np.log(1.5)) - scipy.stats.norm.cdf(np.log(1 / 1.5)))
    if schedule == "fat_lognormal":
        expected_middle = 0.9 * expected_middle + 0.1 * 0.2
    assert abs(middle - expected_middle) < 0.015
    with pytest.raises(ValueError, match="unknown time schedule"):
        flow.sample_train_times(jax.random.key(0), 2, "exponential")


def test_random_step_times_are_normalised_cumulative_uniforms():
    u = jnp.array([[0.9, 0.1, 0.3, 0.6]])
    times = np.asarray(flow.random_step_times(u))
    # cumsum [.9, 1, 1.3, 1.9] - .9 = [0, .1, .4, 1], flipped: steps .6, .3, .1 (u3, u2, u1)
    np.testing.assert_allclose(times, [[1.0, 0.4, 0.1, 0.0]], atol=1e-6)
    random_times = np.asarray(flow.random_step_times(jax.random.uniform(jax.random.key(0),
                                                                        (5, 9))))
    np.testing.assert_allclose(random_times[:, 0], 1.0, atol=1e-6)
    assert (random_times[:, -1] == 0).all()
    assert (np.diff(random_times, axis=1) <= 0).all()


def test_integrator_gradients_flow_through_every_step_and_are_rematerialised():
    times = flow.random_step_times(jax.random.uniform(jax.random.key(1), (2, 9)))
    noise = jax.random.normal(jax.random.key(2), (2, 3, 3, 1))

    def loss(weight):
        velocity_fn = lambda z, t: jnp.tanh(weight * z) + t[:, None, None, None]
        return jnp.sum(flow.integrate_random_steps(velocity_fn, noise, times) ** 2)

    grad = jax.grad(loss)(0.7)
    eps = 1e-3
    numeric = (loss(0.7 + eps) - loss(0.7 - eps)) / (2 * eps)
    assert abs(float(grad)) > 1e-3
    np.testing.assert_allclose(grad, numeric, rtol=1e-2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(0.7))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
