"""The benchmark CLI's FlowMo and DetailFlow AR measurements."""

import json
import subprocess
import sys

import pytest

from tokenizers_jax import benchmark
from tokenizers_jax.config_file import load_config

from conftest import small_flowmo_config


def test_flowmo_benchmark_reports_throughput_and_evaluations():
    config = small_flowmo_config()
    config.sampler.steps = 25  # the default schedule and interval: 31 evaluations
    result = benchmark.run("flowmo", config, batch_size=2, iterations=1)
    assert result["decoder_evaluations_per_reconstruction"] == 31
    assert result["encode_images_per_second"] > 0 and result["reconstruct_images_per_second"] > 0
    assert result["compile_seconds"]["reconstruct"] > 0
    assert result["parameters"] > 0 and result["peak_host_rss_bytes"] > 0
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
