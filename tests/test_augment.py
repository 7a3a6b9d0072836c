"""DiffAugment against a numpy re-statement of the original PyTorch formulas (NCHW, the pad-
and-clamp gather of `rand_translation`, the scattered mask of `rand_cutout`), given the same
random draws; and the batch-level coins of spec 5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers_jax import augment
from tokenizers_jax.augment import NORMAL, STRONG, AugmentPolicy

B, H, W, C = 4, 16, 12, 3


# --- the original's ops, re-stated in numpy on NCHW arrays ---------------------------------


def ref_brightness(x, r):
    return x + (r[:, None, None, None] - 0.5)


def ref_saturation(x, r):
    mean = x.mean(axis=1, keepdims=True)
    return (x - mean) * (r[:, None, None, None] * 2) + mean


def ref_contrast(x, r):
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * (r[:, None, None, None] + 0.5) + mean


def ref_translation(x, tx, ty):
    """tx shifts dim 2 (rows), ty dim 3 (columns), as in the original."""
    n, _, h, w = x.shape
    gb, gx, gy = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    gx = np.clip(gx + tx[:, None, None] + 1, 0, h + 1)
    gy = np.clip(gy + ty[:, None, None] + 1, 0, w + 1)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    return padded.transpose(0, 2, 3, 1)[gb, gx, gy].transpose(0, 3, 1, 2)


def ref_cutout(x, ox, oy, ratio):
    n, _, h, w = x.shape
    size = int(h * ratio + 0.5), int(w * ratio + 0.5)
    gb, gx, gy = np.meshgrid(np.arange(n), np.arange(size[0]), np.arange(size[1]), indexing="ij")
    gx = np.clip(gx + ox[:, None, None] - size[0] // 2, 0, h - 1)
    gy = np.clip(gy + oy[:, None, None] - size[1] // 2, 0, w - 1)
    mask = np.ones((n, h, w), x.dtype)
    mask[gb, gx, gy] = 0
    return x * mask[:, None]


def to_nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def to_nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (B, H, W, C)).astype(np.float32)


@pytest.fixture(scope="module")
def draws():
    return augment.draw_augment(jax.random.key(1), STRONG, B, H, W)


# One compilation for every coin combination: the coins are traced.
apply_jit = jax.jit(augment.apply_augment, static_argnums=2)


def test_color_ops_match_the_original(images, draws):
    x = to_nchw(images)
    for ours, ref, r in [
        (augment.brightness, ref_brightness, draws.brightness),
        (augment.saturation, ref_saturation, draws.saturation),
        (augment.contrast, ref_contrast, draws.contrast),
    ]:
        expected = to_nhwc(ref(x, np.asarray(r)))
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(images), r)), expected, atol=1e-6)


def test_translation_matches_the_original_at_every_shift(images):
    limit_h, limit_w = augment.translation_limit(H, 0.125), augment.translation_limit(W, 0.125)
    assert (limit_h, limit_w) == (2, 2)  # int(16 / 8 + 0.5), int(12 / 8 + 0.5)
    shifts = np.array([(dy, dx) for dy in range(-limit_h, limit_h + 1)
                       for dx in range(-limit_w, limit_w + 1)], np.int32)
    x = np.repeat(images[:1], len(shifts), axis=0)
    ours = np.asarray(augment.translate(jnp.asarray(x), jnp.asarray(shifts)))
    expected = to_nhwc(ref_translation(to_nchw(x), shifts[:, 0], shifts[:, 1]))
    np.testing.assert_array_equal(ours, expected)
    assert (ours[1] == 0).any() and not (ours[len(shifts) // 2] == 0).any()


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_cutout_matches_the_original_at_every_centre(images, ratio):
    side_h, side_w = augment.cutout_size(H, ratio), augment.cutout_size(W, ratio)
    centres = np.array([(cy, cx) for cy in range(H + 1 - side_h % 2)
                        for cx in range(W + 1 - side_w % 2)], np.int32)
    x = np.ones((len(centres), H, W, 1), np.float32) + images[:1, :, :, :1]
    ours = np.asarray(augment.cutout(jnp.asarray(x), jnp.asarray(centres), ratio))
    expected = to_nhwc(ref_cutout(to_nchw(x), centres[:, 0], centres[:, 1], ratio))
    np.testing.assert_array_equal(ours, expected)


def test_draw_ranges_match_the_original():
    draws = augment.draw_augment(jax.random.key(2), STRONG, 4096, H, W)
    shift, centre = np.asarray(draws.shift), np.asarray(draws.cutout_center)
    assert shift.min(0).tolist() == [-2, -2] and shift.max(0).tolist() == [2, 2]
    # cutout_0.5: sides 8 and 6 (even), so centres range over [0, H] and [0, W].
    assert centre.min(0).tolist() == [0, 0] and centre.max(0).tolist() == [H, W]
    for r in (draws.brightness, draws.saturation, draws.contrast):
        r = np.asarray(r)
        assert 0 <= r.min() < 0.01 and 0.99 < r.max() < 1 and len(np.unique(r)) > 4000


@pytest.mark.parametrize("coins", [(True, True, True), (False, True, False), (True, False, True),
                                   (False, False, False)])
def test_policy_composes_in_order_under_its_coins(images, draws, coins):
    draws = draws._replace(apply_color=jnp.array(coins[0]), apply_translation=jnp.array(coins[1]),
                           apply_cutout=jnp.array(coins[2]))
    policy = AugmentPolicy.parse("color,translation,cutout_0.2", probability=0.5)
    ours = np.asarray(apply_jit(images, draws, policy))
    x = to_nchw(images)
    if coins[0]:
        x = ref_contrast(ref_saturation(ref_brightness(x, np.asarray(draws.brightness)),
                                        np.asarray(draws.saturation)), np.asarray(draws.contrast))
    if coins[1]:
        x = ref_translation(x, np.asarray(draws.shift[:, 0]), np.asarray(draws.shift[:, 1]))
    if coins[2]:
        centre = np.asarray(draws.cutout_center)
        x = ref_cutout(x, centre[:, 0], centre[:, 1], 0.2)
    np.testing.assert_allclose(ours, to_nhwc(x), atol=1e-6)


def test_batch_level_coins_have_the_policy_probability(draws):
    def coins(key):
        d = augment.draw_augment(key, NORMAL, 1, H, W)
        return jnp.stack([d.apply_color, d.apply_translation, d.apply_cutout])

    normal = np.asarray(jax.jit(jax.vmap(coins))(jax.random.split(jax.random.key(3), 4000)))
    assert np.all(np.abs(normal.mean(0) - 0.5) < 0.04)
    assert abs(np.corrcoef(normal[:, 0], normal[:, 1])[0, 1]) < 0.06  # independent coins
    assert bool(draws.apply_color & draws.apply_translation & draws.apply_cutout)  # STRONG


def test_parse_and_errors():
    assert NORMAL == AugmentPolicy(color=True, translation=True, cutout=0.2, probability=0.5)
    assert STRONG == AugmentPolicy(color=True, translation=True, cutout=0.5, probability=1.0)
    assert AugmentPolicy.parse("cutout", 1.0).cutout == 0.5  # the original's default ratio
    with pytest.raises(ValueError, match="unknown DiffAugment sub-policy 'flip'"):
        AugmentPolicy.parse("color,flip", 0.5)
    with pytest.raises(ValueError, match="probability"):
        AugmentPolicy.parse("color", 1.5)


def test_diff_augment_is_traced_and_differentiable(images):
    """One compilation serves every key; gradients flow to the images."""
    fn = jax.jit(jax.value_and_grad(lambda x, key: augment.diff_augment(key, x, NORMAL).sum()))
    results = [fn(images, jax.random.key(k)) for k in range(6)]
    assert len({float(value) for value, _ in results}) > 1 and fn._cache_size() == 1
    grads = np.stack([np.asarray(grad) for _, grad in results])
    assert np.isfinite(grads).all() and np.abs(grads).sum() > 0
