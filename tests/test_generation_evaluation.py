"""The generation evaluation: reference batches, metrics plumbing, RANDOM_INIT marks, CLI.

A random Inception at input size 75 (instead of 299) keeps it cheap; the network itself is
checked against PyTorch in test_perceptual, and the metrics in test_metrics. The Frechet
distances are recorded instead of computed (a 2048-d sqrtm takes minutes on a busy 2-core
CPU): the tests check the statistics they receive. The slow CLI test computes them.
"""

import json
import os

import jax
import numpy as np
import pytest

from tokenizers_jax import adm_npz, cli, data, evaluate_generation, exported, metrics
from tokenizers_jax import generation_evaluation as ge
from tokenizers_jax.config_file import load_config
from tokenizers_jax.perceptual import inception

import generation_fixtures as fixtures
from test_evaluate import tensorboard_tags
from test_metrics import brute_force_precision_recall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PHOTOS = 14  # reference images: 7 photos x 2 crops
KEEP = 5
NUM_SAMPLES = 6


def random_inception_params(seed=0):
    """He-scaled random weights for the abstract params tree (no init compile)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
        if "var" in name or "scale" in name:
            return np.ones(leaf.shape, np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

    abstract = jax.eval_shape(inception.init_inception_params, jax.random.key(0))
    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def extractor():
    return ge.InceptionExtractor(random_inception_params(), random_init=True, batch_size=8,
                                 input_size=75)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return fixtures.random_token_generator(tmp_path_factory.mktemp("detailflow"))


def photos_config():
    config = load_config(os.path.join(ROOT, "configs", "generation_reference.py:photos"))
    config.unlock()
    config.data.crops_per_photo = NUM_PHOTOS // 7
    config.reference.keep_images = KEEP
    return config


def features(extractor, images):
    return extractor([images[i:i + extractor.batch_size]
                      for i in range(0, len(images), extractor.batch_size)], len(images), "test",
                     progress=False)


@pytest.fixture(scope="module")
def frechet_calls():
    """The (mu1, sigma1, mu2, sigma2) of every Frechet distance; call n returns n."""
    calls = []

    def record(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(len(calls))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "frechet_distance", record)
        yield calls


def evaluate(generator, reference_path, output, extractor, frechet_calls):
    """-> (result, [FID statistics, sFID statistics])."""
    first_call = len(frechet_calls)
    result = ge.evaluate_generation(generator, reference_path, output, num_samples=NUM_SAMPLES,
                                    classes=[0, 1, 2], batch_size=3, extractor=extractor,
                                    is_split_size=4, progress=False)
    calls = frechet_calls[first_call:]
    assert len(calls) == 2 and (result["fid"], result["sfid"]) == (first_call + 1, first_call + 2)
    return result, calls


def assert_statistics(got, mean, cov):
    np.testing.assert_allclose(got[0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], cov, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def reference(extractor, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reference") / "new_directory" / "photos.npz")
    summary = ge.write_reference(photos_config(), path, extractor, progress=False)
    return path, summary


@pytest.fixture(scope="module")
def evaluation(generator, extractor, reference, frechet_calls, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("evaluation"))
    return (output, *evaluate(generator, reference[0], output, extractor, frechet_calls))


def test_reference_batch_from_the_data_pipeline(extractor, reference):
    path, summary = reference
    assert summary["images"] == NUM_PHOTOS and summary["kept_images"] == KEEP
    config = photos_config()
    source = data.make_source(config.data, "train")
    transform = data.get_transform("adm").eval
    images = np.stack([transform(source[i], 32) for i in range(NUM_PHOTOS)])
    expected = features(extractor, images)
    with np.load(path) as archive:
        assert sorted(archive.files) == ["arr_0", "inception_network", "mu", "mu_s", "sigma",
                                         "sigma_s"]
        assert str(archive["inception_network"]).startswith("RANDOM_INIT")
        # arr_0 keeps images spread over the split: indices 0, 2, 5, 8, 11 of 14.
        np.testing.assert_array_equal(archive["arr_0"], images[[0, 2, 5, 8, 11]])
        np.testing.assert_allclose(archive["mu"], expected.pool.mean(axis=0), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(archive["sigma"], np.cov(expected.pool, rowvar=False),
                                   rtol=1e-4, atol=1e-6)
        mean_s, cov_s = expected.spatial.mean_cov()
        assert archive["mu_s"].shape == (extractor.spatial_dim(),) == (3 * 3 * 7,)
        np.testing.assert_allclose(archive["sigma_s"], cov_s, rtol=1e-4, atol=1e-6)
    with pytest.raises(FileExistsError, match="exists; choose a new output file"):
        ge.write_reference(photos_config(), path, extractor)


def test_evaluation_metrics_outputs_and_marks(extractor, reference, evaluation):
    output, result, (fid, sfid) = evaluation
    with open(os.path.join(output, "metrics.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["random_init_inception"] is True
    assert result["inception_network"].startswith("RANDOM_INIT")
    assert result["notes"][0].startswith("RANDOM-INIT Inception")
    assert any("not identical with" in note for note in result["notes"])
    assert result["classes"] == [0, 1, 2] and result["reference_images"] == KEEP

    # The metrics from independent pieces: the samples' features and the reference file.
    with np.load(result["samples"]) as samples:
        fake = features(extractor, samples["arr_0"])
        np.testing.assert_array_equal(samples["arr_1"], [0, 1, 2, 0, 1, 2])
    with np.load(reference[0]) as archive:
        real = features(extractor, archive["arr_0"])
        stored = {k: archive[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    assert_statistics(fid[:2], fake.pool.mean(0), np.cov(fake.pool, rowvar=False))
    assert_statistics(sfid[:2], *fake.spatial.mean_cov())
    for got, name in zip(fid[2:] + sfid[2:], ("mu", "sigma", "mu_s", "sigma_s")):
        np.testing.assert_array_equal(got, stored[name])
    np.testing.assert_allclose(result["inception_score"], np.mean(
        [metrics.inception_score(fake.probs[:4]), metrics.inception_score(fake.probs[4:])]))
    _, precision, recall = brute_force_precision_recall(real.pool.astype(np.float64),
                                                        fake.pool.astype(np.float64), 3)
    assert (result["precision"], result["recall"]) == (pytest.approx(precision),
                                                       pytest.approx(recall))

    with open(os.path.join(output, "metrics.jsonl")) as f:
        (row,) = [json.loads(line) for line in f]
    assert set(row) == {"step"} | {f"generation/{m}_RANDOM_INIT" for m in ge.METRICS}
    tags = tensorboard_tags(os.path.join(output, "tensorboard"))
    assert {"generation/fid_RANDOM_INIT", "samples_RANDOM_INIT"} <= tags
    assert os.listdir(os.path.join(output, "images")) == ["samples_RANDOM_INIT_00000000.png"]


def test_adm_format_references(generator, extractor, reference, evaluation, frechet_calls,
                               tmp_path):
    """An ADM file (statistics, no network entry) is read as stored; a bare image batch gets
    its statistics from arr_0. The samples of the first evaluation are reused (resumed)."""
    output, first, (first_fid, _) = evaluation
    with np.load(reference[0]) as archive:
        images = archive["arr_0"]
    rng = np.random.default_rng(0)
    stats = dict(mu=rng.normal(size=inception.FEATURE_DIM),
                 sigma=np.diag(rng.uniform(0.5, 1, inception.FEATURE_DIM)),
                 mu_s=rng.normal(size=63), sigma_s=np.eye(63))
    adm_path, bare_path = str(tmp_path / "adm.npz"), str(tmp_path / "bare.npz")
    np.savez(adm_path, arr_0=images, **stats)
    np.savez(bare_path, arr_0=images)
    adm, (fid, sfid) = evaluate(generator, adm_path, output, extractor, frechet_calls)
    assert adm["reference_statistics_network"] == ge.ADM_NETWORK
    assert any("statistics of another network" in note for note in adm["notes"])
    for got, name in zip(fid[2:] + sfid[2:], ("mu", "sigma", "mu_s", "sigma_s")):
        np.testing.assert_array_equal(got, stats[name])
    for got, want in zip(fid[:2], first_fid[:2]):  # the same samples
        np.testing.assert_array_equal(got, want)
    # Precision / recall still come from arr_0, the same images as our reference's.
    assert (adm["precision"], adm["recall"]) == (first["precision"], first["recall"])

    bare, (fid, sfid) = evaluate(generator, bare_path, output, extractor, frechet_calls)
    assert bare["reference_statistics_network"] == "computed here from arr_0"
    real = features(extractor, images)
    assert_statistics(fid[2:], real.pool.mean(0), np.cov(real.pool, rowvar=False))
    assert_statistics(sfid[2:], *real.spatial.mean_cov())


def test_bad_references_are_refused(extractor, reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        ge.read_reference(str(tmp_path / "missing.npz"), 63)
    np.savez(tmp_path / "partial.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(2048))
    with pytest.raises(ValueError, match=r"holds \['mu'\] but not all of"):
        ge.read_reference(str(tmp_path / "partial.npz"), 63)
    with pytest.raises(ValueError, match=r"mu_s is shaped \(63,\), expected \(2023,\)"):
        ge.read_reference(reference[0], 2023)
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8 images"):
        ge.read_reference(str(tmp_path / "floats.npz"), 63)
    # Statistics of a random network are refused when the evaluation has real weights.
    real_weights = ge.InceptionExtractor(extractor.params, random_init=False)
    with pytest.raises(ValueError, match="come from a random-init Inception"):
        ge.check_networks(ge.read_reference(reference[0], 63), real_weights)


def test_cli_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_JAX_WEIGHTS", str(tmp_path / "weights"))
    status = cli.call(evaluate_generation.main, [
        "--generator", "G", "--reference", "R.npz", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("error: No converted inception_fid weights in")
    assert "python -m tokenizers_jax.convert inception" in err
    with pytest.raises(SystemExit) as exit_info:
        evaluate_generation.main(["reference", "--config", "configs/generation_reference.py",
                                  "--config.data.nme=x", "--output", "o.npz"])
    assert exit_info.value.code == 2
    assert "the config has no field 'data.nme'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_generation.main(["reference", "--config", "configs/generation_reference.py",
                                  "--config.reference.keep_images=many", "--output", "o.npz"])
    assert "reference.keep_images takes a int value" in capsys.readouterr().err


def test_config_overrides_keep_types():
    parser = evaluate_generation.argparse.ArgumentParser()
    config = load_config(os.path.join(ROOT, "configs", "generation_reference.py:photos"))
    changed = evaluate_generation.with_overrides(
        config, ["--config.data.path=/data/x", "--config.reference.keep_images=7",
                 "--config.data.min_crop_fraction=1", "--config.data.name=image_folder"], parser)
    assert (changed.data.path, changed.reference.keep_images) == ("/data/x", 7)
    assert changed.data.min_crop_fraction == 1.0 and changed.data.name == "image_folder"
    assert isinstance(changed.data.min_crop_fraction, float)


@pytest.mark.slow
def test_cli_end_to_end_at_299(tmp_path, monkeypatch):
    """Both commands through the CLI with the real input size (random Inception)."""
    fixtures.register(monkeypatch)
    models = tmp_path / "models"
    tokenizer = fixtures.tiny_detailflow(models / "detailflow")
    generator = fixtures.save_generator(models / "generator")
    monkeypatch.setenv("TOKENIZERS_JAX_WEIGHTS", str(tmp_path / "weights"))
    ref = str(tmp_path / "ref.npz")
    assert cli.call(evaluate_generation.main, [
        "reference", "--config", os.path.join(ROOT, "configs", "generation_reference.py:photos"),
        "--config.data.crops_per_photo=1", "--output", ref, "--allow-random-init-inception",
        "--inception-batch-size", "7"]) == 0
    assert adm_npz.array_shape(ref) == ((7, 32, 32, 3), np.uint8)
    output = str(tmp_path / "eval")
    assert cli.call(evaluate_generation.main, [
        "--generator", generator, "--tokenizer", tokenizer, "--reference", ref,
        "--output", output, "--num-samples", "8", "--classes", "all", "--cfg", "1.0",
        "--allow-random-init-inception", "--inception-batch-size", "8"]) == 0
    with open(os.path.join(output, "metrics.json")) as f:
        result = json.load(f)
    assert result["inception_input_size"] == 299 and result["random_init_inception"]
    assert all(np.isfinite(result[m]) for m in ge.METRICS)
    assert not exported.is_model_dir(tmp_path / "weights" / inception.NAME)
