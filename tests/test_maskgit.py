"""MaskGIT on FlowMo tokens: the token layout, the transformer against a PyTorch reference, and
the `Generator` (tokenizer checks, per-sample keys, FlowMo decoding)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

import tokenizers_jax
from tokenizers_jax import api, exported, sampling
from tokenizers_jax.config_file import load_config
from tokenizers_jax.models import flowmo, maskgit
from tokenizers_jax.quantizers import lfq

from conftest import small_flowmo_config
from reference import maskgit_torch
from test_detailflow import random_params


def layout_config(positions, splits, bits, grouping):
    return maskgit.MaskGITConfig(num_positions=positions, splits=splits, bits_per_split=bits,
                                 num_classes=3, hidden_size=8, depth=1, num_heads=2, mlp_dim=8,
                                 grouping=grouping)


@pytest.mark.parametrize("grouping", maskgit.GROUPINGS)
@pytest.mark.parametrize("positions,splits,bits", [(5, 2, 9), (3, 4, 3)])
def test_layout_restates_section_1_and_round_trips(grouping, positions, splits, bits):
    """FlowMo's indices (of sign codes [B, P, F]) -> [B, P, S] tokens whose bit g of split j is
    channel g * S + j (strided: even/odd for S = 2) or j * fg + g (contiguous: low/high)."""
    config = layout_config(positions, splits, bits, grouping)
    code = np.random.RandomState(0).randn(2, positions, splits * bits).astype(np.float32)
    code[0, 0, :2] = 0.0  # LFQ maps 0 to -1
    codes = np.where(code > 0, 1.0, -1.0)
    # What FlowMo's encode returns (flowmo.quantize -> lfq.lfq, eval mode).
    indices = lfq.lfq(jnp.asarray(code), bits, 0.0, 0.0, with_losses=False).indices
    tokens = np.asarray(maskgit.flowmo_to_maskgit(indices, config))
    assert tokens.shape == (2, positions, splits)
    for b, t, j in np.ndindex(tokens.shape):
        channels = ([g * splits + j for g in range(bits)] if grouping == "strided"
                    else [j * bits + g for g in range(bits)])
        expected = sum(int(codes[b, t, c] > 0) << g for g, c in enumerate(channels))
        assert tokens[b, t, j] == expected, (b, t, j)
    back = maskgit.maskgit_to_flowmo(tokens, config)
    np.testing.assert_array_equal(back, indices)
    # ... and FlowMo's decode input (FlowMoTokenizer.decode's codes of the indices) is the code.
    np.testing.assert_array_equal(lfq.indices_to_codes(back, bits, positions), codes)


def test_strided_layout_is_flowmo_lo_even_odd_reshape():
    config = layout_config(256, 2, 9, "strided")
    indices = np.random.RandomState(1).randint(0, 512, (2, 512))
    np.testing.assert_array_equal(maskgit.flowmo_to_maskgit(indices, config),
                                  indices.reshape(2, 256, 2))


TINY = dict(positions=4, splits=2, bits=3, num_classes=5, width=32, depth=2, heads=2,
            mlp_dim=48)


@pytest.fixture(scope="module")
def tiny_model():
    config = maskgit.MaskGITConfig(
        num_positions=TINY["positions"], splits=TINY["splits"], bits_per_split=TINY["bits"],
        num_classes=TINY["num_classes"], hidden_size=TINY["width"], depth=TINY["depth"],
        num_heads=TINY["heads"], mlp_dim=TINY["mlp_dim"])
    return maskgit.MaskGIT(config)


def test_transformer_matches_the_pytorch_reference(tiny_model):
    params = random_params(maskgit.abstract_params(tiny_model))
    rng = np.random.RandomState(2)
    tokens = rng.randint(0, 9, (3, 4, 2))  # 8 = the mask id
    tokens[0, :, 0] = 8
    labels = np.array([0, 4, 5])  # 5 = the null label
    apply = jax.jit(tiny_model.apply, static_argnames="deterministic")
    logits = apply({"params": params}, jnp.asarray(tokens), jnp.asarray(labels))
    reference = maskgit_torch.from_jax(params, **TINY)
    with torch.no_grad():
        expected = reference(torch.tensor(tokens), torch.tensor(labels)).numpy()
    assert logits.shape == (3, 4, 2, 8) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    dropped = apply({"params": params}, jnp.asarray(tokens), jnp.asarray(labels),
                    deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert not np.allclose(dropped, logits)  # dropout 0.1 acts in training


def test_params_have_logical_axes_and_maskbit_inits(tiny_model):
    boxed = jax.jit(tiny_model.init)(jax.random.PRNGKey(0), *tiny_model.dummy_inputs())
    leaves = jax.tree.leaves(boxed["params"],
                             is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned)
                          and len(leaf.names) == leaf.value.ndim for leaf in leaves)
    params = nn.unbox(boxed)["params"]
    assert params["class_embedding"].shape == (6, 32)  # 5 classes + the null label
    assert params["position_embedding"].shape == (5, 32)  # 4 positions + the class token
    assert params["input_proj"]["kernel"].shape == (6, 32)  # 2 splits x 3 bits
    assert params["predict"]["kernel"].shape == (32, 16)  # 2 splits x 8
    # N(0, 0.02) for every Linear and embedding weight, pooled; zero biases.
    normal = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
              if jax.tree_util.keystr(path).endswith(("kernel']", "embedding']"))
              and "qkv" not in jax.tree_util.keystr(path)]
    assert np.std(np.concatenate([np.ravel(w) for w in normal])) == pytest.approx(0.02, rel=0.05)
    block = params["block_0"]
    assert not np.any(block["fc1"]["bias"]) and not np.any(block["qkv"]["bias"])
    bound = np.sqrt(6 / (32 + 3 * 32))  # torch MultiheadAttention's xavier-uniform in-proj
    assert np.abs(block["qkv"]["kernel"]).max() <= bound
    assert np.std(block["qkv"]["kernel"]) == pytest.approx(bound / np.sqrt(3), rel=0.1)


def test_lo_config_is_maskbit_18_bit_on_flowmo_lo():
    config = load_config("configs/maskgit.py")
    model = maskgit.build_model(config)
    c = model.config
    assert (c.num_positions, c.splits, c.bits_per_split, c.grouping) == (256, 2, 9, "strided")
    assert (c.hidden_size, c.depth, c.num_heads, c.mlp_dim, c.dropout) == (1024, 24, 16, 4096, 0.1)
    logits = jax.eval_shape(model.apply, {"params": maskgit.abstract_params(model)},
                            *model.dummy_inputs(2))
    assert logits.shape == (2, 256, 2, 512) and logits.dtype == jnp.float32
    assert (config.optim.weight_decay, config.optim.b2, config.train.ema_decay) == (
        0.045, 0.96, 0.999)


# --- the Generator -------------------------------------------------------------------------------


def generator_config(**model):
    config = load_config("configs/maskgit.py:tiny")
    config.unlock()
    config.model.update(num_positions=8, hidden_size=16, depth=1, num_heads=2, mlp_dim=32,
                        **model)
    config.sampler.steps = 3
    return config


@pytest.fixture(scope="module")
def tokenizer():
    config = small_flowmo_config()  # 8 tokens x 8 bits, fg 4: 16 sub-tokens of 4 bits
    model = flowmo.build_model(config)
    return flowmo.FlowMoTokenizer(config, random_params(flowmo.abstract_params(model)))


@pytest.fixture(scope="module")
def generator(tokenizer):
    config = generator_config()
    model = maskgit.build_model(config)
    return maskgit.MaskGITGenerator(config, random_params(maskgit.abstract_params(model)),
                                    tokenizer)


def test_generate_and_decode_per_sample(generator, tokenizer):
    labels = [1, 6]
    indices = generator.generate(labels, seed=5)
    assert indices.shape == (2, 16) and indices.dtype == jnp.int32
    assert 0 <= int(indices.min()) and int(indices.max()) < 16
    # Sample i draws from fold_in(PRNGKey(seed), first_index + i): batch and position free.
    alone = generator.generate(labels[1:], seed=5, first_index=1)
    np.testing.assert_array_equal(alone[0], indices[1])
    assert not np.array_equal(generator.generate(labels, seed=6), indices)
    images = generator.decode(indices, seed=5)
    keys = [jax.random.fold_in(jax.random.PRNGKey(5), i) for i in range(2)]
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, maskgit.DECODING_STREAM),
                                         (16, 16, 3)) for key in keys])
    np.testing.assert_allclose(images, tokenizer.decode(indices, noise=noise), atol=1e-6)
    later = maskgit.decoding_noise(sampling.sample_keys(jax.random.PRNGKey(5), 1, 1), 16)
    np.testing.assert_array_equal(later[0], noise[1])  # the noise of sample 1 alone
    assert images.shape == (2, 16, 16, 3) and float(jnp.abs(images).max()) <= 1.0


def test_generate_validates_labels_and_sampler_overrides(generator):
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 7\)"):
        generator.generate([7])
    with pytest.raises(ValueError, match="unknown sampler field"):
        generator.generate([0], temprature=1.0)
    with pytest.raises(ValueError, match="sampler.cutoff"):
        generator.generate([0], cutoff="<<")


def test_check_tokenizer_refuses_other_tokenizers(generator, tokenizer):
    class OtherTokenizer(api.Tokenizer):
        encode = decode = None

    other = OtherTokenizer(ml_collections.ConfigDict({"model": {"name": "detailflow"}}), None)
    with pytest.raises(ValueError, match="'detailflow' model; MaskGIT generates FlowMo tokens"):
        generator.check_tokenizer(other)
    for field, value in (("context_dim", 12), ("code_length", 16),
                         ("codebook_size_for_entropy", 2)):
        config = small_flowmo_config()
        config.model[field] = value
        mismatched = flowmo.FlowMoTokenizer(config, None)
        with pytest.raises(ValueError, match=f"{field} is {value} but the MaskGIT config needs"):
            generator.check_tokenizer(mismatched)
    generator.check_tokenizer(tokenizer)


def test_load_generator_from_a_model_dir(generator, tokenizer, tmp_path):
    exported.save_model_dir(tmp_path / "maskgit", generator.config, generator.params)
    loaded = tokenizers_jax.load_generator(tmp_path / "maskgit", tokenizer=tokenizer)
    assert isinstance(loaded, maskgit.MaskGITGenerator) and loaded.tokenizer is tokenizer
    jax.tree.map(np.testing.assert_array_equal, loaded.params, generator.params)
    assert loaded.config.sampler.to_dict() == generator.config.sampler.to_dict()
