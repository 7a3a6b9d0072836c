"""The GAN losses against direct numpy re-statements of spec 5's formulas on random logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers_jax import gan_losses as gl

relu = lambda x: np.maximum(x, 0.0)


def logits(seed, shape=(3, 980)):
    return np.random.default_rng(seed).normal(scale=1.5, size=shape).astype(np.float32)


def test_hinge_losses():
    r, f = logits(0), logits(1)
    expected = 0.5 * (relu(1 - r).mean(dtype=np.float64) + relu(1 + f).mean(dtype=np.float64))
    np.testing.assert_allclose(float(gl.hinge_d_loss(r, f)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(gl.hinge_g_loss(f)), -f.mean(dtype=np.float64), atol=1e-6)
    assert gl.hinge_d_loss(r.astype(jnp.bfloat16), f).dtype == jnp.float32


def test_adversarial_weight_switches_on_at_disc_start():
    f = logits(2)
    for step, weight in [(0, 0.0), (39_999, 0.0), (40_000, 0.2), (1_000_000, 0.2)]:
        np.testing.assert_allclose(float(gl.generator_adversarial_loss(f, step, 40_000)),
                                   weight * -f.mean(dtype=np.float64), atol=1e-6)
    traced = jax.jit(lambda s: gl.adversarial_weight(s, 5))(jnp.arange(8))
    np.testing.assert_array_equal(np.asarray(traced), np.float32([0] * 5 + [0.2] * 3))


def test_lecam_emas_and_regulariser_over_steps():
    """EMA from 0 with decay 0.999, updated every call, the regulariser on the updated EMAs."""
    state = gl.lecam_init()
    ema_r = ema_f = 0.0
    update = jax.jit(gl.discriminator_loss, static_argnames="disc_start")
    for step in range(4):
        r, f, rs, fs = (logits(10 * step + i) for i in range(4))
        ema_r = 0.999 * ema_r + 0.001 * r.mean(dtype=np.float64)
        ema_f = 0.999 * ema_f + 0.001 * f.mean(dtype=np.float64)
        expected_lecam = (relu(r - ema_f) ** 2).mean() + (relu(ema_r - f) ** 2).mean()
        out = update(r, f, rs, fs, state, step, disc_start=100)  # before disc_start
        state = out.lecam_state
        np.testing.assert_allclose([float(state.real_ema), float(state.fake_ema)],
                                   [ema_r, ema_f], rtol=1e-5)
        np.testing.assert_allclose(float(out.lecam), expected_lecam, rtol=1e-5)
        assert float(out.loss) == 0.0  # w_d = 0 and CR off before disc_start
    assert abs(ema_r) > 1e-5  # the EMAs moved


@pytest.mark.parametrize("step", [99, 100])
def test_discriminator_loss_composition(step):
    r, f, rs, fs = (logits(20 + i) for i in range(4))
    state = gl.LeCamState(jnp.float32(0.3), jnp.float32(-0.2))
    out = gl.discriminator_loss(r, f, rs, fs, state, step, disc_start=100)
    ema_r, ema_f = 0.999 * 0.3 + 0.001 * r.mean(), 0.999 * -0.2 + 0.001 * f.mean()
    hinge = 0.5 * (relu(1 - r).mean() + relu(1 + f).mean())
    lecam = (relu(r - ema_f) ** 2).mean() + (relu(ema_r - f) ** 2).mean()
    cr = ((np.concatenate([r, f]) - np.concatenate([rs, fs])) ** 2).mean()
    on = step >= 100
    expected = 0.2 * on * (hinge + 0.001 * lecam) + 4.0 * cr * on  # CR not scaled by w_d
    np.testing.assert_allclose(float(out.loss), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([float(out.hinge), float(out.lecam), float(out.consistency)],
                               [hinge, lecam, cr], rtol=1e-5)


def test_gradients_flow_through_both_consistency_branches_but_not_the_emas():
    r, f, rs, fs = (jnp.asarray(logits(30 + i, (2, 5))) for i in range(4))
    state = gl.lecam_init()
    grads = jax.grad(lambda *xs: gl.discriminator_loss(*xs, state, 10, 0).loss,
                     argnums=(0, 1, 2, 3))(r, f, rs, fs)
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in grads)
    np.testing.assert_allclose(np.asarray(grads[2]), -8.0 * (r - rs) / (2 * r.size), rtol=1e-5)
    # The EMA update carries no gradient: only the regulariser's explicit terms do.
    ema_grad = jax.grad(lambda x: gl.lecam_update(state, x, f).real_ema)(r)
    assert not np.asarray(ema_grad).any()
