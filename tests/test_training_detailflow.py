"""DetailFlow's training task: host draws, each loss term against a direct re-statement of the
spec 5 formulas, the t = 1 variant, a short run with exact resume (discriminator state
included) and the coarse-to-fine evaluation grid."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tokenizers_jax import augment, resize, tasks
from tokenizers_jax.models import discriminator as disc
from tokenizers_jax.perceptual import lpips
from tokenizers_jax.quantizers.vq import draw_neighbour_ranks
from tokenizers_jax.tasks.detailflow import (DISCRIMINATOR, DetailFlowTask, StepVariant,
                                             grid_prefix_lengths, group_cosine_similarity)
from tokenizers_jax.training import checkpoint, loop
from test_detailflow import random_params
from training_worker import micro_detailflow_config

BATCH = 2
# Prefix t = 4 of N = 8: R(4) = 9 -> 16 px output (grid 2), degraded; the noise index 1 is a
# single causal token (noise_end 2).
T, NOISE_IDX = 4, 1


@pytest.fixture(scope="module")
def task():
    config = micro_detailflow_config(batch_size=BATCH)
    config.loss.update(perceptual_weight=1.0, perceptual_warmup=200, disc_start=100)
    config.degradation.prob = 0.2
    return DetailFlowTask(config)


@pytest.fixture(scope="module")
def networks(task):
    """Random model params far from the init (without compiling the model's init) and a
    freshly initialised discriminator."""
    key = jax.random.PRNGKey(0)
    abstract = nn.unbox(jax.eval_shape(task.init_params, key))
    params = random_params(abstract)
    partners = jax.jit(lambda k: nn.unbox(task.init_partners(k)))(key)
    variables = jax.jit(task.init_variables)(key)
    return tasks.Networks(params, *jax.device_get((partners, variables)))


def _images(seed=0, size=16):
    return np.random.default_rng(seed).integers(0, 256, (BATCH, size, size, 3), np.uint8)


def _draws(task, step):
    res = task.res_map
    return {"step": np.int32(step), "num_tokens": np.int32(T), "noise_idx": np.int32(NOISE_IDX),
            "degrade": resize.degrade_matrix(16, res.resolution(T),
                                             res.output_resolution(T)).astype(np.float32)}


def _objective_fns(task, variant):
    generator, discriminator = task.objectives()

    def run(objective, params, variables, draws, batch, key, carry=None):
        context = tasks.StepContext(task.constants, variables, draws, variant, carry)
        return objective.loss(params, context, batch, key)

    return (jax.jit(lambda *a: run(generator, *a)),
            jax.jit(lambda *a: run(discriminator, *a)))


@pytest.fixture(scope="module")
def objectives(task):
    return _objective_fns(task, StepVariant(grid=2, correction=True))


def test_host_draws_are_per_step_and_follow_the_prefix_rules(task):
    res = task.res_map
    variant, draws = task.host_draws(7)
    again = task.host_draws(7)
    assert variant == again[0] and jax.tree.map(np.array_equal, draws, again[1])
    full = 0
    for step in range(600):
        variant, draws = task.host_draws(step)
        t, noise = int(draws["num_tokens"]), int(draws["noise_idx"])
        full += t == res.num_tokens
        assert variant == StepVariant(res.output_grid(t), t > 1)
        assert int(draws["step"]) == step
        if variant.correction:  # the perturbed token or group ends inside the prefix
            assert noise + res.noise_count(noise) <= t
        np.testing.assert_array_equal(draws["degrade"], resize.degrade_matrix(
            16, res.resolution(t), res.output_resolution(t)).astype(np.float32))
        if t == res.num_tokens:  # the full image itself: the identity
            np.testing.assert_array_equal(draws["degrade"], np.eye(16))
    assert 0.75 < full / 600 < 0.85  # spec 2: P(t = N) = 0.8


@functools.partial(jax.jit, static_argnums=0)
def _generator_terms(task, networks, images, key):
    """The generator's terms re-stated from the spec with the objective's random draws."""
    ranks_key, lpips_key, d_key = jax.random.split(jax.random.fold_in(key, 0), 3)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    ranks = draw_neighbour_ranks(ranks_key, (BATCH, 8), task.model.neighbour_top_k)
    out = task.model.apply({"params": networks.params}, x, NOISE_IDX, ranks, T, 2)
    recon, corr = out["reconstructions"], out["correction"]
    target = resize.degrade(x, task.res_map.resolution(T), 16)  # area to R(4) = 9, bicubic to 16
    target = jnp.concatenate([target, target])  # the 2B decoder batch: clean, then corrected
    mse = jnp.mean((recon - target) ** 2)
    perceptual = jnp.mean(lpips.lpips_distance(task.constants["lpips"], target, recon, lpips_key))
    aug_key, dino_key = jax.random.split(d_key)
    fake, d_state = disc.discriminator_logits(
        networks.partners[DISCRIMINATOR], networks.variables[DISCRIMINATOR],
        task.constants["dino"], dino_key, augment.diff_augment(aug_key, recon, augment.NORMAL),
        task.heads, task.dino)
    hinge_g = -jnp.mean(fake)
    # SigLIP2 on the clean image, post LayerNorm twice, mean over patches, l2-normalised.
    teacher = task.teacher.apply({"params": task.constants["teacher"]}, x,
                                 method=lambda m, v: m.post_layernorm(m(v)))
    teacher = jnp.mean(teacher, axis=1)
    teacher = teacher / jnp.linalg.norm(teacher, axis=-1, keepdims=True)
    alignment = jnp.mean(-jnp.sum(out["first_token"] * teacher, axis=-1))
    return mse, perceptual, hinge_g, alignment, recon, target, corr, d_state


@pytest.mark.parametrize("step", [98, 99])  # the original's global step 99 (GAN off), 100 (on)
def test_generator_loss_restates_spec_5(task, networks, objectives, step):
    params = {tasks.MODEL: networks.params, **networks.partners}
    images = _images()
    key = jax.random.PRNGKey(3)
    loss, output = objectives[0](params, networks.variables, _draws(task, step),
                                 {"image": images}, key)

    mse, perceptual, hinge_g, alignment, recon, target, corr, d_state = _generator_terms(
        task, networks, images, key)
    assert recon.shape == (2 * BATCH, 16, 16, 3)
    global_step = step + 1
    w_p = min(1.0, global_step / 200)
    w_d = 0.2 if global_step >= 100 else 0.0
    expected = (mse + w_p * perceptual + w_d * hinge_g + corr.codebook_loss
                + corr.commitment_loss + alignment)

    m = output.metrics
    for name, value in [("reconstruction", mse), ("perceptual", perceptual),
                        ("perceptual_weight", w_p), ("generator_adversarial", hinge_g),
                        ("disc_weight", w_d), ("codebook", corr.codebook_loss),
                        ("commitment", corr.commitment_loss), ("alignment", alignment)]:
        np.testing.assert_allclose(m[name], value, rtol=2e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(loss, expected, rtol=2e-5)
    assert float(m["perceptual"]) > 0 and float(m["alignment"]) != 0
    assert (float(m["num_tokens"]), float(m["noise_index"]), float(m["output_size"])) == (4, 1, 16)
    np.testing.assert_allclose(output.carry[0], target, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(output.carry[1], recon, rtol=1e-5, atol=1e-6)
    # The generator's D call is a training-mode call: it moves the spectral vectors and stats.
    for a, b in zip(jax.tree.leaves(output.variables[DISCRIMINATOR]), jax.tree.leaves(d_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    window = output.variables["codebook_window"]
    np.testing.assert_array_equal(window[-BATCH * 8:], corr.indices[..., 0].ravel())
    assert np.all(np.asarray(window[:-BATCH * 8]) == -1)
    codes = jnp.concatenate([corr.quant_clean, corr.quant])
    np.testing.assert_allclose(m["token_cosine_similarity"],
                               group_cosine_similarity(codes, 4), rtol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _discriminator_calls(task, networks, key, target, recon):
    """Four training-mode D calls in the original's order: real, fake under DiffAugment, then
    real, fake under the strong policy, each moving the D state."""
    keys = jax.random.split(jax.random.fold_in(key, 1), 4)
    state, logits = networks.variables[DISCRIMINATOR], []
    for call_key, images, policy in zip(keys, (target, recon, target, recon),
                                        (augment.NORMAL, augment.NORMAL, augment.STRONG,
                                         augment.STRONG)):
        aug_key, dino_key = jax.random.split(call_key)
        call, state = disc.discriminator_logits(
            networks.partners[DISCRIMINATOR], state, task.constants["dino"], dino_key,
            augment.diff_augment(aug_key, images, policy), task.heads, task.dino)
        logits.append(call)
    return logits, state


@pytest.mark.parametrize("step", [98, 99])
def test_discriminator_loss_restates_spec_5(task, networks, objectives, step):
    params = {tasks.MODEL: networks.params, **networks.partners}
    key = jax.random.PRNGKey(4)
    rng = np.random.default_rng(1)
    target = jnp.asarray(rng.uniform(-1, 1, (2 * BATCH, 16, 16, 3)), jnp.float32)
    recon = jnp.asarray(rng.uniform(-1, 1, (2 * BATCH, 16, 16, 3)), jnp.float32)
    variables = dict(networks.variables, lecam={"real_ema": np.float32(0.3),
                                                "fake_ema": np.float32(-0.2)})
    loss, output = objectives[1](params, variables, _draws(task, step), {"image": _images()},
                                 key, (target, recon))

    logits, state = _discriminator_calls(task, networks, key, target, recon)
    r, f, r_strong, f_strong = (np.asarray(x, np.float64) for x in logits)
    relu = lambda v: np.maximum(v, 0)
    ema_r = 0.999 * 0.3 + 0.001 * r.mean()  # updated first, on every step
    ema_f = 0.999 * -0.2 + 0.001 * f.mean()
    hinge = 0.5 * (relu(1 - r).mean() + relu(1 + f).mean())
    lecam = (relu(r - ema_f) ** 2).mean() + (relu(ema_r - f) ** 2).mean()
    cr = ((np.concatenate([r, f]) - np.concatenate([r_strong, f_strong])) ** 2).mean()
    on = step + 1 >= 100
    expected = (0.2 if on else 0.0) * (hinge + 0.001 * lecam) + (4.0 if on else 0.0) * cr

    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=1e-8)
    m = output.metrics
    for name, value in [("discriminator_hinge", hinge), ("lecam", lecam), ("consistency", cr),
                        ("logits_real", r.mean()), ("logits_fake", f.mean()),
                        ("lecam_real_ema", ema_r), ("lecam_fake_ema", ema_f)]:
        np.testing.assert_allclose(m[name], value, rtol=2e-5, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(output.variables["lecam"]["real_ema"], ema_r, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(output.variables[DISCRIMINATOR]), jax.tree.leaves(state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(output.variables[DISCRIMINATOR]["batch_stats"]["heads_0"]["norm_in"][
        "num_batches_tracked"]) == 4


def test_prefix_one_has_no_correction_pass(task, networks):
    """Spec 9.2: at t = 1 the decoder batch is B (no self-correction), the target not doubled."""
    generator, _ = _objective_fns(task, StepVariant(grid=1, correction=False))
    res = task.res_map
    draws = dict(_draws(task, 0), num_tokens=np.int32(1), degrade=resize.degrade_matrix(
        16, res.resolution(1), 8).astype(np.float32))
    params = {tasks.MODEL: networks.params, **networks.partners}
    _, output = jax.eval_shape(generator, params, networks.variables, draws,
                               {"image": _images()}, jax.random.PRNGKey(0))
    assert output.carry[0].shape == output.carry[1].shape == (BATCH, 8, 8, 3)


def test_pretrained_encoder_from_siglip2_and_discriminator_from_a_release(task, networks,
                                                                          tmp_path):
    """Spec 1.1: a fresh run's encoder is SigLIP2's first layers; a release's discriminator
    heads (convert detailflow --discriminator) start the partner and its state."""
    from tokenizers_jax import exported

    config = micro_detailflow_config()
    config.train.update(allow_random_init_networks=False, siglip2_weights=str(tmp_path / "no"))
    with pytest.raises(FileNotFoundError, match="(?s)encoder_from_siglip2 needs the SigLIP2 so400m "
                                                "weights in .*no.*convert siglip2"):
        DetailFlowTask(config)

    siglip2_dir, heads_dir = str(tmp_path / "siglip2"), str(tmp_path / "heads")
    exported.save_model_dir(siglip2_dir, ml_collections.ConfigDict({"model": {"name": "siglip2"}}),
                            task.constants["teacher"])
    heads = {"params": networks.partners[DISCRIMINATOR], **networks.variables[DISCRIMINATOR]}
    exported.save_model_dir(heads_dir, ml_collections.ConfigDict(
        {"model": {"name": disc.NAME}}), heads)
    config.train.update(allow_random_init_networks=True, siglip2_weights=siglip2_dir,
                        discriminator_init=heads_dir)
    config.loss.perceptual_weight = 0.0
    pretrained = DetailFlowTask(config).pretrained()
    vit = pretrained.params["encoder"]["vit"]
    assert sorted(vit) == ["layers_0", "patch_embedding", "position_embedding", "post_layernorm"]
    for a, b in zip(jax.tree.leaves(vit), jax.tree.leaves(
            {k: task.constants["teacher"][k] for k in vit})):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves((pretrained.partners, pretrained.variables)),
                    jax.tree.leaves(({DISCRIMINATOR: heads["params"]},
                                     {DISCRIMINATOR: networks.variables[DISCRIMINATOR]}))):
        np.testing.assert_array_equal(a, b)


def test_grid_prefix_lengths_are_coarse_to_fine():
    from tokenizers_jax.detailflow_resolution import ResolutionMap

    assert grid_prefix_lengths(ResolutionMap()) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert grid_prefix_lengths(ResolutionMap(image_size=32, num_tokens=12, group_size=4,
                                             causal_num=4, patch_size=8)) == (1, 2, 4, 8, 12)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row for row in map(json.loads, f) if "train/loss" in row}


def _run_config(num_steps):
    config = micro_detailflow_config()
    config.degradation.prob = 0.5
    config.loss.disc_start = 3  # the GAN switches on at row 3 (the original's step 3)
    config.train.num_steps = num_steps
    config.eval.update(every=3, num_images=2)
    return config


@pytest.mark.slow
def test_short_run_resumes_exactly_with_the_discriminator_state(tmp_path):
    """A run killed after its step-3 checkpoint and resumed makes the same steps 4-6 (losses,
    discriminator, LeCam EMAs, logits) and ends in the same state, discriminator included."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    summary = loop.train_and_evaluate(_run_config(6), straight)
    loop.train_and_evaluate(_run_config(3), resumed)
    loop.train_and_evaluate(_run_config(6), resumed)
    expected, actual = _rows(straight), _rows(resumed)
    variants = {(row["train/num_tokens"], row["train/noise_index"]) for row in expected.values()}
    assert len({t for t, _ in variants}) >= 2, variants  # several step variants were compiled
    for step in (4, 5, 6):
        for name in ("train/loss", "train/discriminator_loss", "train/reconstruction",
                     "train/lecam_real_ema", "train/logits_fake", "train/codebook_usage",
                     "train/discriminator_grad_norm", "train/grad_norm"):
            assert actual[step][name] == expected[step][name], (step, name)
    for step in (1, 2):  # before disc_start the discriminator loss is exactly zero
        assert expected[step]["train/discriminator_grad_norm"] == 0.0
        assert expected[step]["train/disc_weight"] == 0.0
    assert expected[3]["train/disc_weight"] == pytest.approx(0.2)
    assert expected[6]["train/discriminator_grad_norm"] > 0
    for name in ("train/learning_rate", "train/learning_rate_discriminator",
                 "train/consistency", "train/lecam_fake_ema", "train/codebook_perplexity"):
        assert name in expected[6], name
    assert {"eval/psnr", "eval/psnr_1", "eval/psnr_4"} <= set(summary["eval"])
    assert os.path.isfile(os.path.join(straight, "images", "reconstruction_00000006.png"))

    def final_state(workdir):
        run = loop.setup(_run_config(6))
        checkpointer = checkpoint.Checkpointer(workdir, run.task.config.checkpoint)
        from tokenizers_jax import data

        iterator = data.make_train_iterator(run.task.config.data, global_batch_size=4)
        try:
            return checkpointer.restore(6, loop.abstract_state(run), run.shardings, iterator)
        finally:
            checkpointer.close()

    a, b = final_state(straight), final_state(resumed)
    for part in ("params", "partner_params", "partner_opt_state", "variables"):
        for x, y in zip(jax.tree.leaves(getattr(a, part)), jax.tree.leaves(getattr(b, part))):
            np.testing.assert_array_equal(x, y, err_msg=part)
    window = np.asarray(a.variables["codebook_window"])
    assert window.shape == (64,) and np.all(window >= 0)  # 6 steps x 4 images x 8 tokens > 64
