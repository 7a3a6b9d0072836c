"""MaskGIT training (maskgit.md section 3): masks and loss against re-statements, the task's
checks of the token export, a short run with its evaluation grid, and (slow) the tiny flow
from the command line: FlowMo -> token export -> MaskGIT training -> generated images."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tokenizers_jax
from tokenizers_jax import exported, token_export
from tokenizers_jax.config_file import load_config
from tokenizers_jax.models import flowmo, maskgit
from tokenizers_jax.tasks import build_task
from tokenizers_jax.tasks.maskgit import sample_mask_draws, token_loss, training_mask
from tokenizers_jax.training import loop

from conftest import small_flowmo_config
from test_detailflow import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec_ratio(u, schedule):
    return np.clip(np.arccos(u) / (np.pi / 2) if schedule == "arccos" else np.cos(u * np.pi / 2),
                   1e-6, 1.0)


@pytest.mark.parametrize("schedule", ["arccos", "cosine"])
def test_training_masks_restate_the_spec(schedule):
    draws = sample_mask_draws(jax.random.PRNGKey(0), 4000, 24)
    u = np.asarray(draws.ratio_uniform, np.float64)
    units = np.asarray(draws.unit_uniform, np.float64)
    # MaskBit: every sub-token masked independently with probability gamma(u).
    bernoulli, returned_ratio = training_mask(draws, schedule, "bernoulli")
    np.testing.assert_allclose(returned_ratio, spec_ratio(u, schedule), rtol=1e-5, atol=1e-6)
    ratio = np.asarray(returned_ratio, np.float64)  # the fp32 values, for exact comparisons
    np.testing.assert_array_equal(bernoulli, units < ratio[:, None])
    # 1d-tokenizer: exactly max(1, round(N gamma)) of them, a uniformly random subset.
    exact, _ = training_mask(draws, schedule, "exact_count")
    counts = np.maximum(1, np.round(24 * ratio))
    np.testing.assert_array_equal(np.sum(exact, -1), counts)
    kth_smallest = np.sort(units, -1)[np.arange(4000), counts.astype(int) - 1]
    np.testing.assert_array_equal(exact, units <= kth_smallest[:, None])
    # The ratio's distribution: P(gamma <= x) = 1 - cos(pi x / 2) (arccos), 1 - 2 arccos(x)/pi.
    grid = np.linspace(0.05, 0.95, 10)
    cdf = 1 - np.cos(np.pi * grid / 2) if schedule == "arccos" else 1 - 2 * np.arccos(grid) / np.pi
    empirical = np.mean(np.asarray(returned_ratio)[:, None] <= grid, axis=0)
    np.testing.assert_allclose(empirical, cdf, atol=0.03)


def test_token_loss_is_torch_label_smoothed_cross_entropy():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 4, 2, 8).astype(np.float32)
    targets = rng.randint(0, 8, (3, 4, 2))
    masked = rng.rand(3, 4, 2) < 0.5
    per_token = F.cross_entropy(torch.tensor(logits).reshape(-1, 8),
                                torch.tensor(targets).reshape(-1), label_smoothing=0.1,
                                reduction="none").numpy().reshape(targets.shape)
    for unmasked_weight in (1.0, 0.0, 0.1):  # all tokens (MaskBit), masked only, 1d-tokenizer
        weights = np.where(masked, 1.0, unmasked_weight)
        loss, metrics = token_loss(jnp.asarray(logits), jnp.asarray(targets),
                                   jnp.asarray(masked), 0.1, unmasked_weight)
        assert float(loss) == pytest.approx(np.sum(weights * per_token) / weights.sum(), rel=1e-5)
    assert float(metrics["masked_loss"]) == pytest.approx(per_token[masked].mean(), rel=1e-5)
    accuracy = (logits.argmax(-1) == targets)[masked].mean()
    assert float(metrics["masked_accuracy"]) == pytest.approx(accuracy)
    nothing, _ = token_loss(jnp.asarray(logits), jnp.asarray(targets),
                            jnp.zeros(masked.shape, bool), 0.1, 0.0)
    assert float(nothing) == 0.0


# --- the task on a token export ------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_export_dir(tmp_path_factory):
    """A random-init small FlowMo (8 tokens x 8 bits, fg 4) and its tokens of 14 photo crops."""
    root = tmp_path_factory.mktemp("maskgit")
    config = small_flowmo_config()
    params = random_params(flowmo.abstract_params(flowmo.build_model(config)))
    exported.save_model_dir(root / "flowmo", config, params)
    export = load_config(os.path.join(ROOT, "configs", "export_tokens.py:photos"))
    export.unlock()
    export.data.crops_per_photo = 2
    export.export.update(examples_per_shard=8, batch_size=8)
    token_export.export_tokens(str(root / "flowmo"), export, str(root / "tokens"))
    return root


def manifest_tokenizer(root):
    return str(root / "flowmo")


def maskgit_config(root, **overrides):
    config = load_config(os.path.join(ROOT, "configs", "maskgit.py:tiny"))
    config.unlock()
    # No dropout here: it doubles the step's compile time (the slow test trains with it).
    config.model.update(num_positions=8, hidden_size=16, depth=1, num_heads=2, mlp_dim=32,
                        dropout=0.0)
    config.sampler.steps = 2
    config.data.path = str(root / "tokens")
    config.train.update(num_steps=2, batch_size=4)
    config.optim.warmup_steps = 1
    config.checkpoint.every = 2
    config.eval.update(every=2, num_images=3)  # (the tokenizer checks need every > 0)
    for name, value in overrides.items():
        section, field = name.split(".")
        config[section][field] = value
    return config


def test_the_task_checks_the_export_and_the_tokenizer(token_export_dir):
    with pytest.raises(ValueError, match="tokens_per_image is 16 but the MaskGIT config"):
        build_task(maskgit_config(token_export_dir, **{"model.num_positions": 4}))
    with pytest.raises(ValueError, match="it has 7 classes but the MaskGIT config"):
        build_task(maskgit_config(token_export_dir, **{"model.num_classes": 5}))
    # Same token count and codebook, another layout: 16 positions x 1 split of 4 bits.
    with pytest.raises(ValueError, match="code_length is 8 but the MaskGIT config needs 16"):
        build_task(maskgit_config(token_export_dir, **{"model.num_positions": 16,
                                                       "model.splits": 1}))
    with pytest.raises(ValueError, match="set --config.data.name=tokens"):
        build_task(maskgit_config(token_export_dir, **{"data.name": "sample_photos"}))
    with pytest.raises(ValueError, match="set --config.data.path=DIR"):
        build_task(maskgit_config(token_export_dir, **{"data.path": ""}))
    moved = token_export_dir / "moved_tokens"  # an export whose tokenizer is gone
    shutil.copytree(token_export_dir / "tokens", moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["tokenizer"]["path"] = str(token_export_dir / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="which is gone.*--config.eval.tokenizer=DIR, or "
                                         "--config.eval.every=0"):
        build_task(maskgit_config(token_export_dir, **{"data.path": str(moved)}))
    build_task(maskgit_config(token_export_dir, **{"data.path": str(moved),
                                                   "eval.tokenizer": manifest_tokenizer(
                                                       token_export_dir)}))
    task = build_task(maskgit_config(token_export_dir))
    assert task.tokenizer.config.model.name == "flowmo"
    assert set(task.constants) == {"flowmo_decoder"}
    assert not build_task(maskgit_config(token_export_dir, **{"eval.every": 0})).constants


def test_a_short_run_trains_on_the_export(token_export_dir):
    """Two steps through the generic loop (the evaluation grid is in the slow CLI test)."""
    workdir = str(token_export_dir / "run")
    summary = loop.train_and_evaluate(maskgit_config(token_export_dir, **{"eval.every": 0}),
                                      workdir)
    assert summary["step"] == 2 and np.isfinite(summary["train"]["loss"])
    assert set(summary["train"]) >= {"masked_loss", "masked_accuracy", "mask_ratio"}
    generator = tokenizers_jax.load_generator(workdir)  # the tokenizer of the export's manifest
    assert isinstance(generator, maskgit.MaskGITGenerator)
    assert generator.tokenizer.config.model.code_length == 8


def _run(*args, timeout=1200):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_tiny_flow_from_the_command_line(tmp_path):
    """configs/flowmo.py:tiny with random params -> export of the built-in photos -> train
    configs/maskgit.py:tiny (shortened) with falling loss -> a grid and generated images."""
    _run("-c", "import sys, jax; from tokenizers_jax import exported; "
         "from tokenizers_jax.config_file import load_config; from tokenizers_jax.models import "
         "flowmo; c = load_config('configs/flowmo.py:tiny'); m = flowmo.build_model(c); "
         f"exported.save_model_dir({str(tmp_path / 'flowmo')!r}, c, "
         "flowmo.init_params(m, jax.random.PRNGKey(0)))")
    _run("-m", "tokenizers_jax.export_tokens", f"--tokenizer={tmp_path / 'flowmo'}",
         "--config=configs/export_tokens.py:photos", "--config.data.crops_per_photo=16",
         f"--output={tmp_path / 'tokens'}")
    workdir = tmp_path / "maskgit"
    _run("-m", "tokenizers_jax.train", "--config=configs/maskgit.py:tiny",
         f"--workdir={workdir}", f"--config.data.path={tmp_path / 'tokens'}",
         "--config.train.num_steps=100", "--config.eval.every=100",
         "--config.checkpoint.every=100")
    with open(workdir / "metrics.jsonl") as f:
        losses = [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]
    assert len(losses) == 10 and np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    grid = np.asarray(Image.open(workdir / "images" / "reconstruction_00000100.png"))
    # Two rows of the 7 evaluation images (32 px): their tokens decoded, then samples of their
    # labels, both by the FlowMo tokenizer's sampler.
    assert grid.shape == (2 * 32, 7 * 32, 3)
    generator = tokenizers_jax.load_generator(workdir)
    images = generator.generate_images([0, 3, 6], seed=1)
    assert images.shape == (3, 32, 32, 3) and math.isfinite(float(jnp.abs(images).max()))
