"""`DetailFlowGenerator`: per-sample randomness (batch and device count do not matter),
decoding with its tokenizer, load_generator, and the checks made before any compute."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_detailflow import tiny as tiny_tokenizer
from test_gpt import CONFIG_FILE, random_params

from tokenizers_jax import api, exported
from tokenizers_jax.config_file import load_config
from tokenizers_jax.models import detailflow, gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = [0, 3, 9, 5]


def make_generator():
    config = load_config(f"{CONFIG_FILE}:tiny")
    tokenizer = detailflow.DetailFlowTokenizer(*tiny_tokenizer())
    return gpt.DetailFlowGenerator(config, random_params(config), tokenizer)


@pytest.fixture(scope="module")
def generator():
    return make_generator()


@pytest.fixture(scope="module")
def four(generator):
    return np.asarray(generator.generate(LABELS, seed=7))


def test_samples_do_not_depend_on_the_batch(generator, four):
    assert four.shape == (4, 16) and four.dtype == np.int32
    assert four.min() >= 0 and four.max() < 64
    halves = [generator.generate(LABELS[:2], seed=7),
              generator.generate(LABELS[2:], seed=7, first_index=2)]
    np.testing.assert_array_equal(np.concatenate(halves), four)
    other = np.asarray(generator.generate(LABELS[:2], seed=8))
    assert not np.array_equal(other, four[:2])


def test_generate_images_decodes_all_tokens(generator, four):
    images = np.asarray(generator.generate_images(LABELS, seed=7))
    assert images.shape == (4, 32, 32, 3)  # tiny: R(16) = 32, the full resolution
    np.testing.assert_array_equal(images, np.asarray(generator.tokenizer.decode(four)))
    assert images.min() >= -1 and images.max() <= 1


class _StubTokenizer(api.Tokenizer):
    def encode(self, images):
        raise AssertionError("not called")

    def decode(self, indices, **kwargs):
        raise AssertionError("not called")


def _stub(**changes):
    config = load_config("configs/detailflow.py:tiny")
    config.unlock()
    config.model.update(changes)
    return _StubTokenizer(config, None)


@pytest.mark.parametrize("changes,message", [
    (dict(codebook_size=128), "codebook size 128 (generator vocabulary 64)"),
    (dict(num_latent_tokens=32), "tokens per image 32 (generator tokens 16)"),
    (dict(group_size=8, causal_num=8), "group size 8 (generator group size 4)"),
    (dict(name="flowmo"), "needs a DetailFlow tokenizer, got a 'flowmo' tokenizer"),
])
def test_refuses_a_tokenizer_that_does_not_fit(changes, message):
    config = load_config(f"{CONFIG_FILE}:tiny")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gpt.DetailFlowGenerator(config, None, _stub(**changes))


@pytest.mark.parametrize("labels,sampling,message", [
    ([10], {}, r"class labels must lie in \[0, 10\)"),
    ([[1, 2]], {}, "shaped \\[B\\]"),
    ([1], dict(cfg_scale=2.0), "unknown sampling settings \\['cfg_scale'\\]"),
    ([1], dict(cfg=0.5), "cfg=0.5 \\(must be >= 1"),
    ([1], dict(top_k=65, top_p=0.0), "top_k=65 .*; top_p=0.0"),
])
def test_bad_requests_fail_before_any_compute(generator, labels, sampling, message):
    with pytest.raises(ValueError, match=message):
        generator.generate(labels, **sampling)


def test_load_generator_from_model_directories(tmp_path, generator):
    exported.save_model_dir(tmp_path / "gpt", generator.config, jax.device_get(generator.params))
    exported.save_model_dir(tmp_path / "tok", generator.tokenizer.config,
                            generator.tokenizer.params)
    loaded = api.load_generator(tmp_path / "gpt", tokenizer=tmp_path / "tok")
    assert isinstance(loaded, gpt.DetailFlowGenerator)
    assert loaded.num_classes == 10 and loaded.tokenizer.num_tokens == 16
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded.params, generator.params)


WORKER = """
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from test_gpt_generator import make_generator
gen = make_generator()
tokens = gen.generate([0, 3, 9, 5, 1], seed=7)
print(json.dumps(dict(devices=jax.device_count(), shards=int(gen.mesh.devices.size),
                      tokens=np.asarray(tokens).tolist())))
"""


@pytest.mark.slow
def test_two_devices_give_the_same_samples(generator, four):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["devices"] == result["shards"] == 2
    tokens = np.array(result["tokens"])  # 5 samples: padded to 6 over the 2 devices
    np.testing.assert_array_equal(tokens[:4], four)
    np.testing.assert_array_equal(tokens[4:], generator.generate([1], seed=7, first_index=4))
