"""FlowMo transforms: torchvision Resize / RandomCrop / CenterCrop semantics on PIL images."""

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
    with pytest.raises(ValueError, match="unknown data transform 'adm'"):
        transforms.get_transform("adm")


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
