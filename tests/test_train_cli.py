"""`python -m tokenizers_jax.train`: flag errors, Ctrl-C, and the README quickstart (slow)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tokenizers_jax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, *overrides, config="configs/flowmo.py:tiny"):
    return [sys.executable, "-m", "tokenizers_jax.train", f"--config={config}",
            f"--workdir={workdir}", *overrides]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    env.pop("TOKENIZERS_JAX_VERBOSE", None)
    return env


def _train(workdir, *overrides, timeout=900):
    return subprocess.run(_command(workdir, *overrides), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_a_typo_in_an_override_is_one_line_and_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    result = _train(workdir, "--config.optim.lrr=1e-3")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --config.optim.lrr=1e-3: the config has no field 'optim.lrr'. "
        'Did you mean "lr" instead of "lrr"?',
        "(python -m tokenizers_jax.train --helpshort lists the flags)"]
    assert not os.path.exists(workdir)


def test_ctrl_c_saves_a_checkpoint_and_exits_75(tmp_path):
    """The first SIGINT saves at the next step boundary; the run exits with EX_TEMPFAIL."""
    process = subprocess.Popen(
        _command(tmp_path, "--config.train.num_steps=100000", "--config.eval.every=0",
                 "--config.checkpoint.every=100000", config="tests/toy_config_file.py"),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.time() < deadline, "the run never started stepping"
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-4000:]
    assert "Traceback" not in output
    stopped = [line for line in output.splitlines() if "stopped by SIGINT at step" in line]
    assert len(stopped) == 1, output[-4000:]
    step = int(stopped[0].split("stopped by SIGINT at step ")[1].split()[0])
    assert checkpoint.latest_step(str(tmp_path)) == step >= 3


@pytest.mark.slow
def test_tiny_quickstart_improves_held_out_psnr(tmp_path):
    result = _train(tmp_path, "--config.train.num_steps=100", "--config.eval.every=100")
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tmp_path / "metrics.jsonl") as f:
        psnr = {row["step"]: row["eval/psnr"] for row in map(json.loads, f) if "eval/psnr" in row}
    assert psnr[100] > psnr[0] + 1.0, psnr
    assert os.path.isfile(tmp_path / "images" / "reconstruction_00000100.png")
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 100
