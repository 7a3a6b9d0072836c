"""grain pipelines: batch layout over processes, epochs, resumption, evaluation padding."""

import logging
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tokenizers_jax.data import default_data_config, make_eval_iterator, make_source
from tokenizers_jax.data import make_train_iterator
from tokenizers_jax.data import sample_photos

NUM_TRAIN = 2 * len(sample_photos.TRAIN_PHOTOS)  # examples per epoch with crops_per_photo=2


@pytest.fixture
def config():
    config = default_data_config()
    config.image_size = 16
    config.crops_per_photo = 2
    config.eval_crops_per_photo = 3
    config.read_threads = 2
    return config


def _train(config, global_batch_size, process_index=0, process_count=1, seed=3):
    return make_train_iterator(
        config, global_batch_size=global_batch_size, seed=seed,
        process_index=process_index, process_count=process_count,
    )


def _take(iterator, num_batches):
    return np.stack([next(iterator)["image"] for _ in range(num_batches)])


def _rows(images):
    return [image.tobytes() for image in images.reshape(-1, *images.shape[-3:])]


def test_train_batches_have_the_local_shape_and_depend_on_the_seed(config):
    batch = next(_train(config, global_batch_size=4, process_count=2))
    assert set(batch) == {"image"}
    assert batch["image"].shape == (2, 16, 16, 3) and batch["image"].dtype == np.uint8
    first = _take(_train(config, 4), 3)
    np.testing.assert_array_equal(first, _take(_train(config, 4), 3))
    assert not np.array_equal(first, _take(_train(config, 4, seed=4), 3))


def test_every_epoch_is_a_fresh_permutation(config):
    epochs = _take(_train(config, global_batch_size=7), 4).reshape(2, NUM_TRAIN, 16, 16, 3)
    assert len(set(_rows(epochs[0]))) == NUM_TRAIN
    assert sorted(_rows(epochs[0])) == sorted(_rows(epochs[1]))
    assert _rows(epochs[0]) != _rows(epochs[1])


def test_processes_get_disjoint_slices_of_the_same_global_batches(config):
    single = _take(_train(config, global_batch_size=NUM_TRAIN), 1)[0]
    halves = [_take(_train(config, NUM_TRAIN, p, 2), 1)[0] for p in range(2)]
    assert not set(_rows(halves[0])) & set(_rows(halves[1]))
    np.testing.assert_array_equal(np.concatenate(halves), single)


def test_indivisible_global_batch_is_an_error(config):
    with pytest.raises(ValueError, match="global batch size 5 does not divide evenly over 2"):
        _train(config, global_batch_size=5, process_count=2)


def test_restored_state_resumes_exactly(config):
    uninterrupted = _train(config, global_batch_size=3)
    _take(uninterrupted, 5)
    state = uninterrupted.get_state()
    expected = _take(uninterrupted, 4)
    resumed = _train(config, global_batch_size=3)
    resumed.set_state(state)
    np.testing.assert_array_equal(_take(resumed, 4), expected)


def test_orbax_composite_checkpoint_resumes_exactly(config, tmp_path):
    train_iter = _train(config, global_batch_size=3)
    _take(train_iter, 2)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(7, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": np.array(7)}),
            data_iterator=grain.checkpoint.CheckpointSave(train_iter),
        ))
        manager.wait_until_finished()
    expected = _take(train_iter, 3)

    resumed = _train(config, global_batch_size=3)
    with ocp.CheckpointManager(tmp_path) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"step": np.array(0)}),
            data_iterator=grain.checkpoint.CheckpointRestore(resumed),
        ))
    assert restored["state"]["step"] == 7 and restored["data_iterator"] is resumed
    np.testing.assert_array_equal(_take(resumed, 3), expected)


def test_eval_is_ordered_deterministic_and_padded(config):
    num_examples = 3 * len(sample_photos.EVAL_PHOTOS)  # 6
    batches = list(make_eval_iterator(config, global_batch_size=4, process_count=1))
    assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True, True, False, False]]
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (8, 16, 16, 3) and not images[num_examples:].any()
    again = np.concatenate([b["image"] for b in make_eval_iterator(config, global_batch_size=4)])
    np.testing.assert_array_equal(images, again)

    per_process = [list(make_eval_iterator(config, global_batch_size=4, process_index=p,
                                           process_count=2)) for p in range(2)]
    assert [len(batches) for batches in per_process] == [2, 2]
    interleaved = [per_process[p][j]["image"] for j in range(2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(interleaved), images)

    config.num_eval_examples = 5
    batches = list(make_eval_iterator(config, global_batch_size=4))
    assert sum(b["mask"].sum() for b in batches) == 5
    np.testing.assert_array_equal(batches[0]["image"], images[:4])


def test_image_folder_pipeline_upscales_small_images(config, tmp_path):
    Image.new("L", (5, 7), 90).save(tmp_path / "tiny.png")
    Image.new("RGBA", (40, 20), (1, 2, 3, 4)).save(tmp_path / "wide.png")
    config.name, config.path = "image_folder", str(tmp_path)
    config.holdout_every = 0  # train and evaluate on both images
    batch = next(_train(config, global_batch_size=2))["image"]
    assert batch.shape == (2, 16, 16, 3)
    evaluation = next(make_eval_iterator(config, global_batch_size=2))["image"]
    assert {tuple(image[0, 0]) for image in evaluation} == {(90, 90, 90), (1, 2, 3)}


def test_image_folder_evaluates_on_images_held_out_from_training(config, tmp_path, caplog):
    for i in range(5):
        Image.new("L", (16, 16), 10 * i).save(tmp_path / f"{i}.png")
    config.name, config.path = "image_folder", str(tmp_path)
    names = lambda split: sorted(os.path.basename(p) for p in make_source(config, split).paths)
    assert names("eval") == ["0.png"] and names("train") == ["1.png", "2.png", "3.png", "4.png"]
    config.holdout_every = 2
    assert names("eval") == ["0.png", "2.png", "4.png"] and names("train") == ["1.png", "3.png"]
    config.holdout_every = 0
    with caplog.at_level(logging.WARNING):
        assert names("eval") == names("train") == [f"{i}.png" for i in range(5)]
    assert "evaluating on the training images" in caplog.text
    config.holdout_every, config.eval_path = 2, str(tmp_path)
    assert names("train") == [f"{i}.png" for i in range(5)]  # a separate eval folder: all train
    config.holdout_every, config.eval_path = 1, ""
    with pytest.raises(ValueError, match="leaves none to train on"):
        make_source(config, "train")


def test_imagenet_pipeline_on_mock_data(config):
    config.name = "imagenet2012"
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=6):
        train = next(_train(config, global_batch_size=4, process_index=1, process_count=2))
        evaluation = list(make_eval_iterator(config, global_batch_size=4))
    assert train["image"].shape == (2, 16, 16, 3)
    assert [b["mask"].sum() for b in evaluation] == [4, 2]


def test_unknown_source_is_an_error(config):
    config.name = "laion"
    with pytest.raises(ValueError, match="unknown data.name 'laion'"):
        _train(config, global_batch_size=2)


def test_worker_processes_give_the_same_batches_and_state(config):
    expected_iter = _train(config, global_batch_size=3)
    expected = _take(expected_iter, 4)
    config.worker_count = 1
    with_workers = _train(config, global_batch_size=3)
    try:
        np.testing.assert_array_equal(_take(with_workers, 4), expected)
        assert with_workers.get_state() is not None
    finally:
        with_workers.close()
