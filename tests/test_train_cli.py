"""`python -m tokenizers_jax.train`: flag errors, and the README quickstart (slow)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *overrides, timeout=900):
    command = [sys.executable, "-m", "tokenizers_jax.train", "--config=configs/flowmo.py:tiny",
               f"--workdir={workdir}", *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_typo_in_an_override_names_the_field(tmp_path):
    result = _train(tmp_path, "--config.optim.lrr=1e-3")
    assert result.returncode != 0
    assert "lrr" in result.stderr
    assert not os.path.exists(tmp_path / "config.json")


@pytest.mark.slow
def test_tiny_quickstart_improves_held_out_psnr(tmp_path):
    result = _train(tmp_path, "--config.train.num_steps=100", "--config.eval.every=100")
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tmp_path / "metrics.jsonl") as f:
        psnr = {row["step"]: row["eval/psnr"] for row in map(json.loads, f) if "eval/psnr" in row}
    assert psnr[100] > psnr[0] + 1.0, psnr
    assert os.path.isfile(tmp_path / "images" / "reconstruction_00000100.png")
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 100
