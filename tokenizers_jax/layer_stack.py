"""Two layouts of a model's repeated blocks, and the conversion between them.

Unrolled (the importers' layout and the default): one subtree per block, `NAME_0`, `NAME_1`,
...; stacked (a model built with `scan_layers`, its blocks run by `nn.scan`): one subtree
`NAME_scan` whose leaves carry a leading block axis, leaf[i] being block i's. The names are
the only difference, so that a checkpoint or a converter's output in one layout can be read
into a model of the other (`match_layout`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

SCAN_SUFFIX = "_scan"
_BLOCK = re.compile(r"^(.*)_(\d+)$")


def stacked_name(name: str) -> str:
    """The key of a stacked group of blocks: "double_blocks" -> "double_blocks_scan"."""
    return name + SCAN_SUFFIX


def is_stacked_path(path: tuple[Any, ...]) -> bool:
    """Whether a tree path (`jax.tree_util` keys) lies inside a stacked group of blocks."""
    return any(str(getattr(entry, "key", "")).endswith(SCAN_SUFFIX) for entry in path)


def _stack(leaves: list[Any]) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _index(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    return leaf[i]


def _blocks(tree: Mapping[str, Any], name: str) -> list[Any]:
    """tree[NAME_0], tree[NAME_1], ... (consecutive from 0)."""
    blocks = []
    while f"{name}_{len(blocks)}" in tree:
        blocks.append(tree[f"{name}_{len(blocks)}"])
    return blocks


def _leading_size(tree: Any) -> int | None:
    """The block count of a stacked subtree (None if its leaves have no shapes)."""
    shapes = [np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape
              for leaf in jax.tree.leaves(tree)]
    return shapes[0][0] if shapes and shapes[0] else None


def _check_depth(key: str, have: int | None, want: int | None):
    if have is not None and want is not None and have != want:
        raise ValueError(f"{key}: the tree holds {have} blocks, the target {want}; the two "
                         "layouts must have the same depth")


def match_layout(tree: Any, target: Any) -> Any:
    """`tree` with its blocks stacked or unstacked so that its keys are those of `target`.

    Args:
      tree: nested dicts of arrays (numpy or jax) or `jax.ShapeDtypeStruct`s.
      target: nested dicts with the wanted keys (any leaves: only the structure is read).
    Returns:
      `tree` itself where the layouts already agree; else a new tree (stacked leaves are new
      arrays; a NamedSharding gains or loses a replicated leading axis).
    Raises:
      KeyError: naming a key of `target` that `tree` holds in neither layout.
    """
    if not isinstance(target, Mapping) or not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, sub_target in target.items():
        if key in tree:
            out[key] = match_layout(tree[key], sub_target)
            continue
        block = _BLOCK.match(key)
        if key.endswith(SCAN_SUFFIX) and _blocks(tree, key[: -len(SCAN_SUFFIX)]):
            blocks = _blocks(tree, key[: -len(SCAN_SUFFIX)])
            _check_depth(key, len(blocks), _leading_size(sub_target))
            stacked = jax.tree.map(lambda *leaves: _stack(list(leaves)), *blocks)
            out[key] = match_layout(stacked, sub_target)
        elif block and stacked_name(block.group(1)) in tree:
            stacked = tree[stacked_name(block.group(1))]
            _check_depth(stacked_name(block.group(1)), _leading_size(stacked),
                         len(_blocks(target, block.group(1))))
            i = int(block.group(2))
            out[key] = match_layout(jax.tree.map(lambda leaf, i=i: _index(leaf, i), stacked),
                                    sub_target)
        else:
            raise KeyError(f"{key!r} is in neither layout of the given tree (its keys: "
                           f"{sorted(tree)[:12]})")
    if out.keys() == tree.keys() and all(out[k] is tree[k] for k in out):
        return tree
    return out
