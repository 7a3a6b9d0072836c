"""Token export configs (python -m tokenizers_jax.export_tokens): which images, which options.

Variants:
  imagenet  (default) ImageNet train via TFDS array_record: --config.data.data_dir=DIR.
  folder    an image folder: --config.data.path=DIR (class = first directory below DIR).
  photos    the built-in sample photos (7 photos, 64 crops each): the CPU quickstart.

The image size is the tokenizer's. Sections: `data` (see tokenizers_jax.data.config) and
`export` (see tokenizers_jax.token_export.default_export_config), e.g.
--config.export.batch_size=256 --config.export.hflip=True --config.export.split=eval.
"""

import ml_collections

from tokenizers_jax.data import default_data_config
from tokenizers_jax.token_export import default_export_config


def get_config(arg: str = "imagenet") -> ml_collections.ConfigDict:
    variants = ("imagenet", "folder", "photos")
    if arg not in variants:
        raise ValueError(f"unknown export variant {arg!r}; choose one of {variants}")
    config = ml_collections.ConfigDict()
    config.variant = arg
    config.data = default_data_config()
    config.export = default_export_config()
    if arg == "imagenet":
        config.data.name = "imagenet2012"
    elif arg == "folder":
        config.data.name = "image_folder"
    else:
        config.data.name = "sample_photos"
        config.data.crops_per_photo = 64
        config.export.update(batch_size=8, examples_per_shard=64)
    return config
