"""DetailFlow model: encoder mask, prefix decoding and its resolutions, self-correction,
parameter counts and the public tokenizer API (tiny config; full size via eval_shape)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers_jax import api, exported
from tokenizers_jax.config_file import load_config
from tokenizers_jax.convert.siglip2 import abstract_vit_params
from tokenizers_jax.models import detailflow as df

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "detailflow.py")


def get_config(variant):
    return load_config(f"{CONFIG_FILE}:{variant}")


def random_params(abstract, seed=0):
    """Random values for an abstract params tree, far from the init (LayerNorm scales near 1,
    an un-normalised codebook, non-zero biases), without compiling the init."""
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1 + 0.1 * rng.randn(*leaf.shape), jnp.float32)
        std = 2.0 if "codebook" in name else 0.1
        return jnp.asarray(std * rng.randn(*leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def tiny():
    config = get_config("tiny")
    return config, random_params(df.init_params(config, jax.random.PRNGKey(0), abstract=True))


def images(batch=2, size=32, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (batch, size, size, 3)).astype(np.uint8)


@pytest.mark.parametrize("patches,latents,group,causal", [(3, 8, 2, 2), (2, 12, 4, 4),
                                                          (4, 12, 2, 6), (1, 16, 8, 8)])
def test_encoder_mask_entry_by_entry(patches, latents, group, causal):
    mask = df.encoder_attention_mask(patches, latents, group, causal)
    assert mask.shape == (patches + latents,) * 2 and mask.dtype == bool
    for q in range(patches + latents):
        for k in range(patches + latents):
            if q < patches:  # patches see patches only
                expected = k < patches
            elif k < patches:  # every latent sees every patch
                expected = True
            else:
                i, j = q - patches, k - patches
                if i < causal:  # token-causal first tokens
                    expected = j <= i
                else:  # earlier groups and the whole own group
                    expected = j // group <= i // group
            assert mask[q, k] == expected, (q, k)


def test_encoder_mask_rejects_bad_groups():
    with pytest.raises(ValueError):
        df.encoder_attention_mask(4, 10, 4, 4)


def test_encoder_latents_are_causal_and_patches_image_only():
    config, params = tiny()
    model = df.model_from_config(config)
    x = jnp.asarray(images(1), jnp.float32) / 127.5 - 1
    encode = jax.jit(lambda p: model.apply({"params": p}, x, method=lambda m, x: m.encoder(x)))
    base = encode(params)
    # tiny: slots 0..3 token-causal, then groups 4..7, 8..11, 12..15. Perturbing slot 8
    # changes group 2 onwards only.
    # (a random direction: a constant shift would vanish in the LayerNorms)
    delta = jax.random.normal(jax.random.PRNGKey(3), (64,))
    perturbed = jax.tree.map(lambda a: a, params)
    perturbed["encoder"]["latent_tokens"] = params["encoder"]["latent_tokens"].at[8].add(delta)
    out = encode(perturbed)
    np.testing.assert_allclose(np.asarray(out[:, :8]), np.asarray(base[:, :8]), atol=1e-6)
    assert not np.allclose(np.asarray(out[:, 8:]), np.asarray(base[:, 8:]))
    # The first causal tokens are token-causal: slot 2 does not affect slots 0, 1.
    perturbed["encoder"]["latent_tokens"] = params["encoder"]["latent_tokens"].at[2].add(delta)
    out = encode(perturbed)
    np.testing.assert_allclose(np.asarray(out[:, :2]), np.asarray(base[:, :2]), atol=1e-6)
    assert not np.allclose(np.asarray(out[:, 3]), np.asarray(base[:, 3]))


def test_prefix_decode_resolutions_and_masking():
    config, params = tiny()
    tok = df.DetailFlowTokenizer(config, params)
    idx = tok.encode(images())
    assert idx.shape == (2, 16) and idx.dtype == jnp.int32
    expected = {1: 8, 2: 8, 3: 8, 4: 16, 8: 24, 12: 32, 16: 32}
    assert {n: tok.resolutions.output_resolution(n) for n in tok.resolutions.prefix_lengths()} \
        == expected
    for n, size in expected.items():
        out = tok.decode(idx, num_tokens=n)
        assert out.shape == (2, size, size, 3) and out.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(out))) <= 1.0
    # One compiled decoder per output resolution, whatever the prefix length.
    assert tok._decode._cache_size() == len(set(expected.values()))
    # Masking slots >= t equals decoding only the first t codes (no padding at all).
    model = tok.model
    n = 4
    decode = jax.jit(lambda codes, t: model.apply({"params": params}, codes, t, 2,
                                                  method=df.DetailFlow.decode_indices))
    masked = decode(idx, n)
    unpadded = decode(idx[:, :n], n)
    np.testing.assert_allclose(np.asarray(masked), np.asarray(unpadded), atol=1e-5)
    # Slots past the prefix do not matter.
    other = decode(idx.at[:, n:].set(0), n)
    np.testing.assert_allclose(np.asarray(masked), np.asarray(other), atol=1e-6)
    # A prefix given directly, and an explicit output resolution.
    assert tok.decode(idx[:, :8]).shape == (2, 24, 24, 3)
    assert tok.decode(idx, num_tokens=2, resolution=32).shape == (2, 32, 32, 3)
    assert tok.reconstruct(images(), num_tokens=12).shape == (2, 32, 32, 3)


def test_tokenizer_input_errors():
    config, params = tiny()
    tok = df.DetailFlowTokenizer(config, params)
    with pytest.raises(ValueError, match="32x32"):
        tok.encode(images(size=16))
    with pytest.raises(ValueError, match="B, H, W, 3"):
        tok.encode(images()[0])
    idx = np.zeros((1, 16), np.int32)
    with pytest.raises(ValueError, match="num_tokens"):
        tok.decode(idx, num_tokens=17)
    with pytest.raises(ValueError, match="tokens per image"):
        tok.decode(np.zeros((1, 17), np.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        tok.decode(idx, resolution=20)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(idx + 64)
    with pytest.raises(ValueError, match="noise_idx"):
        tok.encode_self_correction(images(), 5)  # not a group start


@functools.lru_cache(maxsize=None)
def tiny_functions():
    """Jitted tiny-model functions shared by the tests (compiled once)."""
    config, params = tiny()
    model = df.model_from_config(config)
    correct = jax.jit(lambda x, i, r: model.apply({"params": params}, x, i, r,
                                                  method=df.DetailFlow.self_correction))
    clean = jax.jit(lambda x, r: model.apply({"params": params}, x, r,
                                             method=df.DetailFlow.encode))
    second = jax.jit(lambda x, q, e: model.apply(
        {"params": params}, x, q, e, method=lambda m, x, q, e: m.quantize(
            m.quant_conv(m.encoder(x, m.refine_conv(q), e)), loss_start=e)))
    return correct, clean, second


def run_self_correction(noise_idx, seed=1):
    config, params = tiny()
    correct, clean, _ = tiny_functions()
    x = jnp.asarray(images(2, seed=seed), jnp.float32) / 127.5 - 1
    ranks = jax.random.randint(jax.random.PRNGKey(seed), (2, 16), 0, 8)
    return config, params, df.model_from_config(config), x, ranks, correct(x, noise_idx, ranks), \
        clean(x, ranks)


@pytest.mark.parametrize("noise_idx", [0, 3, 4, 8, 12])
def test_self_correction_index_stack(noise_idx):
    config, params, model, x, ranks, out, clean = run_self_correction(noise_idx)
    count = 1 if noise_idx < config.model.causal_num else config.model.group_size
    end = noise_idx + count
    assert int(out.noise_end) == end
    idx = np.asarray(out.indices)
    assert idx.shape == (2, 16, 3) and idx.dtype == np.int32
    clean_idx = np.asarray(clean.indices)
    np.testing.assert_array_equal(idx[..., 0], clean_idx)
    # input: clean prefix, the drawn neighbours on the perturbed slots, pass 2 after.
    np.testing.assert_array_equal(idx[:, :noise_idx, 1], clean_idx[:, :noise_idx])
    np.testing.assert_array_equal(idx[:, noise_idx:end, 1],
                                  np.asarray(clean.neighbour_indices)[:, noise_idx:end])
    # label: clean up to noise_end, pass 2 after (shared with input there).
    np.testing.assert_array_equal(idx[:, :end, 2], clean_idx[:, :end])
    np.testing.assert_array_equal(idx[:, end:, 1], idx[:, end:, 2])
    # Codes: the clean prefix and perturbed slots are the (detached) pass-1 codes.
    quant, quant_clean = np.asarray(out.quant), np.asarray(out.quant_clean)
    np.testing.assert_allclose(quant[:, :noise_idx], quant_clean[:, :noise_idx], atol=1e-6)
    codebook = np.asarray(model.apply({"params": params}, idx[..., 1],
                                      method=lambda m, i: m.quantize.lookup(i)))
    np.testing.assert_allclose(quant, codebook, atol=1e-6)
    # Pass 2 = the encoder with refine_conv(perturbed prefix) then refined_tokens.
    refined = tiny_functions()[2](x, quant, end).indices
    np.testing.assert_array_equal(idx[:, end:, 2], np.asarray(refined)[:, end:])


def test_self_correction_losses_and_gradients():
    config, params, model, x, ranks, out, clean = run_self_correction(4)
    end, total = 8, 16
    second = tiny_functions()[2](x, out.quant, end)
    w1, w2 = total / (2 * total - end), (total - end) / (2 * total - end)
    np.testing.assert_allclose(float(out.codebook_loss),
                               w1 * float(clean.codebook_loss) + w2 * float(second.codebook_loss),
                               rtol=1e-5)
    np.testing.assert_allclose(
        float(out.commitment_loss),
        w1 * float(clean.commitment_loss) + w2 * float(second.commitment_loss), rtol=1e-5)

    # No gradient reaches pass 1 through the perturbed prefix: refine_conv gets gradient only
    # from pass 2, and the corrected prefix codes carry none.
    def corrected_prefix(p):
        o = model.apply({"params": p}, x, 4, ranks, method=df.DetailFlow.self_correction)
        return jnp.sum(o.quant[:, :end] ** 2)

    grads = jax.jit(jax.grad(corrected_prefix))(params)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads))


def test_noise_index_is_traced_once():
    config, params = tiny()
    tok = df.DetailFlowTokenizer(config, params)
    stacks = [tok.encode_self_correction(images(), i) for i in (0, 2, 4, 8)]
    assert tok._correct._cache_size() == 1
    assert all(s.shape == (2, 16, 3) for s in stacks)
    again = tok.encode_self_correction(images(), 4)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(stacks[2]))


def test_training_forward_and_alignment():
    config, params = tiny()
    model = df.model_from_config(config)
    x = jnp.asarray(images(), jnp.float32) / 127.5 - 1
    ranks = jnp.zeros((2, 16), jnp.int32)
    out = jax.jit(lambda x, r: model.apply({"params": params}, x, 8, r, 12, 3))(x, ranks)
    assert out["reconstructions"].shape == (4, 24, 24, 3)
    assert out["first_token"].shape == (2, 64)
    teacher = df.teacher_from_config(config)
    teacher_params = jax.tree.map(
        lambda s: jax.random.normal(jax.random.PRNGKey(1), s.shape) * 0.1,
        abstract_vit_params(config.model.teacher))
    target = jax.jit(lambda p, x: df.alignment_target(teacher, p, x))(teacher_params, x)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(target), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["first_token"]), axis=-1), 1.0,
                               rtol=1e-5)
    loss = df.alignment_loss(out["first_token"], target)
    np.testing.assert_allclose(
        float(loss), -np.mean(np.sum(np.asarray(out["first_token"]) * np.asarray(target), -1)),
        rtol=1e-5)


def test_bfloat16_compute_keeps_fp32_params():
    config, params = tiny()
    config = get_config("tiny")
    with config.unlocked():
        config.model.dtype = "bfloat16"
    abstract = df.init_params(config, jax.random.PRNGKey(0), abstract=True)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
    tok = df.DetailFlowTokenizer(config, params)
    out = tok.reconstruct(images(), num_tokens=16)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    with config.unlocked():
        config.model.dtype = "float16"
    with pytest.raises(ValueError, match="dtype"):
        df.model_from_config(config)


def test_load_tokenizer_from_model_dir(tmp_path):
    config, params = tiny()
    exported.save_model_dir(tmp_path / "tok", config, params)
    tok = api.load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, df.DetailFlowTokenizer)
    np.testing.assert_array_equal(np.asarray(tok.encode(images())),
                                  np.asarray(df.DetailFlowTokenizer(config, params)
                                             .encode(images())))


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_counts_df16():
    config = get_config("df16")
    params = df.init_params(config, jax.random.PRNGKey(0), abstract=True)
    assert _count(params["encoder"]) == 184_499_520
    assert _count(params["decoder"]) == 85_942_272
    small = sum(_count(params[k]) for k in ("quant_conv", "post_quant_conv", "refine_conv",
                                           "quantize"))
    assert small == 92_040
    assert _count(params["global_token_proj"]) == 2_239_616
    assert _count(abstract_vit_params(config.model.teacher)) == 412_649_712


@pytest.mark.parametrize("variant,tokens", [("df32", 256), ("df64", 512)])
def test_larger_variants(variant, tokens):
    config = get_config(variant)
    params = df.init_params(config, jax.random.PRNGKey(0), abstract=True)
    assert params["encoder"]["latent_tokens"].shape == (tokens, 1152)
    assert params["decoder"]["latent_pos_embed"].shape == (tokens, 768)


def test_config_variants():
    with pytest.raises(ValueError, match="unknown DetailFlow variant"):
        load_config(f"{CONFIG_FILE}:df8")
    assert get_config("df16").model.num_latent_tokens == 128
    assert load_config(CONFIG_FILE).variant == "df16"


def test_benchmark_runs_on_tiny():
    from tokenizers_jax import benchmark_detailflow

    config, params = tiny()
    config = get_config("tiny")
    with config.unlocked():
        config.benchmark.prefix_lengths = (1, 2, 16)
    result = benchmark_detailflow.run(config, params, batch_size=2, iterations=1)
    assert result["encode_images_per_second"] > 0 and result["compile_seconds"]["encode"] > 0
    assert result["decode_resolution"] == {1: 8, 2: 8, 16: 32}
    assert set(result["decode_images_per_second"]) == {1, 2, 16}
    assert set(result["compile_seconds"]["decode"]) == {8, 32}
    assert result["peak_host_rss_bytes"] > 0 and "peak_device_bytes" in result
    json.dumps(result)
