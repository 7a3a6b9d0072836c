"""The public tokenizer API: load_tokenizer, encode/decode/reconstruct, input validation."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tokenizers_jax
from tokenizers_jax import api, exported
from tokenizers_jax.models import flowmo

from conftest import small_flowmo_config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    config = small_flowmo_config()
    params = flowmo.init_params(flowmo.build_model(config), jax.random.key(0))
    directory = tmp_path_factory.mktemp("model")
    exported.save_model_dir(directory, config, params)
    return tokenizers_jax.load_tokenizer(directory)


def photos(batch=2, size=16):
    return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def test_encode_decode_reconstruct(tokenizer):
    c = tokenizer.model.config
    images = photos()
    indices = tokenizer.encode(images)
    assert indices.shape == (2, c.code_length * c.context_dim // c.codebook_size_for_entropy)
    assert indices.dtype == jnp.int32
    assert int(indices.min()) >= 0 and int(indices.max()) < 2**c.codebook_size_for_entropy
    # uint8 and the equivalent float input give the same tokens
    np.testing.assert_array_equal(tokenizer.encode(images / 127.5 - 1.0), indices)
    decoded = tokenizer.decode(indices, seed=3)
    assert decoded.shape == (2, 16, 16, 3) and decoded.dtype == jnp.float32
    assert float(jnp.abs(decoded).max()) <= 1.0
    np.testing.assert_array_equal(tokenizer.decode(indices, seed=3), decoded)
    assert not np.array_equal(tokenizer.decode(indices, seed=4), decoded)
    np.testing.assert_array_equal(tokenizer.reconstruct(images, seed=3), decoded)
    assert tokenizer.decode(indices, image_size=32).shape == (2, 32, 32, 3)


def test_decode_with_explicit_noise_matches_the_library_reconstruction(tokenizer):
    images = jnp.asarray(photos(), jnp.float32) / 127.5 - 1.0
    noise = jax.random.normal(jax.random.key(7), images.shape)
    expected = flowmo.reconstruct(tokenizer.model, tokenizer.params, images, None,
                                  tokenizer.config, noise=noise)
    got = tokenizer.decode(tokenizer.encode(images), noise=noise)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("images,error,match", [
    (np.zeros((16, 16, 3), np.uint8), ValueError, r"images\[None\]"),
    (np.zeros((2, 3, 16, 16), np.uint8), ValueError, "channels-first"),
    (np.zeros((2, 18, 16, 3), np.uint8), ValueError, "not divisible by the patch size 4"),
    (np.zeros((2, 16, 16, 3), np.int32), TypeError, "uint8"),
    (np.full((2, 16, 16, 3), 200.0, np.float32), ValueError, r"\[0, 255\]: pass uint8"),
    (np.full((2, 16, 16, 3), np.nan, np.float32), ValueError, "NaN"),
])
def test_bad_images_get_clear_errors(tokenizer, images, error, match):
    with pytest.raises(error, match=match):
        tokenizer.encode(images)


def test_bad_indices_and_noise_get_clear_errors(tokenizer):
    with pytest.raises(ValueError, match=r"expected indices shaped \[B, 16\]"):
        tokenizer.decode(np.zeros((2, 7), np.int32))
    with pytest.raises(TypeError, match="integers"):
        tokenizer.decode(np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match="noise must be shaped"):
        tokenizer.decode(np.zeros((2, 16), np.int32), noise=jnp.zeros((2, 8, 8, 3)))


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        tokenizers_jax.load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown model"):
        api.tokenizer_class("vqgan")


def test_to_uint8_rounds_and_clips():
    np.testing.assert_array_equal(api.to_uint8(np.array([-1.5, -1.0, 0.0, 1.0])),
                                  [0, 0, 128, 255])


def test_reconstruct_keeps_the_input_size_or_says_how(tokenizer):
    c = tokenizer.model.config
    with pytest.raises(ValueError, match=r"encodes 16x16 images, got 32x32; .* pass "
                                         r"image_size=32 to encode \(and decode\)"):
        tokenizer.reconstruct(photos(size=32))
    with pytest.raises(ValueError, match="encodes 16x16 images, got 16x32"):
        tokenizer.encode(np.zeros((2, 16, 32, 3), np.uint8))
    bigger = tokenizer.reconstruct(photos(size=32), image_size=32, seed=1)
    assert bigger.shape == (2, 32, 32, 3)
    assert tokenizer.encode(photos(size=32), image_size=32).shape == (2, c.tokens_per_image)


def test_out_of_range_indices_and_empty_batches_are_clear_errors(tokenizer):
    indices = np.zeros((2, 16), np.int32)
    for bad in (10**6, -5):
        indices[1, 3] = bad
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\)"):
            tokenizer.decode(indices)
    with pytest.raises(ValueError, match="empty batch"):
        tokenizer.encode(np.zeros((0, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        tokenizer.decode(np.zeros((0, 16), np.int32))


def test_a_training_workdir_loads_without_warnings(tokenizer, tmp_path, caplog):
    import ml_collections
    import optax

    from tokenizers_jax import data
    from tokenizers_jax.training import checkpoint
    from tokenizers_jax.training.state import state_from_params

    workdir = str(tmp_path)
    config = tokenizer.config
    checkpoint.save_config(workdir, config)
    ema = jax.tree.map(lambda x: x + 1.0, tokenizer.params)
    state = state_from_params(tokenizer.params, jax.random.PRNGKey(0), optax.adam(1e-3))
    state = state.replace(step=jnp.int32(7), ema_params=ema)
    checkpointer = checkpoint.Checkpointer(
        workdir, ml_collections.ConfigDict(dict(keep=2, keep_every=0, async_save=False)))
    checkpointer.save(state, data.make_train_iterator(config.data, global_batch_size=2))
    checkpointer.close()

    with caplog.at_level(logging.WARNING):
        loaded = tokenizers_jax.load_tokenizer(workdir)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(got, want)
