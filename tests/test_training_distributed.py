"""Training across devices and processes, and preemption (each case runs in subprocesses)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tokenizers_jax.training import checkpoint
from training_toy import PIXELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "training_worker.py")


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    env.pop("XLA_FLAGS", None)
    return env


def _worker(*args, **kwargs):
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.parametrize("model", ["toy", "toy_gan",
                                   pytest.param("flowmo", marks=pytest.mark.slow),
                                   pytest.param("detailflow", marks=pytest.mark.slow)])
def test_eight_devices_give_the_same_step_as_one(tmp_path, model):
    results = {}
    for devices in (1, 8):
        workdir = tmp_path / str(devices)
        workdir.mkdir()
        _finish(_worker("step", workdir, devices, model))
        results[devices] = json.loads((workdir / "result.json").read_text())
    one, eight = results[1], results[8]
    assert eight["devices"] == 8 and "fsdp" in eight["kernel_sharding"], eight["kernel_sharding"]
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(eight["grad_norm"], one["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(eight["kernel"], one["kernel"], atol=1e-6)
    partners_8, partners_1 = jax.tree.leaves(eight["partners"]), jax.tree.leaves(one["partners"])
    if model == "detailflow":  # the discriminator heads, their BatchNorm / spectral state,
        # the LeCam EMAs and the codebook window: all equal
        assert len(partners_8) == len(partners_1) > 50
        for a, b in zip(partners_8, partners_1):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(eight["discriminator_loss"], one["discriminator_loss"],
                                   rtol=1e-5)
        return
    assert len(partners_8) == len(partners_1) == (PIXELS + 1 if model == "toy_gan" else 0)
    np.testing.assert_allclose(partners_8, partners_1, atol=1e-6)


def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(tmp_path):
    process = _worker("sigterm", tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.time() < deadline, "the run never started stepping"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output = _finish(process)
    stopped_at = int(output.split("SUMMARY preempted ")[1].split()[0])
    assert checkpoint.latest_step(str(tmp_path)) == stopped_at >= 2
    _, ema = checkpoint.load_for_inference(str(tmp_path))
    assert ema["encoder"]["kernel"].shape == (192, 16)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_checkpoint(tmp_path):
    port = _free_port()
    processes = [_worker("multiprocess", tmp_path, port, i) for i in range(2)]
    outputs = [_finish(p) for p in processes]
    losses = [out.split("SUMMARY done 4 ")[1].split()[0] for out in outputs]
    assert losses[0] == losses[1]
    assert checkpoint.latest_step(str(tmp_path)) == 4
    data_dir = tmp_path / "checkpoints" / "4" / "data"
    assert sorted(os.listdir(data_dir)) == ["commit_success.txt", "process_0-of-2.json",
                                             "process_1-of-2.json"]
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"train/loss"' in r]) == 4  # process 0 only
