"""Model directories: a config and one params pytree, as written by the converters.

Layout of a model directory DIR:
  DIR/config.json   the full ml_collections config (its `model.name` says which model)
  DIR/params/       an orbax checkpoint of the Flax params (fp32)

Training workdirs use a different layout (see `tokenizers_jax.training.checkpoint`);
`tokenizers_jax.load_tokenizer` reads both.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


def save_model_dir(directory: str | os.PathLike, config: ml_collections.ConfigDict, params: Any):
    """Writes `config` and `params` to a new model directory (refuses to overwrite one)."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(os.path.join(directory, PARAMS_DIR)):
        raise FileExistsError(
            f"{directory} already holds a model; choose a new --output directory or delete it"
        )
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config_to_json(config))


def is_model_dir(directory: str | os.PathLike) -> bool:
    directory = os.fspath(directory)
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isdir(
        os.path.join(directory, PARAMS_DIR)
    )


def load_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
    with open(os.path.join(os.fspath(directory), CONFIG_FILE)) as f:
        return config_from_json(f.read())


def load_params(directory: str | os.PathLike, target: Any | None = None) -> Any:
    """Restores the params of a model directory.

    Args:
      target: optional abstract tree (`jax.ShapeDtypeStruct`s with shardings) to restore onto
        a device mesh; by default arrays land on this process's first device.
    """
    path = os.path.join(os.path.abspath(os.fspath(directory)), PARAMS_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            metadata = checkpointer.metadata(path)
            tree = getattr(metadata, "item_metadata", metadata)
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree
            )
        return checkpointer.restore(path, target)
