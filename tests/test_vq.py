"""The l2-normalised VQ of DetailFlow (spec 1.2): nearest code, straight-through, losses from a
start index on, top-k neighbours."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers_jax.quantizers import vq

K, D = 32, 8


def _quantizer_and_params(seed=0):
    quantizer = vq.VectorQuantizer(K, D, beta=0.25)
    params = quantizer.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4, D)))["params"]
    # An un-normalised codebook, as stored in the released checkpoints.
    codebook = np.random.RandomState(seed).randn(K, D).astype(np.float32) * 3.0
    return quantizer, {"codebook": jnp.asarray(codebook)}, params


def test_init_codebook_is_unit_norm():
    _, _, params = _quantizer_and_params()
    codebook = np.asarray(nn.unbox(params)["codebook"])
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=-1), 1.0, rtol=1e-6)
    assert codebook.shape == (K, D)


def test_nearest_code_and_straight_through():
    quantizer, params, _ = _quantizer_and_params()
    z = jax.random.normal(jax.random.PRNGKey(1), (3, 5, D)) * 4.0
    out = quantizer.apply({"params": params}, z)
    codebook = np.asarray(params["codebook"])
    unit_codes = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
    unit_z = np.asarray(z) / np.linalg.norm(np.asarray(z), axis=-1, keepdims=True)
    expected = np.argmax(unit_z @ unit_codes.T, axis=-1)  # nearest unit vector = max cosine
    np.testing.assert_array_equal(np.asarray(out.indices), expected)
    assert out.indices.dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(out.quantized), unit_codes[expected], atol=1e-6)
    # Straight-through: d quantized / d z is the Jacobian of the normalisation only.
    grad = jax.grad(lambda z: quantizer.apply({"params": params}, z).quantized.sum())(z)
    grad_norm = jax.grad(lambda z: vq.l2_normalize(z).sum())(z)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_norm), atol=1e-6)
    lookup = quantizer.apply({"params": params}, out.indices, method=vq.VectorQuantizer.lookup)
    np.testing.assert_allclose(np.asarray(lookup), unit_codes[expected], atol=1e-6)


@pytest.mark.parametrize("start", [0, 2, 4])
def test_losses_from_start(start):
    quantizer, params, _ = _quantizer_and_params()
    z = jax.random.normal(jax.random.PRNGKey(2), (2, 5, D))
    out = quantizer.apply({"params": params}, z, loss_start=start)
    unit_z = np.asarray(vq.l2_normalize(z))
    codes = np.asarray(out.quantized)
    mse = np.mean((codes[:, start:] - unit_z[:, start:]) ** 2)
    np.testing.assert_allclose(float(out.codebook_loss), mse, rtol=1e-5)
    np.testing.assert_allclose(float(out.commitment_loss), 0.25 * mse, rtol=1e-5)
    # Traced start gives the same value, and tokens before it get no gradient.
    traced = jax.jit(lambda z, s: quantizer.apply({"params": params}, z, loss_start=s))(z, start)
    np.testing.assert_allclose(float(traced.codebook_loss), mse, rtol=1e-5)
    grad = jax.grad(
        lambda z: quantizer.apply({"params": params}, z, loss_start=start).commitment_loss)(z)
    assert np.all(np.asarray(grad)[:, :start] == 0)
    assert np.any(np.asarray(grad)[:, start:] != 0)
    # The codebook loss trains the codebook only.
    grad_cb = jax.grad(lambda p: quantizer.apply({"params": p}, z, loss_start=start)
                       .codebook_loss)(params)["codebook"]
    assert np.any(np.asarray(grad_cb) != 0)


def test_top_k_neighbours():
    quantizer, params, _ = _quantizer_and_params()
    top_k = 6
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 7, D))
    ranks = vq.draw_neighbour_ranks(jax.random.PRNGKey(4), (2, 7), top_k)
    out = quantizer.apply({"params": params}, z, neighbour_ranks=ranks, top_k=top_k)
    plain = quantizer.apply({"params": params}, z)
    np.testing.assert_array_equal(np.asarray(out.indices), np.asarray(plain.indices))
    codebook = np.asarray(vq.l2_normalize(params["codebook"]))
    unit_z = np.asarray(vq.l2_normalize(z))
    order = np.argsort(-(unit_z @ codebook.T), axis=-1)[..., :top_k]
    expected = np.take_along_axis(order, np.asarray(ranks)[..., None], -1)[..., 0]
    np.testing.assert_array_equal(np.asarray(out.neighbour_indices), expected)
    np.testing.assert_allclose(np.asarray(out.neighbours), codebook[expected], atol=1e-6)
    # Rank 0 is the nearest code itself.
    zero = quantizer.apply({"params": params}, z, neighbour_ranks=jnp.zeros((2, 7), jnp.int32),
                           top_k=top_k)
    np.testing.assert_array_equal(np.asarray(zero.neighbour_indices), np.asarray(plain.indices))


def test_neighbour_ranks_are_uniform_and_replayable():
    a = vq.draw_neighbour_ranks(jax.random.PRNGKey(5), (200, 50), 50)
    b = vq.draw_neighbour_ranks(jax.random.PRNGKey(5), (200, 50), 50)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    counts = np.bincount(np.asarray(a).ravel(), minlength=50)
    assert counts.min() > 100 and counts.max() < 300  # 200 expected per rank


def test_l2_normalize_eps():
    x = jnp.zeros((2, D))
    np.testing.assert_array_equal(np.asarray(vq.l2_normalize(x)), 0.0)
