"""Reference batches for the generation evaluation:
python -m tokenizers_jax.evaluate_generation reference --config=configs/generation_reference.py

Variants:
  imagenet  (default) ImageNet train via TFDS array_record (--config.data.data_dir=DIR), ADM
            centre crop at 256 (the preprocessing of ADM's ImageNet training data).
  folder    an image folder (--config.data.path=DIR), ADM centre crop at 256.
  photos    the built-in sample photos at 32 px (56 crops): the CPU smoke test of the tiny
            generators.

Sections: `data` (see tokenizers_jax.data.config; its evaluation transform is applied) and
`reference` (see tokenizers_jax.generation_evaluation.default_reference_config), e.g.
--config.reference.split=eval --config.reference.keep_images=10000.
"""

import ml_collections

from tokenizers_jax.data import default_data_config
from tokenizers_jax.generation_evaluation import default_reference_config


def get_config(arg: str = "imagenet") -> ml_collections.ConfigDict:
    variants = ("imagenet", "folder", "photos")
    if arg not in variants:
        raise ValueError(f"unknown reference variant {arg!r}; choose one of {variants}")
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.data = default_data_config()
    config.data.update(transform="adm", image_size=256)
    config.reference = default_reference_config()
    if arg == "imagenet":
        config.data.name = "imagenet2012"
    elif arg == "folder":
        config.data.name = "image_folder"
    else:
        config.data.update(name="sample_photos", image_size=32, crops_per_photo=8)
    return config
