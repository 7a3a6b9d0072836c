"""DetailFlow's GPT (spec 6): the group layout, the forward against a PyTorch reference on the
original's names, and parallel group decoding: the cached sampler against the full-recompute
reference path and the original's generation loop."""

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokenizers_jax.torch_reference.detailflow_gpt import TorchGPT, top_k_top_p_filtering  # noqa: E402

from tokenizers_jax import sampling  # noqa: E402
from tokenizers_jax.config_file import load_config  # noqa: E402
from tokenizers_jax.convert import detailflow_gpt as convert  # noqa: E402
from tokenizers_jax.models import gpt, group_decoding, group_layout  # noqa: E402
from tokenizers_jax.training.defaults import FSDP_RULES  # noqa: E402

CONFIG_FILE = "configs/detailflow_ar.py"
STATIC = ("top_k", "top_p", "gradual_cfg", "return_logits")


def random_params(config, seed=0):
    """Params whose every part matters (the init's zero output and 0.02 weights would make
    the logits constant): unit-variance activations, logits of a few units."""
    abstract = gpt.init_params(config, jax.random.PRNGKey(0), abstract=True)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif name.endswith("['kernel']"):
            gain = 1.5 if "output" in name else 1.0
            value = gain * rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])
        else:
            value = rng.standard_normal(leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def tiny():
    config = load_config(f"{CONFIG_FILE}:tiny")
    model = gpt.model_from_config(config)
    params = random_params(config)
    m = config.model
    reference = TorchGPT(convert.params_to_state_dict(params, config), num_tokens=m.num_tokens,
                         group_size=m.group_size, causal_num=m.causal_num,
                         num_heads=m.num_heads, num_classes=m.num_classes)
    return config, model, params, reference


@pytest.fixture(scope="module")
def cached_sampler(tiny):
    _, model, _, _ = tiny
    return jax.jit(functools.partial(group_decoding.sample_cached, model), static_argnames=STATIC)


@pytest.fixture(scope="module")
def full_recompute(tiny):
    return group_decoding.FullRecomputeSampler(tiny[1])


LABELS = np.array([0, 3, 9], np.int32)


def test_mask_entries_and_sequence_layout():
    g, c = 8, 8
    mask = np.asarray(group_layout.attention_mask(np.arange(128), 128, g, c))
    for p in range(8):  # the first group is token-causal
        assert mask[p].nonzero()[0].tolist() == list(range(p + 1))
    for p in (8, 13, 15, 16, 127):  # then whole groups, bidirectional inside
        assert mask[p].nonzero()[0].tolist() == list(range(8 * (p // 8 + 1)))
    # A query row of the cached sampler is the same row of the full mask.
    rows = np.asarray(group_layout.attention_mask(np.arange(40, 48), 128, g, c))
    np.testing.assert_array_equal(rows, mask[40:48])
    # The training sequence [cls ; t0..t7 ; spe0..6 ; t8..t119] (spec 6.2).
    token, placeholder = map(np.asarray, group_layout.input_slots(np.arange(128), g, c))
    assert token[0] == -1 and placeholder[0] == -1
    assert token[1:9].tolist() == list(range(8))
    assert placeholder[9:16].tolist() == list(range(7)) and (token[9:16] == -1).all()
    assert token[16:].tolist() == list(range(8, 120)) and (placeholder[16:] == -1).all()
    assert [group_layout.sequence_length(t, g, c) for t in (0, 7, 8, 16, 120)] == \
        [1, 8, 16, 24, 128]
    passes = group_layout.decoding_passes(128, g, c)
    assert len(passes) == 23 and passes[:8] == [(j, 1) for j in range(8)]
    assert passes[8] == (8, 8) and passes[-1] == (120, 8)


def test_rope_rows_are_offset_from_the_mask_groups():
    angles = group_layout.rope_angles(128, 8, 64, 10000.0)  # [128, 32]
    theta = 10000.0 ** (-np.arange(16) / 16)
    # Position p >= 1 sits at ((p - 1) // 8, (p - 1) % 8): position 8 is the last of RoPE row 0
    # although the mask puts it in group 1; position 9 starts row 1.
    np.testing.assert_allclose(angles[8], np.concatenate([0 * theta, 7 * theta]), rtol=1e-6)
    np.testing.assert_allclose(angles[9], np.concatenate([theta, 0 * theta]), rtol=1e-6)
    np.testing.assert_allclose(angles[127], np.concatenate([15 * theta, 6 * theta]), rtol=1e-6)
    assert np.asarray(group_layout.attention_mask(np.array([8]), 16, 8, 8))[0].sum() == 16
    with pytest.raises(ValueError, match="divisible by 4"):
        group_layout.rope_angles(16, 4, 18, 10000.0)


def test_gpt_l_parameter_count_and_sharding_names():
    config = load_config(f"{CONFIG_FILE}:df16")
    model = gpt.model_from_config(config)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *model.dummy_inputs(1))["params"]
    shapes = nn.unbox(boxed)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 326_140_928
    assert shapes["layers_0"]["feed_forward"]["w1"]["kernel"].shape == (1024, 2816)
    assert shapes["spe_embeddings"].shape == (7, 1024)
    assert shapes["cls_embedding"].shape == (1001, 1024)
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), FSDP_RULES)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    flat_specs = jax.tree.leaves(mesh_specs, is_leaf=is_spec)
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_specs) == len(flat_shapes)
    for spec, leaf in zip(flat_specs, flat_shapes):  # every matrix is FSDP-sharded
        assert len(spec) == leaf.ndim and ("fsdp" in tuple(spec)) == (leaf.ndim == 2), spec


@pytest.mark.parametrize("prefixes", [(12,), pytest.param((0, 3, 4, 8), marks=pytest.mark.slow)])
def test_forward_matches_torch_reference(tiny, prefixes):
    """The training forward (12 = N - g inputs; the samplers' prefixes are compared through
    the generation loop below, and directly in the slow variant)."""
    config, model, params, reference = tiny
    forward = jax.jit(lambda labels, tokens: model.apply({"params": params}, labels, tokens))
    labels = np.array([0, 9, 10], np.int32)  # 10 is the null class
    for num_inputs in prefixes:
        rng = np.random.default_rng(num_inputs)
        tokens = rng.integers(0, config.model.vocab_size, (3, num_inputs)).astype(np.int32)
        ours = np.asarray(forward(labels, tokens))
        theirs = reference.forward(labels, tokens).numpy()
        length = group_layout.sequence_length(num_inputs, 4, 4)
        assert ours.shape == theirs.shape == (3, length, 64)
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5 * np.abs(theirs).max(),
                                   err_msg=f"{num_inputs} inputs")
    # The quirks matter: a rotated (not zeroed) cls row, or RoPE rows aligned with the mask
    # groups, would give other logits.
    for ablate in ("cls_rotated", "rows_aligned"):
        ablated = copy.copy(reference)
        ablated.table = reference.table.clone()
        if ablate == "cls_rotated":
            ablated.table[0, :, 0] = 1.0  # angle 0: cos 1, sin 0
        else:
            ablated.table[1:-1] = reference.table[2:]  # position p >= 1 at (p // g, p % g)
        assert not np.allclose(ablated.forward(labels, tokens).numpy(), theirs, atol=1e-3), ablate


def test_training_forward_dropout_and_label_drop(tiny):
    config, model, params, _ = tiny
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
    labels = jnp.array([2, 5])
    key = jax.random.PRNGKey(0)
    assert (model.token_dropout, model.resid_dropout, model.ffn_dropout,
            model.class_dropout) == (0.1, 0.1, 0.1, 0.1)
    quiet = model.clone(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def forward(module, deterministic, labels, key):
        return module.apply({"params": params}, labels, tokens, deterministic=deterministic,
                            rngs={"dropout": key})

    clean = forward(model, True, labels, key)
    assert clean.shape == (2, 16, 64) and clean.dtype == jnp.float32
    # Label drop alone (probability 1): the null class.
    dropped = forward(quiet.clone(class_dropout=1.0), False, labels, key)
    np.testing.assert_allclose(dropped, forward(model, True, jnp.full_like(labels, 10), key),
                               rtol=1e-6, atol=1e-6)
    # Token, residual and FFN dropout with label drop: random per key, reproducible.
    train = functools.partial(forward, model, False, labels)
    np.testing.assert_array_equal(train(key), train(key))
    assert not np.allclose(train(key), train(jax.random.PRNGKey(1)))
    assert not np.allclose(train(key), clean)
    with pytest.raises(ValueError, match="at most"):
        model.apply({"params": params}, labels, jnp.zeros((2, 13), jnp.int32))


SETTINGS = {
    "default": dict(cfg=1.5, temperature=1.0),
    "filtered": dict(cfg=2.0, temperature=0.8, top_k=20, top_p=0.9, gradual_cfg=True),
}
# The filtered settings compile another sampler; their pieces are tested apart by default.
SETTING_NAMES = ["default", pytest.param("filtered", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def cached_results(tiny, cached_sampler):
    _, _, params, _ = tiny
    keys = sampling.sample_keys(7, 0, len(LABELS))
    results = {}

    def get(name):
        if name not in results:
            results[name] = cached_sampler(params, LABELS, keys, return_logits=True,
                                           **SETTINGS[name])
        return results[name]

    return get


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_cached_sampler_equals_full_recompute(tiny, full_recompute, cached_results, name):
    _, _, params, _ = tiny
    tokens, logits = cached_results(name)
    keys = sampling.sample_keys(7, 0, len(LABELS))
    ref_tokens, ref_logits = full_recompute(params, LABELS, keys, return_logits=True,
                                            **SETTINGS[name])
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref_tokens))
    scale = np.abs(np.asarray(ref_logits)).max()
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * scale)
    # The draws are random: rows and samples differ.
    assert len({tuple(row) for row in np.asarray(tokens).tolist()}) == len(LABELS)
    assert len(np.unique(np.asarray(tokens))) > 16


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_cached_logits_are_the_original_generation_loop(tiny, cached_results, name):
    """Teacher-forced with our tokens, the original's generate_group_par (full prefix re-run,
    CFG batch [cond ; null], gradual scale) guides every token from the same logits."""
    _, _, _, reference = tiny
    tokens, logits = cached_results(name)
    settings = SETTINGS[name]
    theirs = reference.guided_generation_logits(
        LABELS, np.asarray(tokens), settings["cfg"], settings.get("gradual_cfg", False)).numpy()
    np.testing.assert_allclose(logits, theirs, rtol=2e-5, atol=2e-5 * np.abs(theirs).max())


def test_gradual_cfg_scales():
    scale = lambda first: float(group_decoding.guidance_scale(1.5, first, True, 128, 8, 8))
    assert scale(3) == 1.5  # the first group keeps the full scale
    assert scale(8) == pytest.approx(1.5 * 16 / 17) and scale(120) == pytest.approx(1.5 * 2 / 17)
    assert float(group_decoding.guidance_scale(1.5, 120, False, 128, 8, 8)) == 1.5


@pytest.mark.parametrize("top_k,top_p", [(0, 0.7), (5, 1.0), (7, 0.5), (64, 0.95)])
def test_filter_logits_matches_torch(top_k, top_p):
    logits = np.random.default_rng(top_k).standard_normal((3, 2, 64)).astype(np.float32) * 2
    ours = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k, top_p))
    theirs = top_k_top_p_filtering(torch.from_numpy(logits.reshape(6, 64)), top_k,
                                   top_p).numpy().reshape(3, 2, 64)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    assert np.isinf(ours).any() and (~np.isinf(ours)).sum(-1).min() >= 1
    np.testing.assert_array_equal(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)])


def test_draw_follows_the_tempered_distribution():
    logits = jnp.log(jnp.array([[[0.1, 0.2, 0.3, 0.4]]]))
    keys = sampling.sample_keys(0, 0, 20000)
    tokens = sampling.draw(keys, jnp.broadcast_to(logits, (20000, 1, 4)), 0.5)
    expected = np.array([1, 4, 9, 16]) / 30  # p^(1/T), T = 0.5
    np.testing.assert_allclose(np.bincount(np.asarray(tokens).ravel(), minlength=4) / 20000,
                               expected, atol=0.012)


def test_sample_keys_follow_the_generator_rule():
    keys = np.asarray(sampling.sample_keys(3, 5, 2))
    for i in range(2):
        np.testing.assert_array_equal(keys[i],
                                      jax.random.fold_in(jax.random.PRNGKey(3), 5 + i))


@pytest.mark.slow
def test_longer_token_causal_prefix(tiny):
    """causal_num = 2g: the first 8 tokens one by one, then groups 2 and 3."""
    config, model, params, _ = tiny
    model = model.clone(causal_num=8)
    keys = sampling.sample_keys(1, 0, len(LABELS))
    sample = jax.jit(functools.partial(group_decoding.sample_cached, model),
                     static_argnames=STATIC)
    tokens, logits = sample(params, LABELS, keys, 1.5, 1.0, return_logits=True)
    ref_tokens, ref_logits = group_decoding.FullRecomputeSampler(model)(
        params, LABELS, keys, 1.5, 1.0, return_logits=True)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref_tokens))
    torch_model = TorchGPT(convert.params_to_state_dict(params, config), num_tokens=16,
                           group_size=4, causal_num=8, num_heads=2, num_classes=10)
    theirs = torch_model.guided_generation_logits(LABELS, np.asarray(tokens), 1.5).numpy()
    for ours in (logits, ref_logits):
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5 * np.abs(theirs).max())
