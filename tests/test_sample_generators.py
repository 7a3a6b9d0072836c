"""`python -m tokenizers_jax.sample` with the real generators (DetailFlow's GPT, MaskGIT on
FlowMo tokens) on tiny random model directories: the .npz holds exactly the images that
`load_generator(...).generate_images` gives for the same classes, seed and sampler settings.
(test_sample.py covers the CLI itself with a stand-in generator.)"""

import json
import os

import numpy as np
import pytest

import tokenizers_jax
from tokenizers_jax import cli, exported, sample
from tokenizers_jax.config_file import load_config
from tokenizers_jax.models import flowmo, maskgit

import generation_fixtures
from conftest import small_flowmo_config
from test_detailflow import random_params as random_tree
from test_gpt import random_params as random_gpt_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def detailflow_gpt_dirs(root):
    """A random tiny GPT (16 tokens, groups of 4, 64 codes, 10 classes) and its tokenizer."""
    config = load_config(os.path.join(ROOT, "configs", "detailflow_ar.py:tiny"))
    config.unlock()
    config.model.depth = 1
    exported.save_model_dir(root / "gpt", config, random_gpt_params(config))
    return str(root / "gpt"), generation_fixtures.tiny_detailflow(root / "detailflow")


def maskgit_dirs(root):
    """A random MaskGIT (8 positions x 2 splits of 4 bits, 7 classes) and a random FlowMo of
    those tokens (8 tokens of 8 bits, 16 px)."""
    flowmo_config = small_flowmo_config()
    exported.save_model_dir(root / "flowmo", flowmo_config, random_tree(
        flowmo.abstract_params(flowmo.build_model(flowmo_config))))
    config = load_config(os.path.join(ROOT, "configs", "maskgit.py:tiny"))
    config.unlock()
    config.model.update(num_positions=8, hidden_size=16, depth=1, num_heads=2, mlp_dim=32)
    config.sampler.steps = 3
    exported.save_model_dir(root / "maskgit", config,
                            random_tree(maskgit.abstract_params(maskgit.build_model(config))))
    return str(root / "maskgit"), str(root / "flowmo")


@pytest.mark.slow  # 15-25 s each on a 2-core CPU: the generator compiles in the CLI and here
@pytest.mark.parametrize("make_dirs,sampling,size", [
    (detailflow_gpt_dirs, {"cfg": 2.0, "temperature": 0.9}, 32),
    (maskgit_dirs, {"cfg": 1.5, "choice_temperature": 2.0}, 16),
], ids=["detailflow_gpt", "maskgit"])
def test_sample_cli_with_a_real_generator(make_dirs, sampling, size, tmp_path, capsys):
    generator_dir, tokenizer_dir = make_dirs(tmp_path)
    output = str(tmp_path / "samples")
    argv = ["--generator", generator_dir, "--tokenizer", tokenizer_dir, "--num-samples", "5",
            "--classes", "1,3", "--seed", "2", "--batch-size", "4", "--output", output,
            "--cfg", str(sampling["cfg"])]
    for name, value in sampling.items():
        if name != "cfg":
            argv += ["--sampling", f"{name}={value}"]
    assert cli.call(sample.main, argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shape"] == [5, size, size, 3]
    with np.load(summary["samples"]) as samples:
        images, labels = samples["arr_0"], samples["arr_1"]
    np.testing.assert_array_equal(labels, [1, 3, 1, 3, 1])
    generator = tokenizers_jax.load_generator(generator_dir, tokenizer=tokenizer_dir)
    expected = generator.generate_images(labels, seed=2, **sampling)
    np.testing.assert_array_equal(images, tokenizers_jax.to_uint8(expected))
    assert len(np.unique(images.reshape(5, -1), axis=0)) == 5  # five different samples
