"""tokenizers_jax: FlowMo and DetailFlow image tokenizers in JAX/Flax."""

from tokenizers_jax.api import Tokenizer, load_tokenizer, prepare_images, to_uint8

__all__ = ["Tokenizer", "load_tokenizer", "prepare_images", "to_uint8"]
