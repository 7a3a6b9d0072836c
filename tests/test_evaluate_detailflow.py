"""The evaluation job on DetailFlow (spec 7): a random-init model directory on the built-in
photos, the prefix curve at R(n), the noisy-eval variants, the original's compatibility
metrics and the coarse-to-fine grid; the CLI end to end on a training workdir (slow)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from test_detailflow import random_params
from tokenizers_jax import api, data, evaluation, exported, metrics
from tokenizers_jax.detailflow_resolution import ResolutionMap
from tokenizers_jax.models import detailflow as df
from tokenizers_jax.tasks.detailflow import prefix_target
from training_toy import ROOT
from training_worker import micro_detailflow_config

NUM_EXAMPLES = 3  # batches of 2: one padding row


def eval_config():
    """Prefix lengths 4 and 8 only: every output is 16 px, so the Inception / LPIPS metrics
    compile once (the 8 px prefixes are evaluated by the slow CLI test)."""
    config = micro_detailflow_config()
    config.data.num_eval_examples = NUM_EXAMPLES
    config.eval.update(batch_size=2, grid_size=2, prefix_lengths=(4, 8))
    return config


def fast_frechet(mu1, sigma1, mu2, sigma2):
    """FID's sqrtm of 2048 x 2048 matrices takes ~20 s per call here and FID is covered by
    test_evaluate and test_metrics; this file is about the variants' plumbing."""
    del sigma1, sigma2
    return float(np.sum((mu1 - mu2) ** 2))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    config = eval_config()
    root = tmp_path_factory.mktemp("detailflow_eval")
    model_dir, output_dir = str(root / "model"), str(root / "eval")
    params = random_params(df.init_params(config, jax.random.PRNGKey(0), abstract=True))
    exported.save_model_dir(model_dir, config, params)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation.metrics, "frechet_distance", fast_frechet)
        result = evaluation.evaluate(config, model_dir, output_dir)
    return config, model_dir, output_dir, result


def _images(config):
    return next(data.make_eval_iterator(config.data, global_batch_size=NUM_EXAMPLES))["image"]


def test_headline_metrics_and_the_originals_compatibility_values(evaluated):
    config, model_dir, _, result = evaluated
    assert result["model"] == "detailflow" and result["num_examples"] == NUM_EXAMPLES
    assert result["bits_per_pixel"] == 8 * 4 / 16**2  # 8 tokens of log2(16) bits on 16 x 16
    assert "psnr_flowmo_batch_compat" not in result
    images = _images(config)
    tokenizer = api.load_tokenizer(model_dir)
    indices = tokenizer.encode(images)
    recon = tokenizer.decode(indices)
    images01, recon01 = jnp.asarray(images, jnp.float32) / 255, (recon + 1) / 2
    np.testing.assert_allclose(result["psnr"], np.mean(metrics.psnr(images01, recon01)),
                               rtol=1e-4)
    np.testing.assert_allclose(result["ssim"], np.mean(metrics.ssim(images01, recon01)),
                               rtol=1e-4, atol=1e-5)
    # reconstruct_vq.py: uint8 by clamp(127.5 x + 128) truncation; SSIM with data_range 2.
    uint8 = np.floor(np.clip(127.5 * np.asarray(recon) + 128, 0, 255)) / 255
    gt = (np.asarray(images, np.float32) / 127.5 - 1 + 1) / 2
    np.testing.assert_allclose(result["ssim_detailflow_compat"],
                               np.mean(metrics.ssim(gt, uint8, data_range=2.0)), rtol=1e-4)
    np.testing.assert_allclose(result["psnr_detailflow_compat"],
                               np.mean(metrics.psnr(gt, uint8)), rtol=1e-4)
    assert result["ssim_detailflow_compat"] > result["ssim"]  # the quirk inflates SSIM
    usage = metrics.codebook_usage(indices, config.model.codebook_size)
    np.testing.assert_allclose(result["codebook_usage"], usage.fraction_used)
    assert np.isfinite(result["lpips_vgg"]) and result["random_init_networks"] is True


def test_variants_of_the_config():
    config = eval_config()
    config.eval.prefix_lengths = ()  # every allowed prefix length
    variants = evaluation.detailflow_reconstructor(config).variants
    assert [v.name for v in variants] == ["prefix_1", "prefix_2", "prefix_3", "prefix_4",
                                          "prefix_8", "noise_0", "noise_4"]
    assert [v.info["output_size"] for v in variants[:5]] == [8, 8, 8, 16, 16]
    config.eval.update(prefix_curve=False, noisy=False)
    assert evaluation.detailflow_reconstructor(config).variants == ()
    config.eval.update(prefix_curve=True, prefix_lengths=(5,))
    with pytest.raises(ValueError, match=r"eval.prefix_lengths \[5\] are not allowed prefix "
                                         r"lengths; choose from \(1, 2, 3, 4, 8\)"):
        evaluation.detailflow_reconstructor(config)


def test_prefix_curve_at_r_of_n_against_the_degraded_targets(evaluated):
    config, model_dir, _, result = evaluated
    res_map = ResolutionMap.from_config(config.model)
    curve = result["prefix_curve"]
    assert [e["num_tokens"] for e in curve] == [4, 8]
    assert [e["output_size"] for e in curve] == [16, 16]
    assert [e["resolution"] for e in curve] == [res_map.resolution(n) for n in (4, 8)] == [9, 16]
    assert np.isfinite(curve[0]["lpips_vgg"])
    full = curve[-1]  # all tokens against the image itself: the headline numbers
    np.testing.assert_allclose(full["psnr"], result["psnr"], rtol=1e-6)
    np.testing.assert_allclose(full["rfid"], result["rfid"], rtol=1e-6)
    images = _images(config)
    tokenizer = api.load_tokenizer(model_dir)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    for entry in curve[:1]:
        n = entry["num_tokens"]
        decoded = tokenizer.decode(tokenizer.encode(images), num_tokens=n)
        assert decoded.shape[1] == entry["output_size"]
        target = prefix_target(x, res_map, n)
        np.testing.assert_allclose(
            entry["psnr"], np.mean(metrics.psnr((target + 1) / 2, (decoded + 1) / 2)), rtol=1e-4)


def test_noisy_variants_follow_the_originals_indices(evaluated):
    config, model_dir, _, result = evaluated
    res_map = ResolutionMap.from_config(config.model)
    assert evaluation.detailflow_noise_indices(ResolutionMap()) == (0, 32, 64, 96, 120)
    assert evaluation.detailflow_noise_indices(res_map) == (0, 4)  # G = 2 groups
    noisy = result["noisy"]
    assert [(e["noise_idx"], e["noise_num"]) for e in noisy] == [(0, 1), (4, 4)]
    # Re-stated: the self-correction encode with the variant's per-example keys (stream 1 + the
    # number of prefix variants before it), the perturbed sequence decoded with all tokens.
    model = df.model_from_config(config)
    params = exported.load_params(model_dir)
    x = jnp.asarray(_images(config), jnp.float32) / 127.5 - 1
    stream = 1 + len(result["prefix_curve"]) + 1  # the second noisy variant
    keys = evaluation.example_keys(config.eval.seed, stream, 0, NUM_EXAMPLES)
    ranks = jax.vmap(lambda k: jax.random.randint(k, (8,), 0, 4))(keys)
    quant = model.apply({"params": params}, x, 4, ranks, method=df.DetailFlow.self_correction).quant
    recon = jnp.clip(model.apply({"params": params}, quant, 8, 2, method=df.DetailFlow.decode), -1, 1)
    np.testing.assert_allclose(noisy[1]["psnr"], np.mean(metrics.psnr((x + 1) / 2, (recon + 1) / 2)),
                               rtol=1e-4)
    assert noisy[1]["psnr"] != result["psnr"]


def test_outputs_grid_and_scalars(evaluated):
    _, _, output_dir, result = evaluated
    with open(os.path.join(output_dir, "metrics_model.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    (name,) = os.listdir(os.path.join(output_dir, "images"))
    assert name.startswith("reconstructions_RANDOM_INIT")
    grid = np.asarray(Image.open(os.path.join(output_dir, "images", name)))
    # originals, then decodes at 1, 2, 4 and 8 tokens, nearest-upsampled to 16 px; 2 columns
    assert grid.shape == (5 * 16, 2 * 16, 3)
    one_token = grid[16:32].astype(int)  # 8 px decodes: every pixel a 2 x 2 block
    np.testing.assert_array_equal(one_token[0::2], one_token[1::2])
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        (row,) = [json.loads(line) for line in f]
    assert {"eval/prefix_4/psnr", "eval/prefix_4/ssim_detailflow_compat",
            "eval/noise_4/rfid_RANDOM_INIT", "eval/psnr_detailflow_compat"} <= set(row)
    assert "eval/prefix_4/rfid" not in row


@pytest.mark.slow
def test_evaluate_cli_on_a_training_workdir(tmp_path):
    """Train a micro DetailFlow for two steps, then `python -m tokenizers_jax.evaluate` on the
    workdir with the tiny config's evaluation settings."""
    from tokenizers_jax.training import loop

    config = micro_detailflow_config()
    config.train.num_steps = 2
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "tokenizers_jax.evaluate",
               "--config=configs/detailflow.py:tiny", f"--checkpoint={workdir}",
               "--config.data.image_size=16", "--config.data.num_eval_examples=4",
               "--config.eval.batch_size=2", "--config.eval.prefix_lengths=(1,8)"]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=1500)
    assert process.returncode == 0, process.stderr[-4000:]
    with open(os.path.join(workdir, "eval", "metrics_step_2.json")) as f:
        result = json.load(f)
    assert result["step"] == 2 and result["num_examples"] == 4
    assert [e["num_tokens"] for e in result["prefix_curve"]] == [1, 8]
    assert [e["output_size"] for e in result["prefix_curve"]] == [8, 16]
    assert result["prefix_curve"][0]["lpips_vgg"] is None  # VGG needs 16 px
    assert np.isfinite(result["prefix_curve"][0]["rfid"])
    assert [e["noise_idx"] for e in result["noisy"]] == [0, 4]
    for name in ("rfid", "psnr", "ssim", "lpips_vgg", "ssim_detailflow_compat",
                 "codebook_usage"):
        assert np.isfinite(result[name]), name
