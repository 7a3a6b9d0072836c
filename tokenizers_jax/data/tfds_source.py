"""Random access to prepared TFDS image datasets (array_record) without TensorFlow.

Reads through `tfds.data_source`; images are decoded by tfds on the host (with PIL, or
OpenCV when it is installed). A dataset that is not prepared in the array_record format is an
error saying how to prepare it once.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

IMAGENET_INSTRUCTIONS = """\
Prepare ImageNet (ILSVRC2012) once with tensorflow_datasets, in the array_record format:
  1. Register at https://image-net.org/download-images and download ILSVRC2012_img_train.tar
     (138 GiB) and ILSVRC2012_img_val.tar (6.3 GiB).
  2. Put both tars, unextracted, in the manual directory {data_dir}/downloads/manual/
  3. Build it (this one step needs TensorFlow: pip install tensorflow tensorflow-datasets,
     e.g. in a separate virtualenv):
       tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record
     or in Python:
       import tensorflow_datasets as tfds
       tfds.builder("imagenet2012", data_dir="{data_dir}").download_and_prepare(
           file_format="array_record")
  4. Train with --config.data.name=imagenet2012 --config.data.data_dir={data_dir}"""

GENERIC_INSTRUCTIONS = """\
Prepare it once (this step needs TensorFlow):
  tfds build {name} --data_dir={data_dir} --file_format=array_record"""


def prepare_instructions(name: str, data_dir: str) -> str:
    """How to prepare the TFDS dataset `name` in `data_dir` for `tfds.data_source`."""
    template = IMAGENET_INSTRUCTIONS if name == "imagenet2012" else GENERIC_INSTRUCTIONS
    return template.format(name=name, data_dir=data_dir)


def _rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] from [H, W, 3], or grayscale [H, W] / [H, W, 1]."""
    image = np.asarray(image)
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
    return image


class TfdsImageSource:
    """Random access to the images of one split of a TFDS dataset: item i is uint8 [H, W, 3].

    Args:
      name: TFDS dataset name, e.g. "imagenet2012".
      split: TFDS split, slicing allowed: "train", "validation[:1000]".
      data_dir: TFDS data directory; None for `$TFDS_DATA_DIR` or ~/tensorflow_datasets.
      image_key: the feature holding the image.
      label_key: the feature holding the class label (`read_labelled`, `label_names`).
    """

    def __init__(
        self, name: str, split: str, data_dir: str | None = None, image_key: str = "image",
        label_key: str = "label",
    ):
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        try:
            self._records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as err:
            builder = tfds.builder(name, data_dir=data_dir)
            if builder.is_prepared() and builder.info.file_format.value == "array_record":
                raise
            data_dir = data_dir or tfds.core.constants.get_default_data_dir()
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in the array_record format under "
                f"{builder.data_dir}.\n" + prepare_instructions(name, data_dir)
            ) from err

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> np.ndarray:
        return _rgb(self._records[index][self.image_key])

    @property
    def label_names(self) -> tuple[str, ...]:
        """The names of the class labels (the label feature's `names`)."""
        features = self._records.dataset_info.features
        if self.label_key not in features:
            raise ValueError(f"TFDS dataset {self.name!r} has no {self.label_key!r} feature")
        return tuple(features[self.label_key].names)

    def read_labelled(self, index: int) -> tuple[np.ndarray, int]:
        """(uint8 [H, W, 3], int label) of example `index`."""
        record = self._records[index]
        return _rgb(record[self.image_key]), int(record[self.label_key])

    def __repr__(self) -> str:
        return f"TfdsImageSource({self.name!r}, split={self.split!r}, {len(self)} images)"
