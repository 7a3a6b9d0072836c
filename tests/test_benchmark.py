"""The benchmark CLI's FlowMo measurement."""

import json
import subprocess
import sys

from tokenizers_jax import benchmark

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
