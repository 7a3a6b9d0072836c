"""The image transforms: FlowMo's torchvision Resize / RandomCrop / CenterCrop semantics and
DetailFlow's ADM random crop (BOX halving + BICUBIC with PIL, random crop, hflip)."""

import numpy as np
import pytest
from PIL import Image

from tokenizers_jax.data import transforms


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "height, width, size, expected_hw",
    [
        (300, 451, 256, (256, 384)),  # landscape downscale: long = int(256 * 451 / 300)
        (451, 300, 256, (384, 256)),  # portrait
        (20, 30, 64, (64, 96)),  # smaller than the crop: scaled up
        (33, 33, 16, (16, 16)),
    ],
)
def test_resize_short_side_matches_pil_bilinear(height, width, size, expected_hw):
    image = _image(height, width)
    resized = transforms.resize_short_side(image, size)
    expected = np.asarray(
        Image.fromarray(image).resize(expected_hw[::-1], Image.Resampling.BILINEAR)
    )
    assert resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, expected)


def test_resize_short_side_keeps_image_already_at_size():
    image = _image(32, 50)
    assert transforms.resize_short_side(image, 32) is image


def test_center_crop_rounds_like_torchvision():
    image = np.arange(5 * 8 * 3, dtype=np.uint8).reshape(5, 8, 3)
    # torchvision: top = int(round((5 - 2) / 2)) = 2, left = int(round((8 - 2) / 2)) = 3.
    np.testing.assert_array_equal(transforms.center_crop(image, 2), image[2:4, 3:5])


def test_random_crop_is_seeded_and_in_bounds():
    image = _image(40, 60)
    crop_a = transforms.random_crop(image, 32, np.random.default_rng(1))
    crop_b = transforms.random_crop(image, 32, np.random.default_rng(1))
    np.testing.assert_array_equal(crop_a, crop_b)
    assert crop_a.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="cannot crop 64x64"):
        transforms.random_crop(image, 64, np.random.default_rng(0))


def test_flowmo_transforms_give_square_uint8():
    flowmo = transforms.get_transform("flowmo")
    image = _image(30, 70)
    train = flowmo.train(image, 24, np.random.default_rng(0))
    evaluation = flowmo.eval(image, 24)
    assert train.shape == evaluation.shape == (24, 24, 3)
    assert train.dtype == evaluation.dtype == np.uint8
    expected_eval = transforms.center_crop(transforms.resize_short_side(image, 24), 24)
    np.testing.assert_array_equal(evaluation, expected_eval)


def test_unknown_transform_is_an_error():
    with pytest.raises(ValueError, match="unknown data transform 'admm'"):
        transforms.get_transform("admm")


@pytest.mark.parametrize(
    "height, width, size, resizes, box",
    [
        # 100 -> 50 (>= 2 * 20, box-halved twice), then bicubic to short side 20.
        (100, 150, 20, [((75, 50), "box"), ((37, 25), "box"), ((30, 20), "bicubic")],
         (5, 0, 25, 20)),
        # DetailFlow at 256: a 300 x 451 photo to 281 = int(1.1 * 256), no halving.
        (300, 451, 281, [((422, 281), "bicubic")], (70, 0, 351, 281)),
        # Python rounding (ADM): 14 * 0.75 = 10.5 rounds to 10, not 11.
        (8, 14, 6, [((10, 6), "bicubic")], (2, 0, 8, 6)),
        # Portrait, upscaled.
        (21, 13, 16, [((16, 26), "bicubic")], (0, 5, 16, 21)),
    ],
)
def test_adm_center_crop_matches_a_pil_restatement(height, width, size, resizes, box):
    image = _image(height, width)
    pil = Image.fromarray(image)
    filters = {"box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}
    for shape, name in resizes:
        pil = pil.resize(shape, filters[name])
    expected = np.asarray(pil.crop(box))
    np.testing.assert_array_equal(transforms.adm_center_crop(image, size), expected)


def test_ten_crop_is_torchvision_order_with_pil_boxes():
    image = _image(35, 38)
    size = 32
    pil = Image.fromarray(image)
    mirrored = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # torchvision FiveCrop boxes (left, top, right, bottom): tl, tr, bl, br, centre with
    # offsets int(round((38 - 32) / 2)) = 3 and int(round((35 - 32) / 2)) = 2 (round-half-even).
    boxes = [(0, 0, 32, 32), (6, 0, 38, 32), (0, 3, 32, 35), (6, 3, 38, 35), (3, 2, 35, 34)]
    expected = [np.asarray(pil.crop(b)) for b in boxes] + [
        np.asarray(mirrored.crop(b)) for b in boxes]
    crops = transforms.ten_crop(image, size)
    assert crops.shape == (10, size, size, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops, np.stack(expected))
    # The mirrored image's top-left crop is the mirror of the top-right one.
    np.testing.assert_array_equal(crops[5], crops[1][:, ::-1])


def _pil_adm_resize(image, short_side):
    """ADM's resize re-stated with PIL: halve with BOX while possible, then BICUBIC."""
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * short_side:
        pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.BOX)
    scale = short_side / min(pil.size)
    size = (round(pil.size[0] * scale), round(pil.size[1] * scale))
    return np.asarray(pil.resize(size, resample=Image.BICUBIC))


@pytest.mark.parametrize("height, width, short_side, expected_hw", [
    (300, 451, 256, (256, 385)),  # no halving: 300 < 512; round(451 * 256 / 300) = 385
    (1100, 700, 320, (503, 320)),  # one BOX halving to 550 x 350, then bicubic
    (1100, 700, 150, (236, 150)),  # two halvings (700 -> 350 -> 175)
    (40, 50, 64, (64, 80)),  # upscale
])
def test_adm_resize_matches_pil(height, width, short_side, expected_hw):
    image = _image(height, width, seed=height)
    resized = transforms.adm_resize_short_side(image, short_side)
    assert resized.shape[:2] == expected_hw and resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, _pil_adm_resize(image, short_side))
    # BOX halving then bicubic is not one bicubic resize (guards the comparison).
    if min(height, width) >= 2 * short_side:
        direct = np.asarray(Image.fromarray(image).resize(expected_hw[::-1], Image.BICUBIC))
        assert np.abs(direct.astype(int) - resized).max() > 0


def _replay_adm_train(image, size, seed):
    """ADM training by hand: short side, crop, flip, in that order of draws."""
    rng = np.random.default_rng(seed)
    side = int(rng.integers(size, int(np.ceil(size / 0.8)) + 1))
    resized = _pil_adm_resize(image, side)
    top = int(rng.integers(0, resized.shape[0] - size + 1))
    left = int(rng.integers(0, resized.shape[1] - size + 1))
    flip = rng.random() < 0.5
    crop = resized[top:top + size, left:left + size]
    return (crop[:, ::-1] if flip else crop), side, flip


def test_adm_train_draws_short_side_crop_and_flip():
    assert transforms.adm_short_side_range(256) == (256, 320)
    assert transforms.adm_short_side_range(32) == (32, 40)
    adm = transforms.get_transform("adm")
    image = _image(60, 90)
    sides, flips = set(), []
    for seed in range(30):
        out = adm.train(image, 32, np.random.default_rng(seed))
        expected, side, flip = _replay_adm_train(image, 32, seed)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)
        sides.add(side)
        flips.append(flip)
    assert len(sides) >= 5 and 5 < sum(flips) < 25


def test_adm_eval_is_the_adm_centre_crop():
    image = _image(70, 101)
    out = transforms.get_transform("adm").eval(image, 32)
    resized = _pil_adm_resize(image, 32)  # 70 >= 64: one halving to 35 x 50, then 32 x 46
    assert resized.shape[:2] == (32, 46)
    np.testing.assert_array_equal(out, resized[0:32, 7:39])
