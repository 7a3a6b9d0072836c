"""Built-in data: random crops of the colour photographs that ship inside scikit-image.

Needs nothing downloaded. The photos are split once and for all:

- train (7): astronaut, coffee, hubble_deep_field, immunohistochemistry (ihc), retina, and the
  stereo pair motorcycle_left / motorcycle_right (kept together: they are near-duplicates);
- eval (2, held out): chelsea (the cat) and rocket.

Item i of a source is a square crop of photo `i % num_photos` whose side is uniform in
[min_crop_fraction, 1] x the photo's short side and whose position is uniform; the crop is
a deterministic function of (seed, i). The model's transform then resizes it to the image
size, so one photo yields crops at many positions and scales: a training epoch of
`crops_per_photo` crops per photo, and a fixed evaluation set from a fixed seed.

Labels (for class-conditional models on exported tokens): item i is labelled with its photo's
position in the split, `i % num_photos`; `label_names` are the photo names without extension.
"""

from __future__ import annotations

import functools
import importlib.resources
import os

import numpy as np

from tokenizers_jax.data.image_folder import read_rgb

TRAIN_PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
)
EVAL_PHOTOS = ("chelsea.png", "rocket.jpg")
PHOTOS = {"train": TRAIN_PHOTOS, "eval": EVAL_PHOTOS}
# The evaluation crops are the same in every run, whatever the training seed.
EVAL_SEED = 0


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """A photo from scikit-image's data directory (cached per process). Returns uint8 [H, W, 3]."""
    with (importlib.resources.files("skimage.data") / name).open("rb") as file:
        return read_rgb(file)


class SamplePhotosSource:
    """Random access to deterministic random crops: item i is uint8 [s, s, 3].

    Args:
      split: "train" or "eval" (the held-out photos).
      crops_per_photo: items per photo, so len = crops_per_photo * number of photos.
      min_crop_fraction: smallest crop side as a fraction of the photo's short side, in (0, 1].
      seed: seeds the crops (use `EVAL_SEED` for evaluation).
    """

    def __init__(self, split: str, crops_per_photo: int, min_crop_fraction: float, seed: int):
        if split not in PHOTOS:
            raise ValueError(f"sample_photos split must be one of {sorted(PHOTOS)}, got {split!r}")
        if crops_per_photo < 1:
            raise ValueError(f"crops_per_photo must be positive, got {crops_per_photo}")
        if not 0 < min_crop_fraction <= 1:
            raise ValueError(f"min_crop_fraction must be in (0, 1], got {min_crop_fraction}")
        self.photos = PHOTOS[split]
        self.crops_per_photo = crops_per_photo
        self.min_crop_fraction = min_crop_fraction
        self.seed = seed
        self.label_names = tuple(os.path.splitext(name)[0] for name in self.photos)

    def __len__(self) -> int:
        return self.crops_per_photo * len(self.photos)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sample-photo crops")
        photo = load_photo(self.photos[index % len(self.photos)])
        rng = np.random.default_rng((self.seed, index))
        height, width = photo.shape[:2]
        short = min(height, width)
        side = int(rng.integers(max(1, round(self.min_crop_fraction * short)), short + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        return photo[top : top + side, left : left + side]

    def read_labelled(self, index: int) -> tuple[np.ndarray, int]:
        """(uint8 [s, s, 3] crop, label): the label is the photo's index in the split."""
        return self[index], index % len(self.photos)

    def __repr__(self) -> str:
        return f"SamplePhotosSource({list(self.photos)}, {len(self)} crops, seed={self.seed})"
