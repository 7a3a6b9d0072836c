"""Per-model image transforms on the host: uint8 HWC RGB in, uint8 [size, size, 3] out.

A transform is chosen by name (`data.transform` in the config) from `TRANSFORMS`. Each has a
random training variant and a deterministic evaluation variant. FlowMo's (spec 5) is
torchvision's `Resize(size)` (short side, PIL bilinear with antialiasing) followed by
`RandomCrop(size)` for training or `CenterCrop(size)` for evaluation; no flips.

DetailFlow's code extraction (spec 6.2, used by the token export) takes ADM's square centre
crop (`adm_center_crop`) at 1.1x the image size and then torchvision's `TenCrop` (`ten_crop`).

"adm" is the ADM (guided-diffusion) preprocessing DetailFlow trains and evaluates with (spec
5, 7): PIL BOX halving while the short side is at least twice the target, then a BICUBIC
resize of the short side to the target; for training the target short side is drawn from
U{ceil(S / 1.0) .. ceil(S / 0.8)} (256..320 at S = 256), followed by a random S crop and a
horizontal flip with probability 0.5; for evaluation the target is S and the crop central.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from PIL import Image


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes so the short side is `size`, as torchvision `T.Resize(size)` on a PIL image.

    The long side becomes `int(size * long / short)` (truncated); PIL's bilinear filter is
    antialiased on downscales. Images smaller than `size` are scaled up.

    Args:
      image: uint8 [H, W, 3].
    Returns:
      uint8 [size, W', 3] or [H', size, 3].
    """
    height, width = image.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    if (new_height, new_width) == (height, width):
        return image
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def _check_crop(image: np.ndarray, size: int) -> tuple[int, int]:
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {height}x{width}")
    return height, width


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly placed crop, as torchvision `RandomCrop`. [H, W, 3] -> [size, size, 3]."""
    height, width = _check_crop(image, size)
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image[top : top + size, left : left + size]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central crop, rounded as torchvision `CenterCrop`. [H, W, 3] -> [size, size, 3]."""
    height, width = _check_crop(image, size)
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image[top : top + size, left : left + size]


def flowmo_train(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """FlowMo training: resize short side to `size`, random crop. [H, W, 3] -> [size, size, 3]."""
    return np.ascontiguousarray(random_crop(resize_short_side(image, size), size, rng))


def flowmo_eval(image: np.ndarray, size: int) -> np.ndarray:
    """FlowMo evaluation: resize short side to `size`, centre crop. [H, W, 3] -> [size, size, 3]."""
    return np.ascontiguousarray(center_crop(resize_short_side(image, size), size))


def adm_resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """ADM's resize: BOX-halve while the short side is >= 2 * short_side, then BICUBIC to a
    short side of `short_side` (the other side `round(side * scale)`, Python rounding).

    Args:
      image: uint8 [H, W, 3].
    Returns:
      uint8 [H', W', 3] with min(H', W') == short_side.
    """
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * short_side:
        pil = pil.resize(tuple(side // 2 for side in pil.size), resample=Image.Resampling.BOX)
    scale = short_side / min(pil.size)
    pil = pil.resize(tuple(round(side * scale) for side in pil.size),
                     resample=Image.Resampling.BICUBIC)
    return np.asarray(pil)


def adm_short_side_range(size: int, min_crop_fraction: float = 0.8) -> tuple[int, int]:
    """The inclusive range of ADM's random short side: ceil(S / 1.0) .. ceil(S / 0.8)."""
    return math.ceil(size / 1.0), math.ceil(size / min_crop_fraction)


def adm_train(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """ADM random crop + horizontal flip (DetailFlow training). [H, W, 3] -> [size, size, 3]."""
    low, high = adm_short_side_range(size)
    resized = adm_resize_short_side(image, int(rng.integers(low, high + 1)))
    crop = random_crop(resized, size, rng)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def adm_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """ADM's square centre crop (guided-diffusion `center_crop_arr`; DetailFlow evaluation and
    code extraction): short side to `size`, then the crop at ((H - size) // 2, (W - size) // 2).
    [H, W, 3] -> [size, size, 3]."""
    resized = adm_resize_short_side(image, size)
    height, width = _check_crop(resized, size)
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def five_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision `FiveCrop` order: top-left, top-right, bottom-left, bottom-right, centre."""
    height, width = _check_crop(image, size)
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size)]
    crops = [image[top : top + size, left : left + size] for top, left in corners]
    return crops + [center_crop(image, size)]


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision `TenCrop` (horizontal flip): the five crops, then the five of the mirrored
    image (so crop 5 is the mirrored top-right corner). [H, W, 3] -> [10, size, size, 3]."""
    return np.stack(five_crop(image, size) + five_crop(image[:, ::-1], size))


@dataclasses.dataclass(frozen=True)
class Transform:
    """A model's training (random) and evaluation (deterministic) image transforms."""

    train: Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
    eval: Callable[[np.ndarray, int], np.ndarray]


TRANSFORMS: dict[str, Transform] = {
    "flowmo": Transform(train=flowmo_train, eval=flowmo_eval),
    "adm": Transform(train=adm_train, eval=adm_center_crop),
}


def get_transform(name: str) -> Transform:
    """Looks up a transform by its config name."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown data transform {name!r}; choose one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]
