"""Conversion rules for CNNs whose Flax module tree mirrors the PyTorch module tree.

Used by the perceptual-network converters (lpips, resnet50, inception). Each Flax leaf
determines its PyTorch key: the module path is renamed by a per-network function and the
leaf name maps as

  Conv kernel [kh, kw, in, out]   <- weight [out, in, kh, kw]
  Dense kernel [in, out]          <- weight [out, in]
  bias                            <- bias
  FrozenBatchNorm scale/mean/var  <- weight/running_mean/running_var
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from tokenizers_jax import exported
from tokenizers_jax.convert.common import IDENTITY, LINEAR, Rule, Transform

# torch Conv2d weight OIHW <-> flax Conv kernel HWIO.
CONV = Transform(lambda a: np.transpose(a, (2, 3, 1, 0)), lambda a: np.transpose(a, (3, 2, 0, 1)))
_BATCH_NORM_LEAVES = {"scale": "weight", "mean": "running_mean", "var": "running_var"}


def is_batch_norm_counter(key: str) -> bool:
    """BatchNorm's `num_batches_tracked`: training bookkeeping, knowingly dropped."""
    return key.endswith(".num_batches_tracked")


def rules_from_template(
    template: Any, torch_module: Callable[[str], str] = lambda path: path.replace("/", ".")
) -> dict[str, Rule]:
    """One Rule per leaf of `template` (a params tree of arrays or ShapeDtypeStructs).

    Args:
      template: the Flax params tree.
      torch_module: a Flax module path ('layer1_0/conv1') -> its torch prefix ('layer1.0.conv1').
    Returns:
      torch key -> Rule.
    """
    rules = {}
    for path, leaf in traverse_util.flatten_dict(template).items():
        *module, leaf_name = path
        prefix = torch_module("/".join(module))
        if leaf_name == "kernel":
            rule = Rule("/".join(path), CONV if len(leaf.shape) == 4 else LINEAR)
            rules[f"{prefix}.weight"] = rule
        elif leaf_name in _BATCH_NORM_LEAVES:
            rules[f"{prefix}.{_BATCH_NORM_LEAVES[leaf_name]}"] = Rule("/".join(path), IDENTITY)
        elif leaf_name == "bias":
            rules[f"{prefix}.bias"] = Rule("/".join(path), IDENTITY)
        else:
            raise ValueError(f"no torch counterpart for parameter {'/'.join(path)}")
    return rules


def abstract_params(init: Callable[[jax.Array], Any]) -> Any:
    """The params tree of `init` as ShapeDtypeStructs (nothing is computed)."""
    return jax.eval_shape(init, jax.random.key(0))


def save_converted(output: str | os.PathLike, name: str, params: Any, **sources: str) -> None:
    """Writes a model directory whose config names the network and the source files."""
    config = ml_collections.ConfigDict(
        {
            "model": {"name": name},
            "source": {key: os.path.basename(os.fspath(value)) for key, value in sources.items()},
        }
    )
    exported.save_model_dir(output, config, params)
    count = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(params))
    print(f"wrote {name} ({count:,} parameters) to {os.path.abspath(os.fspath(output))}")
