"""Input pipelines (grain, no TensorFlow at run time): sources, per-model transforms, batching.

    config.data = default_data_config()
    train_iter = make_train_iterator(config.data, global_batch_size=128)   # endless
    batch = next(train_iter)                                  # {"image": uint8 [L, S, S, 3]}
    for batch in make_eval_iterator(config.data, global_batch_size=128):  # one pass
        ...                                  # {"image": uint8 [L, S, S, 3], "mask": bool [L]}

See `pipeline` for the batch layout over processes and for checkpointing the training
iterator with orbax, and `tokens` for exported token datasets (`data.name = "tokens"`).
"""

from tokenizers_jax.data.config import default_data_config
from tokenizers_jax.data.image_folder import ImageFolderSource
from tokenizers_jax.data.pipeline import (
    local_batch_size,
    make_eval_iterator,
    make_source,
    make_train_iterator,
)
from tokenizers_jax.data.sample_photos import SamplePhotosSource
from tokenizers_jax.data.tfds_source import TfdsImageSource
from tokenizers_jax.data.tokens import TokenSource
from tokenizers_jax.data.transforms import TRANSFORMS, get_transform

__all__ = [
    "ImageFolderSource",
    "SamplePhotosSource",
    "TRANSFORMS",
    "TfdsImageSource",
    "TokenSource",
    "default_data_config",
    "get_transform",
    "local_batch_size",
    "make_eval_iterator",
    "make_source",
    "make_train_iterator",
]
