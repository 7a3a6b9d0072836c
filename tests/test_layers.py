"""Shared layers: inits, norms, RoPE ids and rotation, patchify order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tokenizers_jax import layers
from tokenizers_jax.models import mmdit


def test_dense_matches_torch_linear_and_init_bounds():
    dense = layers.Dense(7)
    x = jax.random.normal(jax.random.key(0), (3, 64))
    params = dense.init(jax.random.key(1), x)["params"]
    kernel, bias = nn.unbox(params["kernel"]), nn.unbox(params["bias"])
    bound = 1 / np.sqrt(64)
    assert kernel.shape == (64, 7) and np.abs(kernel).max() <= bound
    assert np.abs(bias).max() <= bound and np.abs(kernel).max() > 0.8 * bound
    linear = torch.nn.Linear(64, 7)
    linear.weight.data = torch.from_numpy(np.asarray(kernel).T.copy())
    linear.bias.data = torch.from_numpy(np.asarray(bias).copy())
    expected = linear(torch.from_numpy(np.asarray(x))).detach().numpy()
    np.testing.assert_allclose(dense.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_zero_chunks_zeroes_only_gate_columns():
    init = layers.zero_chunks(nn.initializers.ones, 6, (2, 5))
    value = np.asarray(init(jax.random.key(0), (4, 12)))
    assert (value[:, 4:6] == 0).all() and (value[:, 10:12] == 0).all()
    assert (value[:, :4] == 1).all() and (value[:, 6:10] == 1).all()


def test_layer_norm_and_rms_norm_match_torch():
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32) * 3 + 1
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (16,), eps=1e-6).numpy()
    np.testing.assert_allclose(layers.layer_norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)
    rms = layers.RMSNorm()
    params = rms.init(jax.random.key(0), x)
    t = torch.from_numpy(x)
    expected = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)).numpy()
    np.testing.assert_allclose(rms.apply(params, x), expected, rtol=1e-5, atol=1e-6)


def test_position_ids_follow_the_spec():
    ids = mmdit.position_ids(code_length=4, grid=(2, 3))
    assert ids.shape == (4 + 6, 3)
    np.testing.assert_array_equal(ids[:4], [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]])
    # image tokens row-major with ids (0, r, c)
    np.testing.assert_array_equal(ids[4:], [[0, 0, 0], [0, 0, 1], [0, 0, 2],
                                            [0, 1, 0], [0, 1, 1], [0, 1, 2]])


def test_rope_angles_concatenate_axes_in_order():
    axes_dim = (4, 6, 6)
    angles = layers.rope_angles(np.array([[2, 3, 5]]), axes_dim, theta=10000.0)
    assert angles.shape == (1, 8)
    expected = np.concatenate([
        2 * 10000.0 ** (-np.arange(0, 4, 2) / 4),
        3 * 10000.0 ** (-np.arange(0, 6, 2) / 6),
        5 * 10000.0 ** (-np.arange(0, 6, 2) / 6),
    ])
    np.testing.assert_allclose(angles[0], expected, rtol=1e-12)
    with pytest.raises(ValueError, match="even"):
        layers.rope_angles(np.zeros((1, 3)), (2, 7, 7), 10000.0)


def test_apply_rope_rotates_interleaved_pairs_as_complex_multiplication():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    angles = rng.uniform(-3, 3, size=(5, 4))
    out = np.asarray(layers.apply_rope(jnp.asarray(x), angles))
    as_complex = x[..., 0::2] + 1j * x[..., 1::2]
    rotated = as_complex * np.exp(1j * angles)[None, :, None, :]
    np.testing.assert_allclose(out[..., 0::2], rotated.real, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[..., 1::2], rotated.imag, rtol=1e-5, atol=1e-5)


def test_attention_uses_the_given_scale_and_mask():
    rng = np.random.default_rng(2)
    q, k, v = (rng.normal(size=(1, 4, 2, 8)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((4, 4), bool))
    out = layers.attention(q, k, v, scale=8 / 8, mask=jnp.asarray(mask))
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a).transpose(1, 2) for a in (q, k, v)),
        attn_mask=torch.from_numpy(mask), scale=1.0).transpose(1, 2).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_takes_per_example_key_masks_and_bfloat16():
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(2, 5, 3, 8)).astype(np.float32) for _ in range(3))
    keys = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], bool)[:, None, None, :]  # [B, 1, 1, L]
    out = layers.attention(q, k, v, scale=0.3, mask=jnp.asarray(keys))
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a).transpose(1, 2) for a in (q, k, v)),
        attn_mask=torch.from_numpy(keys), scale=0.3).transpose(1, 2).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    half = layers.attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), scale=0.3,
                            mask=jnp.asarray(keys))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), expected, atol=3e-2)


def test_cudnn_attention_refuses_to_run_without_an_nvidia_gpu():
    x = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU.*use model.attention_impl='xla'"):
        layers.attention(x, x, x, scale=1.0, implementation="cudnn")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        layers.attention(x, x, x, scale=1.0, implementation="flash")


def test_patchify_feature_order_is_py_px_c_and_inverts():
    images = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
    tokens = layers.patchify(jnp.asarray(images), 4)
    assert tokens.shape == (2, 6, 48)
    # token 1 is grid (0, 1); feature (py * 4 + px) * 3 + c
    py, px, c = 2, 3, 1
    assert tokens[0, 1, (py * 4 + px) * 3 + c] == images[0, py, 4 + px, c]
    np.testing.assert_array_equal(layers.unpatchify(tokens, (2, 3), 4), images)


def test_timestep_embedding_is_cos_then_sin_of_1000t():
    t = jnp.array([0.0, 0.25, 1.0])
    emb = np.asarray(mmdit.timestep_embedding(t))
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    np.testing.assert_allclose(emb[:, :128], np.cos(1000 * np.asarray(t)[:, None] * freqs),
                               atol=1e-4)
    np.testing.assert_allclose(emb[:, 128:], np.sin(1000 * np.asarray(t)[:, None] * freqs),
                               atol=1e-4)
