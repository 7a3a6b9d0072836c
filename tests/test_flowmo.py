"""FlowMo model: parameter counts, init behaviour, encoder without modulation, the loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tokenizers_jax.config_file import load_config
from tokenizers_jax.models import flowmo, mmdit
from conftest import small_flowmo_config


@pytest.fixture(scope="module")
def tiny():
    config = small_flowmo_config()
    model = flowmo.build_model(config)
    params = flowmo.init_params(model, jax.random.key(0))
    return config, model, params


@pytest.mark.parametrize("variant,expected", [("lo", 945_374_085), ("hi", 945_520_081)])
def test_parameter_counts_match_the_original(variant, expected):
    model = flowmo.build_model(load_config(f"configs/flowmo.py:{variant}"))
    leaves = jax.tree.leaves(flowmo.abstract_params(model))
    assert len(leaves) == 608
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == expected
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_params_carry_logical_axis_names():
    model = flowmo.build_model(load_config("configs/flowmo.py:tiny"))
    boxed = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs(1))["params"]
    qkv = boxed["decoder"]["double_blocks_0"]["img_attn"]["qkv"]["kernel"]
    assert isinstance(qkv, nn.LogicallyPartitioned) and qkv.names == ("embed", "heads")


def test_zero_initialised_gates_make_decoder_blocks_identities(tiny):
    config, model, params = tiny
    trunk = model.config.decoder
    block = mmdit.DoubleStreamBlock(trunk)
    block_params = params["decoder"]["double_blocks_0"]
    for stream in ("img", "txt"):
        lin = block_params[f"{stream}_mod"]["lin"]
        h = trunk.hidden_size
        assert not np.any(lin["kernel"][:, 2 * h:3 * h]) and not np.any(lin["kernel"][:, 5 * h:])
        assert np.any(lin["kernel"][:, :2 * h])
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.normal(size=(2, 12, trunk.hidden_size)), jnp.float32)
    txt = jnp.asarray(rng.normal(size=(2, 5, trunk.hidden_size)), jnp.float32)
    vec = jnp.asarray(rng.normal(size=(2, trunk.hidden_size)), jnp.float32)
    angles = np.zeros((17, trunk.head_dim // 2))
    out_img, out_txt = block.apply({"params": block_params}, img, txt, vec, angles)
    np.testing.assert_array_equal(out_img, img)
    np.testing.assert_array_equal(out_txt, txt)
    # ...whereas the ungated encoder blocks change their inputs.
    encoder_block = mmdit.DoubleStreamBlock(model.config.encoder)
    enc_params = params["encoder"]["double_blocks_0"]
    h_enc = model.config.encoder.hidden_size
    enc_img, enc_txt = encoder_block.apply({"params": enc_params}, img[..., :h_enc],
                                           txt[..., :h_enc], None,
                                           np.zeros((17, model.config.encoder.head_dim // 2)))
    assert not np.allclose(enc_img, img[..., :h_enc])


def test_encoder_does_not_use_its_modulation_parameters(tiny):
    _, model, params = tiny
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    code = model.apply({"params": params}, images, method=flowmo.FlowMo.encode)
    assert code.shape == (2, 8, 8) and code.dtype == jnp.float32
    perturbed = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 1.0 if any(
            getattr(k, "key", "") in ("img_mod", "txt_mod", "time_in", "adaLN_modulation")
            for k in path) else x,
        params["encoder"])
    code2 = model.apply({"params": {**params, "encoder": perturbed}}, images,
                        method=flowmo.FlowMo.encode)
    np.testing.assert_array_equal(code, code2)


def test_training_loss_terms_and_gradients(tiny):
    config, model, params = tiny
    images = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3), minval=-1, maxval=1)
    calls = []

    def perceptual_fn(x, estimate):
        calls.append(estimate.shape)
        return jnp.mean(jnp.abs(x - estimate), axis=(1, 2, 3))

    loss_fn = lambda p: flowmo.training_loss(model, p, images, jax.random.key(3), config,
                                             perceptual_fn)
    (total, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert calls == [(4, 16, 16, 3)]
    assert all(np.isfinite(float(v)) for v in terms.values())
    expected = terms["flow"] + terms["quantizer"] + 0.1 * terms["perceptual"]
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert float(terms["perceptual"]) > 0
    norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))))
    assert norm(grads["encoder"]) > 0 and norm(grads["decoder"]) > 0
    # the encoder's final image readout feeds nothing: exactly zero gradient (spec 1.7)
    assert norm(grads["encoder"]["final_layer_img"]) == 0.0


def test_training_loss_uses_injected_draws(tiny):
    config, model, params = tiny
    images = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3), minval=-1, maxval=1)
    draws = flowmo.sample_training_draws(jax.random.key(5), images.shape, config)
    loss = jax.jit(lambda key, d: flowmo.training_loss(model, params, images, key, config,
                                                        draws=d)[0])
    a, b = loss(jax.random.key(6), draws), loss(jax.random.key(7), draws)
    assert float(a) == float(b)
    # (at init the gates hide the code from the decoder, so vary the injected times instead)
    shifted = draws._replace(times=draws.times * 0.5)
    c = loss(jax.random.key(6), shifted)
    assert float(c) != float(a)


def test_posttrain_loss_backpropagates_through_the_integrator(tiny):
    config, model, params = tiny
    config = ml_collections.ConfigDict(config.to_dict())
    config.loss.posttrain = True
    config.loss.posttrain_sample_k = 3
    config.loss.perceptual_weight = 0.01
    images = jax.random.uniform(jax.random.key(8), (2, 16, 16, 3), minval=-1, maxval=1)
    perceptual_fn = lambda x, y: jnp.mean((x - y) ** 2, axis=(1, 2, 3))
    only_perceptual = lambda p: flowmo.training_loss(model, p, images, jax.random.key(9), config,
                                                     perceptual_fn)[1]["perceptual"]
    grads = jax.jit(jax.grad(only_perceptual))(params)
    decoder_grad = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads["decoder"]))
    assert decoder_grad > 0


def test_bfloat16_compute_keeps_fp32_params_and_outputs(tiny):
    config, _, params = tiny
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = "bfloat16"
    model = flowmo.build_model(config)
    images = jax.random.uniform(jax.random.key(10), (2, 16, 16, 3), minval=-1, maxval=1)
    code_bf16 = model.apply({"params": params}, images, method=flowmo.FlowMo.encode)
    code_fp32 = flowmo.build_model(small_flowmo_config()).apply(
        {"params": params}, images, method=flowmo.FlowMo.encode)
    assert code_bf16.dtype == jnp.float32
    np.testing.assert_allclose(code_bf16, code_fp32, atol=0.1, rtol=0.1)
    assert not np.array_equal(code_bf16, code_fp32)


def test_config_errors_name_the_field():
    config = load_config("configs/flowmo.py:tiny")
    with pytest.raises(AttributeError):
        config.model.contex_dim  # noqa: B018 - a typo must not pass silently
    with pytest.raises(AttributeError):
        config.model.contex_dim = 3
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.model.context_dim = 10
    with pytest.raises(ValueError, match="codebook_size_for_entropy"):
        flowmo.build_model(bad)
    bad.model.context_dim = 8
    bad.model.encoder.axes_dim = (4, 14, 12)
    with pytest.raises(ValueError, match="axes_dim"):
        flowmo.build_model(bad)
    with pytest.raises(ValueError, match="unknown FlowMo variant"):
        load_config("configs/flowmo.py:medium")


def test_remat_changes_memory_not_numbers(tiny):
    config, model, params = tiny
    remat_config = ml_collections.ConfigDict(config.to_dict())
    remat_config.model.remat = True
    remat_model = flowmo.build_model(remat_config)
    assert jax.tree.structure(flowmo.abstract_params(remat_model)) == jax.tree.structure(params)
    images = jax.random.uniform(jax.random.key(11), (2, 16, 16, 3), minval=-1, maxval=1)

    def loss_and_grads(m):
        loss_fn = lambda p: flowmo.training_loss(m, p, images, jax.random.key(12), config)[0]
        return jax.jit(jax.value_and_grad(loss_fn))(params)

    (loss, grads), (remat_loss, remat_grads) = loss_and_grads(model), loss_and_grads(remat_model)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 remat_grads, grads)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: flowmo.training_loss(
        remat_model, p, images, jax.random.key(12), config)[0]))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
