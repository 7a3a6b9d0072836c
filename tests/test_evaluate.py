"""The evaluation job on the built-in photos: a random-init FlowMo, random Inception/LPIPS."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import small_flowmo_config
from tokenizers_jax import api, data, evaluation, exported, metrics
from tokenizers_jax.models import flowmo
from tokenizers_jax.training import checkpoint
from tokenizers_jax.training.state import state_from_params

NUM_EXAMPLES = 7  # not a multiple of the batch: 3 padding rows
BATCH_SIZE = 5


def eval_config(allow_random_init_networks=True):
    config = small_flowmo_config()
    config.data.image_size = config.model.image_size
    config.data.num_eval_examples = NUM_EXAMPLES
    config.eval.update(batch_size=BATCH_SIZE, grid_size=4,
                       allow_random_init_networks=allow_random_init_networks)
    return config


@pytest.fixture(scope="module")
def evaluator():
    return evaluation.Evaluator(eval_config())


@pytest.fixture(scope="module")
def params(evaluator):
    return flowmo.init_params(flowmo.build_model(evaluator.config), jax.random.key(0))


def tensorboard_tags(directory):
    """Every summary tag in the event files of `directory` (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            offset += 12 + length + 4
    return tags


def test_missing_checkpoint_or_unsupported_model_fail_before_any_work(tmp_path):
    config = eval_config()
    with pytest.raises(FileNotFoundError, match=r"^no such directory: .*missing; --checkpoint "
                                                "must be a model directory"):
        evaluation.evaluate(config, str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="is neither a model directory .* nor a training "
                                                "workdir .*: it has no config.json"):
        evaluation.evaluate(config, str(tmp_path), str(tmp_path / "out"))
    unknown = eval_config()
    unknown.model.name = "maskgit"
    with pytest.raises(ValueError, match="evaluation is not supported yet for maskgit; "
                                         "supported models: detailflow, flowmo"):
        evaluation.evaluate(unknown, str(tmp_path), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_missing_network_weights_fail_at_start(tmp_path):
    config = eval_config(allow_random_init_networks=False)
    config.eval.inception_path = str(tmp_path / "no_inception")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        evaluation.Evaluator(config)


def test_evaluate_model_dir(evaluator, params, tmp_path):
    config = evaluator.config
    model_dir, output_dir = str(tmp_path / "model"), str(tmp_path / "eval")
    exported.save_model_dir(model_dir, config, params)

    result = evaluator.run(model_dir, output_dir)

    with open(os.path.join(output_dir, "metrics_model.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["random_init_networks"] is True and result["step"] is None
    # Random-init networks are marked in every output, not only in the JSON.
    assert result["notes"][0].startswith("RANDOM-INIT Inception and LPIPS networks")
    assert os.listdir(os.path.join(output_dir, "images")) == [
        "reconstructions_RANDOM_INIT_00000000.png"]
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        (row,) = [json.loads(line) for line in f]
    assert {"eval/rfid_RANDOM_INIT", "eval/lpips_vgg_RANDOM_INIT", "eval/psnr"} <= set(row)
    assert not {"eval/rfid", "eval/lpips_vgg"} & set(row)
    tags = tensorboard_tags(os.path.join(output_dir, "tensorboard"))
    assert {"eval/rfid_RANDOM_INIT", "reconstructions_RANDOM_INIT"} <= tags
    assert "eval/rfid" not in tags
    assert result["num_examples"] == NUM_EXAMPLES
    for name in ("rfid", "psnr", "psnr_flowmo_batch_compat", "ssim", "lpips_vgg",
                 "codebook_usage", "codebook_perplexity", "bits_per_pixel"):
        assert np.isfinite(result[name]), name
    bits = config.model.code_length * config.model.context_dim
    assert result["bits_per_pixel"] == bits / config.model.image_size**2

    # The same numbers through the public tokenizer, on the valid rows only.
    images = next(data.make_eval_iterator(config.data, global_batch_size=NUM_EXAMPLES))["image"]
    tokenizer = api.load_tokenizer(model_dir)
    indices = tokenizer.encode(images)
    noise = evaluation.example_noise(config.eval.seed, 0, images.shape)
    recon01 = (tokenizer.decode(indices, noise=noise) + 1) / 2
    images01 = jnp.asarray(images, jnp.float32) / 255
    np.testing.assert_allclose(result["psnr"], np.mean(metrics.psnr(images01, recon01)),
                               rtol=1e-4)
    np.testing.assert_allclose(result["ssim"], np.mean(metrics.ssim(images01, recon01)),
                               rtol=1e-4, atol=1e-5)
    # One whole group of 5; the second holds padding and is left out.
    np.testing.assert_allclose(result["psnr_flowmo_batch_compat"],
                               metrics.batch_psnr_compat(images01[:5], recon01[:5]), rtol=1e-4)
    usage = metrics.codebook_usage(indices, 2**config.model.codebook_size_for_entropy)
    np.testing.assert_allclose(result["codebook_usage"], usage.fraction_used)
    np.testing.assert_allclose(result["codebook_perplexity"], usage.perplexity, rtol=1e-5)


def save_checkpoint(workdir, config, step, params):
    state = state_from_params(params, jax.random.PRNGKey(0),
                              optax.adam(1e-3)).replace(step=jnp.int32(step))
    checkpointer = checkpoint.Checkpointer(
        workdir, ml_collections.ConfigDict(dict(keep=5, keep_every=0, async_save=False)))
    checkpointer.save(state, data.make_train_iterator(config.data, global_batch_size=2))
    checkpointer.wait_until_finished()
    checkpointer.close()


def test_continuous_evaluates_each_checkpoint_once(evaluator, params, tmp_path, monkeypatch):
    # FID's 2048 x 2048 sqrtm takes ~20 s here and is covered above; this test is about the
    # schedule.
    monkeypatch.setattr(evaluation.metrics, "frechet_distance", lambda *stats: 0.0)
    config = ml_collections.ConfigDict(evaluator.config.to_dict())
    workdir, output_dir = str(tmp_path / "train"), str(tmp_path / "eval")
    config.train.num_steps = 20
    checkpoint.save_config(workdir, config)
    save_checkpoint(workdir, config, step=10, params=params)

    def watch(max_checkpoints=0):
        return evaluation.evaluate_continuously(config, workdir, output_dir, poll_seconds=0.01,
                                                max_checkpoints=max_checkpoints,
                                                evaluator=evaluator)

    first = watch(max_checkpoints=1)
    assert [r["step"] for r in first] == [10]
    assert evaluation.read_record(output_dir) == [10]

    save_checkpoint(workdir, config, step=20, params=jax.tree.map(lambda x: -x, params))
    # A restarted job: step 10 is on record, so only 20 is evaluated; 20 is the final step.
    second = watch()
    assert [r["step"] for r in second] == [20]
    assert second[0]["psnr"] != first[0]["psnr"]
    assert evaluation.read_record(output_dir) == [10, 20]
    assert watch() == []
    assert sorted(f for f in os.listdir(output_dir) if f.startswith("metrics_")) == [
        "metrics_step_10.json", "metrics_step_20.json"]
