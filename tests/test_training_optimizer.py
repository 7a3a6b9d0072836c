"""Optimizer pieces: encoder freezing, fix_initial_norms, EMA schedule, mesh shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tokenizers_jax.training import optimizer, sharding


def _optim(freeze_after, **fields):
    defaults = dict(lr=0.1, b1=0.9, b2=0.95, eps=1e-8, freeze_after=freeze_after)
    return optimizer.default_optim_config(**{**defaults, **fields})


def test_freeze_after_zeroes_masked_updates_from_step_n():
    params = {"encoder": jnp.ones(3), "decoder": jnp.ones(3)}
    mask = {"encoder": True, "decoder": False}
    tx = optimizer.make_optimizer(_optim(2), mask)
    state = tx.init(params)
    grads = {"encoder": jnp.ones(3), "decoder": jnp.ones(3)}
    for step in range(4):
        updates, state = tx.update(grads, state, params)
        frozen = step >= 2
        assert bool(jnp.all(updates["encoder"] == 0)) == frozen
        assert bool(jnp.all(updates["decoder"] != 0))


def test_freeze_restarts_adam_for_the_leaves_that_keep_training():
    """At the freeze the original rebuilds Adam: the decoder's next update is a first step."""
    params = {"encoder": jnp.ones(2), "decoder": jnp.ones(2)}
    mask = {"encoder": True, "decoder": False}
    tx = optimizer.make_optimizer(_optim(3), mask)
    state = tx.init(params)
    for scale in (5.0, -3.0, 2.0):  # history that a running Adam would remember
        _, state = tx.update({"encoder": jnp.ones(2), "decoder": jnp.full(2, scale)}, state)
    grads = {"encoder": jnp.ones(2), "decoder": jnp.array([0.5, -0.25])}
    updates, state = tx.update(grads, state)
    fresh = optax.adam(0.1, b1=0.9, b2=0.95, eps=1e-8)
    expected, _ = fresh.update(grads["decoder"], fresh.init(grads["decoder"]))
    np.testing.assert_allclose(updates["decoder"], expected, rtol=1e-6)
    np.testing.assert_allclose(updates["decoder"], [-0.1, 0.1], rtol=1e-5)  # -lr * sign(g)
    assert bool(jnp.all(updates["encoder"] == 0))
    # after the restart the state runs on (no second restart)
    grads2 = {"encoder": jnp.ones(2), "decoder": jnp.array([0.5, 0.25])}
    updates, _ = tx.update(grads2, state)
    _, fresh_state = fresh.update(grads["decoder"], fresh.init(grads["decoder"]))
    expected2, _ = fresh.update(grads2["decoder"], fresh_state)
    np.testing.assert_allclose(updates["decoder"], expected2, rtol=1e-6)


def test_freeze_requires_a_mask_and_is_off_when_negative():
    with pytest.raises(ValueError, match="nothing to freeze"):
        optimizer.make_optimizer(_optim(0), None)
    tx = optimizer.make_optimizer(_optim(-1), None)
    updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
    np.testing.assert_allclose(updates["w"], -0.1, rtol=1e-5)  # plain Adam's first step


def test_adam_matches_torch_defaults():
    """Adam(0.9, 0.95, eps 1e-8), bias-corrected, lr 1e-4: the first update is -lr*sign(g)."""
    config = _optim(-1)
    config.lr = 1e-4
    tx = optimizer.make_optimizer(config)
    grads = {"w": jnp.array([0.5, -2.0])}
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(updates["w"], [-1e-4, 1e-4], rtol=1e-5)


def test_default_optimizer_is_exactly_adam():
    """FlowMo's optimizer state keeps optax.adam's layout (checkpoints stay compatible)."""
    params = {"w": jnp.ones((2, 3))}
    ours = optimizer.make_optimizer(_optim(-1)).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(optax.adam(0.1).init(params))


def test_warmup_cosine_is_llamagen_lambda_lr():
    """AR recipe (spec 6.2): warmup over 5% from 0.005 * lr to lr, then cosine to 0.01 * lr."""
    total, warmup, lr = 1000, 50, 1e-4
    config = _optim(-1, lr=lr, schedule="warmup_cosine", warmup_steps=warmup,
                    warmup_init_lr=0.005 * lr, min_lr=0.01 * lr)
    schedule = optimizer.make_schedule(config, total)
    for t in (0, 10, 49, 50, 300, 999, 1000):
        if t < warmup:
            factor = 0.005 + (1 - 0.005) * t / warmup
        else:
            progress = (t - warmup) / (total - warmup)
            factor = 0.01 + (1 - 0.01) * 0.5 * (1 + np.cos(np.pi * progress))
        np.testing.assert_allclose(optimizer.learning_rate(schedule, t), lr * factor, rtol=1e-5)


def test_timm_cosine_measures_the_cosine_from_step_zero():
    """Tokenizer recipe (spec 5): timm CosineLRScheduler, warmup_prefix=False."""
    total, warmup, lr, low = 1000, 100, 1e-4, 1e-5
    config = _optim(-1, lr=lr, schedule="timm_cosine", warmup_steps=warmup,
                    warmup_init_lr=low, min_lr=low)
    schedule = optimizer.make_schedule(config, total)
    for t in (0, 50, 99, 100, 500, 999, 1200):
        if t < warmup:
            expected = low + t * (lr - low) / warmup
        else:
            expected = low + 0.5 * (lr - low) * (1 + np.cos(np.pi * min(t, total) / total))
        np.testing.assert_allclose(optimizer.learning_rate(schedule, t), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown optim.schedule"):
        optimizer.make_schedule(_optim(-1, schedule="step"), total)


def test_adamw_decays_matrices_only_and_clipping_bounds_the_update():
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    tx = optimizer.make_optimizer(_optim(-1, lr=0.1, weight_decay=0.05))
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.05 * 2.0, rtol=1e-6)  # torch AdamW
    np.testing.assert_array_equal(updates["bias"], 0.0)  # rank 1: no decay

    tx = optimizer.make_optimizer(_optim(-1, lr=1.0, eps=1.0, b1=0.0, b2=0.0,
                                         clip_grad_norm=1.0))
    grads = {"kernel": jnp.full((2, 2), 30.0), "bias": jnp.full((2,), 40.0)}
    norm = np.sqrt(4 * 30.0**2 + 2 * 40.0**2)
    updates, _ = tx.update(grads, tx.init(params), params)
    clipped = jax.tree.map(lambda g: g / norm, grads)
    expected = jax.tree.map(lambda g: -g / (jnp.abs(g) + 1.0), clipped)  # Adam with b = 0
    for name in params:
        np.testing.assert_allclose(updates[name], expected[name], rtol=1e-5)


def test_renormalize_keeps_reference_norms_of_masked_leaves_only():
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"a": jax.random.normal(key1, (4, 5)), "b": jax.random.normal(key2, (5,))}
    norms = optimizer.frobenius_norms(params)
    moved = jax.tree.map(lambda x: 3.0 * x + 1.0, params)
    fixed = optimizer.renormalize(moved, norms, {"a": True, "b": False})
    np.testing.assert_allclose(jnp.linalg.norm(fixed["a"]), norms["a"], rtol=1e-6)
    np.testing.assert_allclose(fixed["a"] / jnp.linalg.norm(fixed["a"]),
                               moved["a"] / jnp.linalg.norm(moved["a"]), rtol=1e-5)
    np.testing.assert_array_equal(fixed["b"], moved["b"])


def test_ema_blends_every_n_steps_with_decay_to_the_n():
    ema, decay, every = jnp.zeros(()), 0.9, 3
    for step in range(7):
        params = jnp.asarray(float(step + 1))
        new = optimizer.ema_update(ema, params, jnp.asarray(step), decay, every)
        if step % every == 0:
            expected = ema * decay**every + params * (1 - decay**every)
            np.testing.assert_allclose(new, expected, rtol=1e-6)
        else:
            assert new == ema
        ema = new


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
    assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4)
    assert sharding.mesh_shape({"data": -1, "fsdp": 1}, 8) == (8, 1)
    with pytest.raises(ValueError, match="does not fit"):
        sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="uses 4 devices but 8"):
        sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_shape({"tensor": 1}, 8)
