"""The loop with several trained networks: objectives in sequence, partner optimizers,
non-trained variables, host draws with static variants, exact resume, checkpoint layout."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tokenizers_jax import tasks
from tokenizers_jax.training import checkpoint, loop, optimizer
from training_toy import ToyGanTask, toy_config, toy_gan_config


def _batch():
    return {"image": np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), np.uint8)}


def _expected_step(config, params, critic_w, batch, draws, static):
    """A direct re-statement of one update: per micro-batch, the generator loss against the
    current critic, then the critic's hinge loss on the same stopped reconstructions; the
    critic-score EMA threads through the micro-batches in order; then one update each."""
    accum = config.train.grad_accum_steps
    images = batch["image"]
    sign = 1.0 if static else -1.0
    critic = lambda w, z: z.reshape(z.shape[0], -1) @ w + sign * draws["shift"]

    def reconstruct(p, micro):
        x = micro.reshape(micro.shape[0], -1).astype(jnp.float32) / 127.5 - 1.0
        block = p["decoder"]["double_blocks_0"]
        return x, jnp.tanh(x @ p["encoder"]["kernel"]) @ block["kernel"] + block["bias"]

    def generator_loss(p, micro):
        x, y = reconstruct(p, micro)
        return jnp.mean(jnp.square(y - x)) - 0.1 * jnp.mean(critic(critic_w, y))

    def critic_loss(w, x, y):
        return 0.5 * (jnp.mean(jax.nn.relu(1 - critic(w, x))) +
                      jnp.mean(jax.nn.relu(1 + critic(w, y))))

    model_grads = jax.tree.map(jnp.zeros_like, params)
    critic_grads = jnp.zeros_like(critic_w)
    ema = 0.0
    for i in range(accum):
        micro = images[i::accum]
        model_grads = jax.tree.map(lambda a, g: a + g / accum, model_grads,
                                   jax.grad(generator_loss)(params, micro))
        x, y = reconstruct(params, micro)
        critic_grads = critic_grads + jax.grad(critic_loss)(critic_w, x, y) / accum
        ema = 0.9 * ema + 0.1 * jnp.mean(critic(critic_w, x))
    model_tx = optimizer.make_optimizer(config.optim)
    updates, _ = model_tx.update(model_grads, model_tx.init(params), params)
    critic_tx = optimizer.make_optimizer(config.critic_optim)
    critic_updates, _ = critic_tx.update(critic_grads, critic_tx.init(critic_w), critic_w)
    new_params = optax.apply_updates(params, updates)
    # The toy task keeps decoder/double_blocks_0/kernel at its initial norm (fix_initial_norms).
    new_params = optimizer.renormalize(new_params, optimizer.frobenius_norms(params),
                                       ToyGanTask(config).fixed_norm_mask(params))
    return new_params, optax.apply_updates(critic_w, critic_updates), ema


def test_one_step_trains_both_networks_from_the_same_state():
    config = toy_gan_config(grad_accum_steps=2)
    config.optim.eps = 1.0  # Adam's first step ~ lr * grad, not lr * sign(grad): compares grads
    fresh = loop.fresh_step(config, _batch())
    params = jax.device_get(fresh.state.params)
    critic_w = jax.device_get(fresh.state.partner_params)["critic"]["w"]
    static, draws = ToyGanTask(config).host_draws(0)
    state, metrics = fresh.step(fresh.state, fresh.constants, fresh.batch)

    expected_params, expected_w, expected_ema = _expected_step(config, params, critic_w, _batch(),
                                                               draws, static)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.partner_params["critic"]["w"], expected_w, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(state.variables["ema_real"], expected_ema, rtol=1e-5)
    assert {"loss", "critic_loss", "mse", "adversarial", "grad_norm",
            "critic_grad_norm"} <= set(metrics)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row for row in map(json.loads, f) if "train/loss" in row}


def test_resume_restores_partners_variables_and_both_step_variants(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    summary = loop.train_and_evaluate(toy_gan_config(num_steps=6), straight)
    assert summary["stopped"] == "done"
    loop.train_and_evaluate(toy_gan_config(num_steps=3), resumed)
    loop.train_and_evaluate(toy_gan_config(num_steps=6), resumed)
    expected, actual = _rows(straight), _rows(resumed)
    for step in (4, 5, 6):
        for name in ("train/loss", "train/critic_loss", "train/ema_real",
                     "train/critic_grad_norm"):
            assert actual[step][name] == expected[step][name], (step, name)
    assert "train/learning_rate_critic" in actual[6]

    def final_state(workdir):
        run = loop.setup(toy_gan_config(num_steps=6))
        checkpointer = checkpoint.Checkpointer(workdir, toy_gan_config().checkpoint)
        from tokenizers_jax import data

        iterator = data.make_train_iterator(run.task.config.data, global_batch_size=8)
        try:
            return checkpointer.restore(6, loop.abstract_state(run), run.shardings, iterator)
        finally:
            checkpointer.close()

    a, b = final_state(straight), final_state(resumed)
    np.testing.assert_array_equal(a.partner_params["critic"]["w"], b.partner_params["critic"]["w"])
    np.testing.assert_array_equal(a.variables["ema_real"], b.variables["ema_real"])
    for x, y in zip(jax.tree.leaves(a.partner_opt_state), jax.tree.leaves(b.partner_opt_state)):
        np.testing.assert_array_equal(x, y)


def test_single_model_checkpoints_keep_their_layout(tmp_path):
    """A task without partners or variables saves exactly the four train_state entries."""
    workdir = str(tmp_path)
    loop.train_and_evaluate(toy_config(num_steps=3), workdir)
    with open(os.path.join(workdir, "checkpoints", "3", "train_state", "_METADATA")) as f:
        paths = json.load(f)["tree_metadata"]
    assert {eval(path)[0] for path in paths} == {"step", "opt_state", "reference_norms", "rng"}


class Misnamed(ToyGanTask):
    def objectives(self):
        return (tasks.Objective("loss", "generator", super().objectives()[0].loss),)


tasks.TASKS["toy_misnamed"] = "test_training_partners:Misnamed"


def test_objectives_must_train_a_known_network():
    config = toy_gan_config()
    config.model.name = "toy_misnamed"
    with pytest.raises(ValueError, match=r"trains 'generator', which is none of \['critic', 'model'\]"):
        loop.setup(config)
    config.model.name = "toy_gan"
    config.train.loss_groups = 2
    with pytest.raises(ValueError, match="set train.loss_groups=1"):
        loop.setup(config)


class Pretrained(ToyGanTask):
    """ToyGanTask with released values for the encoder kernel, the critic and the EMA."""

    values = None

    def pretrained(self):
        return Pretrained.values


tasks.TASKS["toy_pretrained"] = "test_training_partners:Pretrained"


def _first_state(config, workdir):
    run = loop.setup(config)
    checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint)
    try:
        return run, loop._initial_state(config, run, checkpointer, None)
    finally:
        checkpointer.close()


def test_pretrained_values_start_a_fresh_run_and_init_from_takes_a_model_dir(tmp_path):
    from tokenizers_jax import exported
    from training_toy import PIXELS, WIDTH

    config = toy_gan_config()
    run, fresh = _first_state(config, str(tmp_path / "a"))
    fresh = jax.device_get(fresh)
    encoder = np.full((PIXELS, WIDTH), 0.5, np.float32)
    critic = np.arange(PIXELS, dtype=np.float32)
    Pretrained.values = tasks.Networks({"encoder": {"kernel": encoder}}, {"critic": {"w": critic}},
                                       {"ema_real": np.float32(3.0)})
    config.model.name = "toy_pretrained"
    _, state = _first_state(config, str(tmp_path / "b"))
    np.testing.assert_array_equal(state.params["encoder"]["kernel"], encoder)
    np.testing.assert_array_equal(state.ema_params["encoder"]["kernel"], encoder)
    np.testing.assert_allclose(state.reference_norms["encoder"]["kernel"],
                               np.linalg.norm(encoder), rtol=1e-6)
    np.testing.assert_array_equal(state.partner_params["critic"]["w"], critic)
    assert float(state.variables["ema_real"]) == 3.0
    decoder = state.params["decoder"]["double_blocks_0"]["kernel"]
    np.testing.assert_array_equal(decoder, fresh.params["decoder"]["double_blocks_0"]["kernel"])
    assert state.params["encoder"]["kernel"].sharding == run.shardings.params["encoder"]["kernel"]

    # init_from a model directory: its params win over the pretrained model values.
    model_dir = str(tmp_path / "release")
    exported.save_model_dir(model_dir, config, jax.tree.map(lambda x: x + 1.0, fresh.params))
    config.init_from = model_dir
    _, state = _first_state(config, str(tmp_path / "c"))
    np.testing.assert_array_equal(state.params["encoder"]["kernel"],
                                  fresh.params["encoder"]["kernel"] + 1.0)
    np.testing.assert_array_equal(state.partner_params["critic"]["w"], critic)

    config.init_from = ""
    Pretrained.values = tasks.Networks({"encoder": {"bias": encoder}}, None, None)
    with pytest.raises(ValueError, match=r"params/encoder/bias'\], which the network does not "
                                         r"have"):
        _first_state(config, str(tmp_path / "d"))
    Pretrained.values = tasks.Networks({"encoder": {"kernel": encoder[:2]}}, None, None)
    with pytest.raises(ValueError, match=r"params/encoder/kernel has shape \(2, 16\), the "
                                         r"network expects \(192, 16\)"):
        _first_state(config, str(tmp_path / "e"))
