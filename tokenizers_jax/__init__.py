"""tokenizers_jax: FlowMo and DetailFlow image tokenizers, and the generators on their tokens,
in JAX/Flax."""

from tokenizers_jax.api import (Generator, Tokenizer, load_generator, load_tokenizer,
                                prepare_images, to_uint8)

__all__ = ["Generator", "Tokenizer", "load_generator", "load_tokenizer", "prepare_images",
           "to_uint8"]
