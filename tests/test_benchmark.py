"""The benchmark CLI: FlowMo throughput, the DetailFlow AR samplers, the side-by-side comparison
with PyTorch, compile times and FLOP counts."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers_jax import benchmark, benchmark_torch, timing
from tokenizers_jax.config_file import load_config

from conftest import small_flowmo_config
from training_worker import micro_flowmo_config


def test_flowmo_benchmark_reports_throughput_and_evaluations():
    config = small_flowmo_config()
    config.sampler.steps = 25  # the default schedule and interval: 31 evaluations
    result = benchmark.run("flowmo", config, batch_size=2, iterations=1)
    assert result["decoder_evaluations_per_reconstruction"] == 31
    assert result["encode_images_per_second"] > 0 and result["reconstruct_images_per_second"] > 0
    assert result["compile_seconds"]["reconstruct"] > 0
    assert result["parameters"] > 0 and result["peak_host_rss_bytes"] > 0
    assert result["reconstruct_flops"] > 0 and result["reconstruct_mfu"] is None  # CPU
    json.dumps(result, default=str)


def test_cli_usage_errors():
    run = subprocess.run([sys.executable, "-m", "tokenizers_jax.benchmark", "vqgan",
                          "--config=configs/flowmo.py:tiny"], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.splitlines()[0].startswith("error: usage: python -m tokenizers_jax.benchmark")


@pytest.mark.slow
def test_detailflow_ar_benchmark_times_both_samplers():
    config = load_config("configs/detailflow_ar.py:tiny")
    config.unlock()
    config.model.depth = 1
    result = benchmark.run("detailflow_ar", config, batch_size=2, iterations=1)
    assert result["forward_passes_per_image"] == 7  # 4 single tokens, then 3 groups of 4
    assert result["positions_computed_per_image"] == {"cached": 16,
                                                      "full_recompute": 1 + 2 + 3 + 4 + 8 + 12 + 16}
    assert result["same_tokens"]
    for path in ("cached", "full_recompute"):
        assert result[path]["images_per_second"] > 0
        assert result[path]["tokens_per_second"] == pytest.approx(
            16 * result[path]["images_per_second"])
        assert result[path]["host_cpu_seconds_per_image"] > 0
    assert result["cpu_time_ratio"] == pytest.approx(
        result["full_recompute"]["host_cpu_seconds_per_image"]
        / result["cached"]["host_cpu_seconds_per_image"])
    assert result["speedup"] == pytest.approx(result["cached"]["images_per_second"]
                                              / result["full_recompute"]["images_per_second"])
    json.dumps(result, default=str)


def test_compare_torch_reconstruct_runs_both_sides_on_the_same_function():
    config = small_flowmo_config()  # 16 px, one block per trunk, 4 sampler steps
    result = benchmark_torch.run("flowmo", config, batch_size=2, rounds=2)
    assert result["threads"] == result["torch_threads"] >= 1
    r = result["workloads"]["reconstruct"]
    assert r["output_difference"] < 1e-4  # same weights, images and noise on both sides
    assert len(r["ours_seconds_per_call_rounds"]) == len(r["torch_seconds_per_call_rounds"]) == 2
    ours, theirs = (np.median(r[f"{side}_seconds_per_call_rounds"]) for side in ("ours", "torch"))
    assert r["ratio"] == pytest.approx(theirs / ours)
    assert r["ours_images_per_second"] == pytest.approx(2 / ours)
    assert r["ours_compile_seconds"] > 0 and r["flops_per_call"] > 0 and r["ours_mfu"] is None
    json.dumps(result)


def test_compare_torch_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="no PyTorch side for 'compile'"):
        benchmark_torch.run("compile", small_flowmo_config())
    config = small_flowmo_config()
    config.model.dtype = "bfloat16"
    with pytest.raises(ValueError, match="model.dtype='bfloat16'"):
        benchmark_torch.flowmo_reconstruct(config, 1)


@pytest.mark.slow
def test_compare_torch_train_step_and_detailflow():
    config = micro_flowmo_config(batch_size=2)
    config.train.update(grad_accum_steps=1, loss_groups=1)
    train = benchmark_torch.run("train", config, rounds=1)["workloads"]["train_step"]
    assert train["ratio"] > 0 and train["flops_per_call"] > 0
    detailflow = benchmark_torch.run("detailflow", load_config("configs/detailflow.py:tiny"),
                                     batch_size=2, rounds=1)["workloads"]
    assert detailflow["encode"]["output_difference"] == 0.0  # the same indices
    assert detailflow["decode"]["output_difference"] < 1e-4


@pytest.mark.slow
def test_compile_benchmark_compiles_abstract_train_step_and_reconstruction():
    config = micro_flowmo_config(batch_size=4)
    config.model.scan_layers = True
    result = benchmark.run("compile", config, batch_size=2)
    assert result["scan_layers"] is True
    assert result["train_step"]["compile_seconds"] > 0 and result["reconstruct"]["compile_seconds"] > 0


def test_matmul_flops_count_every_scan_iteration_and_mfu_needs_a_known_peak():
    def ten_products(a, b):
        return jax.lax.scan(lambda c, _: (c @ b, None), a, None, length=10)[0]

    x = jax.ShapeDtypeStruct((4, 6), jnp.float32)
    w = jax.ShapeDtypeStruct((6, 6), jnp.float32)
    assert timing.matmul_flops(ten_products, x, w) == 10 * 2 * 4 * 6 * 6
    assert timing.peak_flops_per_second() is None  # CPU: no MFU
    assert timing.PEAK_BF16_FLOPS["TPU v4"] == 275e12


def test_compare_torch_generator_samples_on_both_sides():
    config = load_config("configs/detailflow_ar.py:tiny")
    config.unlock()
    config.model.depth = 1
    result = benchmark_torch.run("detailflow_ar", config, batch_size=2, rounds=2)
    r = result["workloads"]["generate"]
    assert len(r["ours_seconds_per_call_rounds"]) == len(r["torch_seconds_per_call_rounds"]) == 2
    assert r["ratio"] == pytest.approx(np.median(r["torch_seconds_per_call_rounds"])
                                       / np.median(r["ours_seconds_per_call_rounds"]))
    assert r["flops_per_call"] > 0 and r["output_difference"] is None


def test_torch_reference_generation_draws_valid_tokens_from_the_filtered_logits():
    torch = pytest.importorskip("torch")
    from tokenizers_jax.convert import detailflow_gpt as convert_gpt
    from tokenizers_jax.models import gpt
    from tokenizers_jax.torch_reference.detailflow_gpt import TorchGPT

    config = load_config("configs/detailflow_ar.py:tiny")
    m = config.model
    params = gpt.init_params(config, jax.random.PRNGKey(0))
    # The output layer is zero-initialised (all logits tie); give it random weights.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(jax.random.PRNGKey(1), x.shape)
        if "output" in jax.tree_util.keystr(path) else x, params)
    reference = TorchGPT(convert_gpt.params_to_state_dict(params, config),
                         num_tokens=m.num_tokens, group_size=m.group_size,
                         causal_num=m.causal_num, num_heads=m.num_heads,
                         num_classes=m.num_classes)
    torch.manual_seed(0)
    tokens = reference.generate([0, 1, 2], cfg=1.5, top_k=1).numpy()
    assert tokens.shape == (3, m.num_tokens)
    # top_k = 1 is greedy: each token is the argmax of the guided logits given its prefix.
    logits = reference.guided_generation_logits([0, 1, 2], tokens, cfg=1.5).numpy()
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
