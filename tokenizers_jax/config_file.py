"""Loading `configs/<model>.py[:variant]` files outside absl (converters, notebooks, tests)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads "path/to/config.py[:variant]" by calling its `get_config(variant)`.

    Without a variant, `get_config()` picks the file's default.
    """
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path} (from --config={spec})")
    module_spec = importlib.util.spec_from_file_location(
        f"_tokenizers_jax_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg) function")
    config = module.get_config(variant) if variant else module.get_config()
    config.lock()
    return config
