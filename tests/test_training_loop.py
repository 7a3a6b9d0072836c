"""The generic loop on a toy task: checkpoints, exact resume, NaN stop, accumulation, errors,
workdir identity, save failures, Ctrl-C."""

import errno
import json
import os
import shutil
import signal
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from etils import epath

from conftest import small_flowmo_config
from tokenizers_jax.training import checkpoint, loop
from tokenizers_jax.training import workdir as workdir_lib
from training_toy import toy_config


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def test_run_writes_checkpoints_and_resume_repeats_the_same_losses(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    summary = loop.train_and_evaluate(toy_config(num_steps=6), straight)
    assert summary["step"] == 6 and summary["stopped"] == "done"
    assert checkpoint.latest_step(straight) == 6
    assert os.path.isfile(os.path.join(straight, "images", "reconstruction_00000006.png"))
    assert os.listdir(os.path.join(straight, "tensorboard"))

    loop.train_and_evaluate(toy_config(num_steps=3), resumed)  # "killed" after step 3
    assert checkpoint.latest_step(resumed) == 3
    loop.train_and_evaluate(toy_config(num_steps=6), resumed)  # restarted
    expected, actual = _losses(straight), _losses(resumed)
    assert sorted(actual) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # same params, optimizer state and data after the restart
        assert actual[step] == expected[step]

    config, ema = checkpoint.load_for_inference(resumed)
    assert config.train.num_steps == 6
    assert jax.tree.structure(ema) == jax.tree.structure(
        {"decoder": {"double_blocks_0": {"bias": 0, "kernel": 0}}, "encoder": {"kernel": 0}})


def test_incomplete_checkpoint_is_never_restored(tmp_path):
    workdir = str(tmp_path)
    loop.train_and_evaluate(toy_config(num_steps=3), workdir)
    # An interrupted save: orbax's temporary directory for a later step.
    os.makedirs(os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp-1234", "params"))
    assert checkpoint.latest_step(workdir) == 3
    summary = loop.train_and_evaluate(toy_config(num_steps=4), workdir)
    assert summary["step"] == 4


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    loop.train_and_evaluate(toy_config(num_steps=3), workdir)
    from training_toy import ToyTask

    healthy_loss = ToyTask.loss
    monkeypatch.setattr(ToyTask, "loss", lambda self, *args: jax.tree.map(
        lambda x: x * np.nan, healthy_loss(self, *args)))
    config = toy_config(num_steps=6)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* step 4.*step 3\) is intact"):
        loop.train_and_evaluate(config, workdir)
    assert checkpoint.latest_step(workdir) == 3
    _, ema = checkpoint.load_for_inference(workdir)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(ema))


def test_indivisible_global_batch_is_a_startup_error(tmp_path):
    with pytest.raises(ValueError, match="does not divide over 2 gradient-accumulation"):
        loop.train_and_evaluate(toy_config(batch_size=7, grad_accum_steps=2), str(tmp_path))
    with pytest.raises(ValueError, match="not divisible by train.loss_groups=3"):
        loop.train_and_evaluate(toy_config(batch_size=8, loss_groups=3), str(tmp_path))


def _one_step(config, batch):
    fresh = loop.fresh_step(config, batch)
    return fresh.step(fresh.state, fresh.constants, fresh.batch)


def test_gradient_accumulation_equals_the_full_batch_step():
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), np.uint8)}
    results = {}
    for accum, groups in [(1, 1), (2, 1), (4, 1), (1, 2)]:
        config = toy_config(grad_accum_steps=accum, loss_groups=groups)
        config.toy_noise = 0.0
        config.optim.eps = 1.0  # Adam's first step becomes ~ lr * grad: compares gradients
        results[accum, groups] = _one_step(config, batch)
    full_state, full_metrics = results[1, 1]
    for key, (state, metrics) in results.items():
        np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5,
                                   err_msg=key)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(full_state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=str(key))


def test_train_step_freezes_encoder_fixes_norms_and_updates_ema():
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), np.uint8)}
    config = toy_config()
    config.optim.freeze_after = 0
    config.train.update(ema_decay=0.5, ema_every=1)
    fresh = loop.fresh_step(config, batch)
    initial = jax.device_get(fresh.state.params)
    state, _ = fresh.step(fresh.state, fresh.constants, fresh.batch)
    params = jax.device_get(state.params)
    np.testing.assert_array_equal(params["encoder"]["kernel"], initial["encoder"]["kernel"])
    block, block0 = params["decoder"]["double_blocks_0"], initial["decoder"]["double_blocks_0"]
    assert not np.allclose(block["kernel"], block0["kernel"])
    np.testing.assert_allclose(np.linalg.norm(block["kernel"]), np.linalg.norm(block0["kernel"]),
                               rtol=1e-5)
    assert not np.allclose(block["bias"], block0["bias"])  # biases are not renormalised
    ema = jax.device_get(state.ema_params)["decoder"]["double_blocks_0"]["bias"]
    np.testing.assert_allclose(ema, 0.5 * block0["bias"] + 0.5 * block["bias"], rtol=1e-5,
                               atol=1e-7)


def test_train_benchmark_reports_throughput_and_compile_time():
    from tokenizers_jax import benchmark_train

    result = benchmark_train.run(toy_config(), iterations=2)
    assert result["images_per_second"] > 0 and result["compile_seconds"] > 0
    assert result["global_batch_size"] == 8 and np.isfinite(result["loss"])
    assert result["flops_per_step"] > 0 and result["mfu"] is None  # no MFU on CPU


def test_encoder_freeze_survives_a_restart(tmp_path):
    workdir = str(tmp_path)
    config = toy_config(num_steps=3)
    config.optim.freeze_after = 2  # updates 0 and 1 train the encoder; 2, 3, ... do not
    loop.train_and_evaluate(config, workdir)
    config.train.num_steps = 6
    loop.train_and_evaluate(config, workdir)  # resumed at 3

    from training_toy import ToyTask

    abstract = nn.unbox(jax.eval_shape(ToyTask(config).init_params, jax.random.PRNGKey(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
    at_3, at_6 = (checkpoint.restore_params(workdir, abstract, shardings, step=step)
                  for step in (3, 6))
    np.testing.assert_array_equal(at_6["encoder"]["kernel"], at_3["encoder"]["kernel"])
    assert not np.allclose(at_6["decoder"]["double_blocks_0"]["bias"],
                           at_3["decoder"]["double_blocks_0"]["bias"])


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_refuses_a_changed_config_and_replayed_steps_are_logged_once(tmp_path):
    workdir = str(tmp_path)
    loop.train_and_evaluate(toy_config(num_steps=5), workdir)  # checkpoints at 3 and 5
    # Killed before the step-5 checkpoint was complete: a restart replays steps 4 and 5.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "5"))
    stored = {name: open(os.path.join(workdir, name)).read()
              for name in ("config.json", "metrics.jsonl")}

    changed = toy_config(num_steps=6)
    changed.data.image_size = 16  # the model's input: the checkpoint would not fit
    changed.sampler.schedule = "linear"  # not a shape, but how the workdir's model decodes
    with pytest.raises(workdir_lib.WorkdirMismatchError) as error:
        loop.train_and_evaluate(changed, workdir)
    assert str(error.value).splitlines()[0] == (
        f"{workdir} holds a run made with a different config: data.image_size 8 -> 16, "
        "sampler.schedule 'pow_0.25' -> 'linear'.")
    assert "--config.init_from=" in str(error.value) and "train.num_steps" in str(error.value)
    for name, text in stored.items():  # nothing was written
        assert open(os.path.join(workdir, name)).read() == text, name
    assert checkpoint.latest_step(workdir) == 3

    resumed = toy_config(num_steps=6)  # longer, logged and evaluated differently: allowed
    resumed.logging.every = 2
    resumed.eval.every = 2
    summary = loop.train_and_evaluate(resumed, workdir)
    assert summary["step"] == 6
    assert checkpoint.load_config(workdir).train.num_steps == 6
    keys = [(row["step"], key) for row in _rows(workdir) for key in row if key != "step"]
    assert len(keys) == len(set(keys)), sorted(keys)
    assert sorted(s for s, key in keys if key == "train/loss") == [1, 2, 3, 4, 6]


@pytest.mark.parametrize("change,message", [
    (dict(model_name="vqgan"), "no training task for model 'vqgan'"),
    (dict(batch_size=7, grad_accum_steps=2), "does not divide over 2 gradient-accumulation"),
    (dict(model_name="flowmo", schedule="cosine"), "unknown sampler schedule 'cosine'"),
])
def test_an_invalid_run_creates_nothing(tmp_path, change, message):
    config = toy_config(**{k: v for k, v in change.items() if k in ("batch_size",
                                                                    "grad_accum_steps")})
    if "model_name" in change:
        config.model.name = change["model_name"]
    if "schedule" in change:
        config = small_flowmo_config()
        config.sampler.schedule = change["schedule"]
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_config_json_is_replaced_atomically(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    workdir_lib.save_config(workdir, toy_config(num_steps=3))
    before = open(os.path.join(workdir, "config.json")).read()

    def crash(*args):
        raise OSError("killed mid-write")

    monkeypatch.setattr(workdir_lib.os, "replace", crash)
    with pytest.raises(OSError, match="killed mid-write"):
        workdir_lib.save_config(workdir, toy_config(num_steps=9))
    assert open(os.path.join(workdir, "config.json")).read() == before
    assert os.listdir(workdir) == ["config.json"]


def _no_temporary_dirs(workdir):
    return not [name for name in os.listdir(os.path.join(workdir, "checkpoints"))
                if "orbax-checkpoint-tmp" in name]


def test_a_failed_async_save_stops_the_run_at_once_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch):
    workdir = str(tmp_path)
    write_text = epath.Path.write_text

    def disk_full_at_step_40(path, *args, **kwargs):
        if "/40.orbax-checkpoint-tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(epath.Path, "write_text", disk_full_at_step_40)
    config = toy_config(num_steps=400)
    config.checkpoint.update(every=20, async_save=True)
    config.eval.every = 0
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
        loop.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert message.startswith(f"saving the checkpoint of step 40 in {workdir}/checkpoints "
                              "failed: [Errno 28] No space left on device")
    assert "the last complete checkpoint (step 20) is intact" in message
    assert max(row["step"] for row in _rows(workdir)) < 60  # before the next save, not at it
    assert checkpoint.latest_step(workdir) == 20 and _no_temporary_dirs(workdir)
    checkpoint.load_for_inference(workdir)


def test_a_save_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=r"step 3 .* not enough free disk space: the checkpoint needs about "
                             r"[\d.]+ KiB, 1000 B are free\. Training stopped; there is no "
                             "complete checkpoint yet"):
        loop.train_and_evaluate(toy_config(num_steps=6), workdir)
    assert checkpoint.latest_step(workdir) is None and _no_temporary_dirs(workdir)


def test_first_ctrl_c_asks_for_a_checkpoint_and_the_second_aborts():
    previous = signal.getsignal(signal.SIGINT)
    watcher = checkpoint.PreemptionWatcher()
    try:
        assert not watcher.reached(1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert watcher.reached(2) and watcher.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGINT) is previous
