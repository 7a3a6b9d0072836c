"""The FlowMo task in the training loop: masks, accumulation, a short run, load_tokenizer, 1B."""

import jax
import flax.linen as nn
import numpy as np
import pytest

import tokenizers_jax
from tokenizers_jax.config_file import load_config
from tokenizers_jax.tasks.flowmo import FlowMoTask
from tokenizers_jax.training import checkpoint, loop
from training_toy import ROOT
from training_worker import micro_flowmo_config


def test_lo_masks_fix_240_matrices_and_freeze_the_whole_encoder():
    config = load_config(f"{ROOT}/configs/flowmo.py:lo")
    with config.unlocked():
        config.loss.perceptual = "none"
    task = FlowMoTask(config)
    params = nn.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    fixed = jax.tree_util.tree_flatten_with_path(task.fixed_norm_mask(params))[0]
    fixed_paths = [jax.tree_util.keystr(path) for path, selected in fixed if selected]
    assert len(fixed_paths) == 240
    assert all("double_blocks_" in p and p.endswith("['kernel']") for p in fixed_paths)
    frozen = task.freeze_mask(params)
    assert all(jax.tree.leaves(frozen["encoder"])) and not any(jax.tree.leaves(frozen["decoder"]))


def _step(config, batch):
    fresh = loop.fresh_step(config, batch)
    return fresh.step(fresh.state, fresh.constants, fresh.batch)


@pytest.mark.slow
def test_accumulated_micro_batches_equal_loss_groups_of_one_batch():
    """LFQ entropy is per sub-batch: 2 accumulated micro-batches == 1 batch in 2 groups."""
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)}
    accumulated = micro_flowmo_config(batch_size=8)
    accumulated.train.update(grad_accum_steps=2, loss_groups=1)
    grouped = micro_flowmo_config(batch_size=8)
    grouped.train.update(grad_accum_steps=1, loss_groups=2)
    for config in (accumulated, grouped):
        config.optim.eps = 1.0  # Adam's first step becomes ~ lr * grad: compares gradients
    (state_a, metrics_a), (state_g, metrics_g) = _step(accumulated, batch), _step(grouped, batch)
    for name in ("loss", "entropy", "flow", "grad_norm"):
        np.testing.assert_allclose(metrics_a[name], metrics_g[name], rtol=2e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_g.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_short_run_with_lpips_checkpoints_and_loads_as_a_tokenizer(tmp_path):
    config = micro_flowmo_config(batch_size=4)
    config.train.update(num_steps=2, grad_accum_steps=1, loss_groups=1,
                        perceptual_random_init=True)
    config.loss.perceptual = "lpips"
    config.checkpoint.every = 2
    config.eval.update(every=2, num_images=2)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["train"]["perceptual"] != 0 and np.isfinite(summary["eval"]["eval/psnr"])
    assert checkpoint.latest_step(str(tmp_path)) == 2
    tokenizer = tokenizers_jax.load_tokenizer(str(tmp_path))
    images = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), np.uint8)
    assert tokenizer.reconstruct(images).shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_posttrain_starts_from_a_stage_1a_workdir(tmp_path):
    pretrain = micro_flowmo_config(batch_size=4)
    pretrain.train.update(num_steps=1, grad_accum_steps=1, loss_groups=1)
    pretrain.eval.every = 0
    loop.train_and_evaluate(pretrain, str(tmp_path / "1a"))
    posttrain = micro_flowmo_config(batch_size=4)
    posttrain.train.update(num_steps=1, grad_accum_steps=1, loss_groups=1,
                           perceptual_random_init=True)
    posttrain.loss.update(posttrain=True, perceptual="resnet", perceptual_weight=0.01,
                          posttrain_sample_k=2)
    posttrain.optim.freeze_after = 0
    posttrain.eval.every = 0
    posttrain.init_from = str(tmp_path / "1a")
    summary = loop.train_and_evaluate(posttrain, str(tmp_path / "1b"))
    assert summary["train"]["perceptual"] > 0
    _, start = checkpoint.load_for_inference(str(tmp_path / "1a"))
    _, ema = checkpoint.load_for_inference(str(tmp_path / "1b"))
    np.testing.assert_array_equal(ema["encoder"]["txt_in"]["kernel"],
                                  start["encoder"]["txt_in"]["kernel"])  # frozen
