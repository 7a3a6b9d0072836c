"""A stand-in `api.Generator` for the sampling and generation-evaluation tests.

`RandomTokenGenerator` draws every token of a tiny DetailFlow tokenizer from per-class random
logits with the per-sample keys of the Generator contract, and decodes with the tokenizer.
`save_generator` writes it as a model directory that `api.load_generator` loads once the
test registers it (`register(monkeypatch)`).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import tokenizers_jax
from tokenizers_jax import api, exported
from tokenizers_jax.models import detailflow

from test_detailflow import get_config as detailflow_config, random_params

MODEL_NAME = "random_tokens"


class RandomTokenGenerator(api.Generator):
    """Tokens ~ categorical(class_logits[label] / temperature), each sample from its own key."""

    def __init__(self, config, params, tokenizer):
        super().__init__(config, params, tokenizer)

        def sample(params, labels, keys, temperature):  # [B], [B] keys -> int32 [B, L]
            logits = params["class_logits"][labels] / temperature  # [B, L, V]
            return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

        self._sample = jax.jit(sample)

    def check_tokenizer(self, tokenizer):
        model = tokenizer.config.model
        if model.name != "detailflow":
            raise ValueError(f"this generator makes DetailFlow tokens, not {model.name} ones")
        if model.codebook_size != self.config.model.codebook_size:
            raise ValueError(f"the tokenizer's codebook has {model.codebook_size} entries; the "
                             f"generator's {self.config.model.codebook_size}")

    def generate(self, labels, seed=0, first_index=0, **sampling):
        labels = self.check_labels(labels)
        unknown = sorted(set(sampling) - set(self.config.sampler))
        if unknown:
            raise ValueError(f"unknown sampling fields {unknown}; known: "
                             f"{sorted(self.config.sampler)}")
        settings = {**self.config.sampler.to_dict(), **sampling}
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(
            first_index + jnp.arange(len(labels)))
        return self._sample(self.params, labels, keys, jnp.float32(settings["temperature"]))

    def decode(self, indices, seed=0, first_index=0):
        return self.tokenizer.decode(indices)


def tiny_detailflow(directory):
    """A random-weight one-block `tiny` DetailFlow (32 px, 16 tokens, 64 codes) in `directory`."""
    config = detailflow_config("tiny")
    config.unlock()
    config.model.encoder.depth = config.model.decoder.depth = 1
    params = random_params(detailflow.init_params(config, jax.random.PRNGKey(0), abstract=True))
    exported.save_model_dir(directory, config, params)
    return str(directory)


def generator_config(num_classes=4, codebook_size=64, tokens=16):
    return ml_collections.ConfigDict(dict(
        model=dict(name=MODEL_NAME, num_classes=num_classes, codebook_size=codebook_size,
                   tokens=tokens),
        sampler=dict(temperature=1.0, cfg=1.0)))


def generator_params(config, seed=0):
    m = config.model
    rng = np.random.default_rng(seed)
    return {"class_logits": jnp.asarray(
        3 * rng.standard_normal((m.num_classes, m.tokens, m.codebook_size)), jnp.float32)}


def save_generator(directory, seed=0, **config_fields):
    config = generator_config(**config_fields)
    exported.save_model_dir(directory, config, generator_params(config, seed))
    return str(directory)


def register(monkeypatch):
    monkeypatch.setitem(api.GENERATORS, MODEL_NAME, "generation_fixtures:RandomTokenGenerator")


def random_token_generator(directory) -> RandomTokenGenerator:
    """A stand-in generator of the default `generator_config` over a tiny DetailFlow written
    to `directory`."""
    tokenizer = tokenizers_jax.load_tokenizer(tiny_detailflow(directory))
    config = generator_config()
    return RandomTokenGenerator(config, generator_params(config), tokenizer)
