"""Shared fixtures: small FlowMo configs that compile quickly on a 2-core CPU."""

import pytest

from tokenizers_jax.config_file import load_config


def small_flowmo_config(image_size: int = 16):
    """configs/flowmo.py:tiny shrunk to one block per trunk (unlocked, for tests to edit)."""
    config = load_config("configs/flowmo.py:tiny")
    config.unlock()
    config.model.image_size = image_size
    config.model.code_length = 8
    config.model.encoder.depth = 1
    config.model.decoder.depth = 1
    config.sampler.steps = 4
    return config


@pytest.fixture
def flowmo_small_config():
    return small_flowmo_config()
