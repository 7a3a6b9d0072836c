"""LFQ bottleneck: grouping, sign, indices, entropy against brute force, losses."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers_jax.quantizers import lfq


def brute_force_entropies(codewords: np.ndarray, temperature: float):
    """The original's formula over all 2**fg codes: softmax(2 x C^T / T), in float64."""
    x = codewords.reshape(-1, codewords.shape[-1]).astype(np.float64)
    bits = x.shape[-1]
    codes = np.array([[1.0 if (j >> g) & 1 else -1.0 for g in range(bits)]
                      for j in range(2**bits)])
    logits = 2 * x @ codes.T / temperature
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(log_p)
    sample = -(p * log_p).sum(-1).mean()
    mean_p = p.mean(0)
    codebook = -(mean_p * np.log(mean_p + 1e-5)).sum()
    return sample, codebook


@pytest.mark.parametrize("bits,scale", [(4, 0.05), (9, 0.02), (3, 1.0)])
def test_entropy_matches_brute_force(bits, scale):
    x = np.random.default_rng(bits).normal(size=(2, 40, bits)).astype(np.float32) * scale
    sample, codebook = lfq.entropy_terms(jnp.asarray(x), temperature=0.1)
    ref_sample, ref_codebook = brute_force_entropies(x, 0.1)
    np.testing.assert_allclose(sample, ref_sample, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(codebook, ref_codebook, rtol=1e-4, atol=1e-6)


def test_strided_grouping_matches_the_spec():
    # context 6 = fg 3 x fh 2: codeword j of token t holds channels {g * 2 + j}.
    code = jnp.arange(2 * 6, dtype=jnp.float32).reshape(1, 2, 6)
    words = np.asarray(lfq.to_codewords(code, 3))
    np.testing.assert_array_equal(words[0], [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]])
    np.testing.assert_array_equal(lfq.from_codewords(jnp.asarray(words), 2), code)


def test_sign_quantize_maps_zero_to_minus_one():
    np.testing.assert_array_equal(lfq.sign_quantize(jnp.array([-2.0, 0.0, 1e-8, 3.0])),
                                  [-1, -1, 1, 1])


def test_indices_are_little_endian_and_round_trip():
    code = jnp.array([[[1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]]])  # fg = 3, fh = 1
    np.testing.assert_array_equal(lfq.codes_to_indices(code, 3), [[1, 6]])
    rng = np.random.default_rng(0)
    codes = np.where(rng.normal(size=(3, 5, 8)) > 0, 1.0, -1.0).astype(np.float32)
    indices = lfq.codes_to_indices(jnp.asarray(codes), 4)
    assert indices.shape == (3, 10) and indices.dtype == jnp.int32
    np.testing.assert_array_equal(lfq.indices_to_codes(indices, 4, 5), codes)
    every = jnp.arange(16)[None]
    np.testing.assert_array_equal(lfq.codes_to_indices(lfq.indices_to_codes(every, 4, 16), 4),
                                  every)


def test_codebook_rows_are_the_bits_of_their_index():
    book = np.asarray(lfq.codebook(3))
    for j, row in enumerate(book):
        assert list(row) == [1.0 if (j >> g) & 1 else -1.0 for g in range(3)]


def test_straight_through_values_and_gradient():
    x = jnp.array([[[0.3, -0.2, 0.0, 2.0]]])
    out = lfq.lfq(x, bits=2, entropy_weight=0.0, commit_weight=0.0, with_losses=False)
    np.testing.assert_array_equal(out.codes, [[[1, -1, -1, 1]]])
    grad = jax.grad(lambda v: jnp.sum(lfq.lfq(v, 2, 0.0, 0.0, with_losses=False).codes * 3.0))(x)
    np.testing.assert_allclose(grad, 3.0 * np.ones_like(x))


def test_losses_combine_with_the_configured_weights():
    x = jax.random.normal(jax.random.key(0), (2, 4, 6)) * 0.3
    out = lfq.lfq(x, bits=3, entropy_weight=0.0025, commit_weight=0.000625)
    q = np.where(np.asarray(x) > 0, 1.0, -1.0)
    np.testing.assert_allclose(out.commitment, np.mean((np.asarray(x) - q) ** 2), rtol=1e-6)
    expected = 0.0025 * (out.sample_entropy - out.codebook_entropy) + 0.000625 * out.commitment
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)
    ref_sample, ref_codebook = brute_force_entropies(np.asarray(lfq.to_codewords(x, 3)), 0.1)
    np.testing.assert_allclose(out.sample_entropy, ref_sample, rtol=1e-4)
    np.testing.assert_allclose(out.codebook_entropy, ref_codebook, rtol=1e-4)
    evaluation = lfq.lfq(x, bits=3, entropy_weight=0.0025, commit_weight=0.000625,
                         with_losses=False)
    assert float(evaluation.loss) == 0.0


def test_indivisible_context_is_an_error():
    with pytest.raises(ValueError, match="not divisible"):
        lfq.to_codewords(jnp.zeros((1, 2, 10)), 4)


def test_codebook_entropy_is_maximal_for_uniform_codes():
    bits = 3
    words = np.array(list(itertools.product([-1.0, 1.0], repeat=bits)), np.float32) * 5
    _, codebook_entropy = lfq.entropy_terms(jnp.asarray(words), 0.1)
    np.testing.assert_allclose(codebook_entropy, np.log(2**bits), rtol=1e-3)
