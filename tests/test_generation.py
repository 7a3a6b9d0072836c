"""Chunked, resumable sampling (`tokenizers_jax.generation`) with a stand-in generator."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tokenizers_jax import adm_npz, api, generation

import generation_fixtures as fixtures

NUM_SAMPLES = 7
CLASSES = [2, 0, 1]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return fixtures.random_token_generator(tmp_path_factory.mktemp("detailflow"))


@pytest.fixture(scope="module")
def reference_run(generator, tmp_path_factory):
    """An uninterrupted run: batches of 3 (3 + 3 + 1 padded to 3)."""
    output = str(tmp_path_factory.mktemp("samples"))
    path = generation.generate_samples(generator, output, NUM_SAMPLES, CLASSES, seed=5,
                                       batch_size=3, progress=False)
    with np.load(path) as samples:
        return output, samples["arr_0"], samples["arr_1"]


def test_class_labels_cycle_through_the_classes():
    np.testing.assert_array_equal(generation.class_labels(7, [2, 0, 1]), [2, 0, 1, 2, 0, 1, 2])
    labels = generation.class_labels(50_000, range(1000))
    assert np.all(np.bincount(labels) == 50)
    assert all(len(set(labels[i:i + 5000])) == 1000 for i in range(0, 50_000, 5000))


def test_samples_npz_grid_and_settings(generator, reference_run):
    output, images, labels = reference_run
    assert sorted(os.listdir(output)) == ["grid.png", "samples.npz", "settings.json"]
    assert images.dtype == np.uint8 and images.shape == (NUM_SAMPLES, 32, 32, 3)
    np.testing.assert_array_equal(labels, [2, 0, 1, 2, 0, 1, 2])
    assert adm_npz.array_shape(os.path.join(output, "samples.npz")) == (images.shape, np.uint8)
    # Samples 3..5 are those of the generator called for them (keys by sample index).
    direct = generator.generate_images(labels[3:6], seed=5, first_index=3)
    np.testing.assert_array_equal(images[3:6], api.to_uint8(direct))
    assert not np.array_equal(images[0], images[3])  # same class, different keys
    grid = np.asarray(Image.open(os.path.join(output, "grid.png")))
    assert grid.shape == (2 * 32, 3 * 32, 3)  # a column per class, two whole rows
    np.testing.assert_array_equal(grid[32:, 64:], images[5])
    with open(os.path.join(output, "settings.json")) as f:
        settings = json.load(f)
    assert settings["classes"] == CLASSES and settings["seed"] == 5
    assert settings["generator"]["params"] == generation.params_fingerprint(generator.params)


def test_interrupted_run_resumes_without_duplicates(generator, reference_run, tmp_path,
                                                    monkeypatch):
    output = str(tmp_path / "samples")
    calls = []
    original = generator.generate_images

    def interrupted(labels, seed, first_index, **sampling):
        calls.append(first_index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(labels, seed=seed, first_index=first_index, **sampling)

    monkeypatch.setattr(generator, "generate_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generation.generate_samples(generator, output, NUM_SAMPLES, CLASSES, seed=5,
                                    batch_size=2, progress=False)
    chunk_dir = os.path.join(output, "chunks")
    assert sorted(os.listdir(chunk_dir)) == ["chunk_00000000_00000002.npz",
                                             "chunk_00000002_00000004.npz"]
    open(os.path.join(chunk_dir, "chunk_00000004_00000006.npz.tmp"), "w").close()  # cut short

    # Resumed with the batch size of the reference run: only samples 4..6 are generated, in
    # one call, and every sample equals the reference run's (batches 0-2, 3-5, 6 there).
    calls.clear()
    path = generation.generate_samples(generator, output, NUM_SAMPLES, CLASSES, seed=5,
                                       batch_size=3, progress=False)
    assert calls == [4]
    with np.load(path) as samples:
        np.testing.assert_array_equal(samples["arr_0"], reference_run[1])
        np.testing.assert_array_equal(samples["arr_1"], reference_run[2])
    assert not os.path.exists(chunk_dir)

    calls.clear()  # a finished run does nothing
    assert generation.generate_samples(generator, output, NUM_SAMPLES, CLASSES, seed=5,
                                       progress=False) == path
    assert calls == []


def test_other_settings_and_bad_classes_are_refused(generator, reference_run, tmp_path):
    output = reference_run[0]
    with pytest.raises(ValueError, match=r"other settings \(they differ in seed\)"):
        generation.generate_samples(generator, output, NUM_SAMPLES, CLASSES, seed=6)
    with pytest.raises(ValueError, match="differ in num_samples, sampling.temperature"):
        generation.generate_samples(generator, output, 8, CLASSES, seed=5,
                                    sampling=dict(temperature=0.5))
    other = fixtures.RandomTokenGenerator(generator.config,
                                          fixtures.generator_params(generator.config, seed=1),
                                          generator.tokenizer)
    with pytest.raises(ValueError, match=r"differ in generator\.params\)"):
        generation.generate_samples(other, output, NUM_SAMPLES, CLASSES, seed=5)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 4\), got values in "
                                         r"\[0, 9\]"):
        generation.generate_samples(generator, str(tmp_path / "new"), 4, [0, 9])
    assert not os.path.exists(tmp_path / "new")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no settings.json"):
        generation.generate_samples(generator, str(tmp_path / "busy"), 4, [0])


def test_settings_protect_only_existing_samples(generator, tmp_path):
    output = str(tmp_path / "out")
    generation.check_settings(output, {"seed": 1})
    generation.check_settings(output, {"seed": 2})  # nothing generated yet: replaced
    with open(os.path.join(output, "settings.json")) as f:
        assert json.load(f) == {"seed": 2}
    os.makedirs(os.path.join(output, "chunks"))
    open(os.path.join(output, "chunks", "chunk_00000000_00000002.npz"), "w").close()
    with pytest.raises(ValueError, match=r"differ in seed\)"):
        generation.check_settings(output, {"seed": 3})
    with pytest.raises(ValueError, match=r"unknown sampling settings \['cfgg'\] for random_tokens; "
                                         r"its sampler has \['cfg', 'temperature'\]"):
        generation.generate_samples(generator, str(tmp_path / "typo"), 4, [0],
                                    sampling=dict(cfgg=1.5))
    assert not os.path.exists(tmp_path / "typo")
