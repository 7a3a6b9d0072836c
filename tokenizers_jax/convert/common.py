"""Strict conversion between PyTorch state dicts and our Flax parameter trees.

A converter is a table of `Rule`s, one per PyTorch key: the path of the Flax parameter it
fills and the array transform (and its inverse, for export and round-trip tests). Conversion
checks both directions: every PyTorch key must be consumed, every Flax parameter filled, every
shape must match; anything else is a `ConversionError` naming the offending keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

Array = np.ndarray
StateDict = Mapping[str, Array]


class ConversionError(ValueError):
    """A state dict does not match the model it is being converted into."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """A torch -> flax array transform and its inverse."""

    forward: Callable[[Array], Array]
    inverse: Callable[[Array], Array]


IDENTITY = Transform(lambda a: a, lambda a: a)
# nn.Linear weight [out, in] <-> Dense kernel [in, out].
LINEAR = Transform(lambda a: a.T, lambda a: a.T)


def squeeze_leading(ndim_added: int) -> Transform:
    """Drops `ndim_added` leading size-1 axes (e.g. torch (1, N, D) tokens -> (N, D))."""
    return Transform(
        lambda a: a.reshape(a.shape[ndim_added:]),
        lambda a: a.reshape((1,) * ndim_added + a.shape),
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one PyTorch tensor goes: a '/'-separated Flax path and a transform."""

    target: str
    transform: Transform = IDENTITY


def linear_rules(torch_prefix: str, flax_prefix: str, bias: bool = True) -> dict[str, Rule]:
    """Rules for one nn.Linear -> our Dense (kernel transposed)."""
    rules = {f"{torch_prefix}.weight": Rule(f"{flax_prefix}/kernel", LINEAR)}
    if bias:
        rules[f"{torch_prefix}.bias"] = Rule(f"{flax_prefix}/bias")
    return rules


def layer_norm_rules(torch_prefix: str, flax_prefix: str) -> dict[str, Rule]:
    """Rules for one nn.LayerNorm (weight, bias) -> our LayerNorm (scale, bias)."""
    return {
        f"{torch_prefix}.weight": Rule(f"{flax_prefix}/scale"),
        f"{torch_prefix}.bias": Rule(f"{flax_prefix}/bias"),
    }


def _shape_of(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _report(kind: str, names: list[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(names)[:limit])
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} {kind}: {shown}{more}"


def torch_to_flax(
    state_dict: StateDict,
    rules: Mapping[str, Rule],
    template: Any,
    ignore: Callable[[str], bool] = lambda key: False,
    what: str = "checkpoint",
) -> dict:
    """Converts a PyTorch state dict into a Flax params tree shaped like `template`.

    Args:
      state_dict: torch key -> array (numpy or torch tensor).
      rules: torch key -> Rule, covering exactly the keys the model needs.
      template: a params tree (arrays or ShapeDtypeStructs) giving every expected leaf and shape.
      ignore: keys the caller knowingly drops (e.g. a teacher network not needed for inference).
      what: a name for error messages.
    Returns:
      The params tree with fp32 numpy leaves.
    Raises:
      ConversionError: on missing, unexpected or mis-shaped keys, or unfilled parameters.
    """
    keys = {k for k in state_dict if not ignore(k)}
    missing = [k for k in rules if k not in keys]
    unexpected = [k for k in keys if k not in rules]
    problems = []
    if missing:
        problems.append(_report("keys missing from the " + what, missing))
    if unexpected:
        problems.append(_report("unexpected keys in the " + what, unexpected))
    if problems:
        raise ConversionError("; ".join(problems))

    flat_template = {"/".join(k): v for k, v in traverse_util.flatten_dict(template).items()}
    targets = [rule.target for rule in rules.values()]
    unknown = sorted({t for t in targets if t not in flat_template})
    if unknown:
        raise ConversionError(_report("conversion targets not in the model", unknown))
    duplicated = sorted({t for t in targets if targets.count(t) > 1})
    if duplicated:
        raise ConversionError(_report("parameters filled twice", duplicated))
    unfilled = sorted(set(flat_template) - set(targets))
    if unfilled:
        raise ConversionError(_report("model parameters with no source key", unfilled))

    flat = {}
    mis_shaped = []
    for key, rule in rules.items():
        value = rule.transform.forward(to_numpy(state_dict[key]))
        expected = _shape_of(flat_template[rule.target])
        if tuple(value.shape) != expected:
            mis_shaped.append(
                f"{key} -> {rule.target}: got {tuple(value.shape)}, expected {expected}"
            )
            continue
        flat[tuple(rule.target.split("/"))] = np.asarray(value, np.float32)
    if mis_shaped:
        raise ConversionError(_report("mis-shaped tensors", mis_shaped))
    return traverse_util.unflatten_dict(flat)


def flax_to_torch(params: Any, rules: Mapping[str, Rule]) -> dict[str, Array]:
    """Inverse of `torch_to_flax`: a state dict of numpy arrays with the original key names."""
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    return {key: rule.transform.inverse(flat[rule.target]) for key, rule in rules.items()}


def select_weights(checkpoint: Mapping[str, Any], *, what: str, wanted: str,
                   entries: tuple[str, ...], bare_prefix: str, other_option: str
                   ) -> Mapping[str, Any]:
    """The state dict to import from a loaded checkpoint file.

    Args:
      what: names the checkpoint kind in errors ("FlowMo", "DetailFlow GPT", ...).
      wanted: the entry to import (e.g. the EMA weights).
      entries: the weight entries such a file holds; a file with none of them is a bare state
        dict if one of its keys starts with `bare_prefix`, else not such a checkpoint.
      other_option: the command-line choice that selects another entry (named in the error
        when `wanted` is missing).
    """
    if not any(entry in checkpoint for entry in entries):
        if any(k.startswith(bare_prefix) for k in checkpoint):
            return checkpoint  # already a bare state dict
        raise ConversionError(
            f"not a {what} checkpoint: expected {' / '.join(repr(e) for e in entries)} "
            f"entries, found keys {sorted(checkpoint)[:8]}")
    if wanted not in checkpoint:
        raise ConversionError(f"the checkpoint has no '{wanted}' weights (it has "
                              f"{sorted(checkpoint)}); use {other_option}")
    return checkpoint[wanted]


def to_numpy(value: Any) -> Array:
    """A torch tensor (any dtype, on CPU) or array-like -> numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class _YamlScalar:
    """Stands in for a ruamel.yaml round-trip scalar while unpickling: built from the value,
    its pickled formatting state (width, precision, anchor, ...) ignored."""

    builtin: type = object

    def __setstate__(self, state):
        del state


def _yaml_scalar(base: type, builtin: type, name: str) -> type:
    return type(name, (_YamlScalar, base), {"builtin": builtin, "__slots__": ()})


# ruamel.yaml's round-trip scalar types -> the builtin each one is. The original training
# scripts load their yaml with ruamel's round-trip loader and pickle the parsed values inside
# `args`; the project does not depend on ruamel, so these names map to stand-ins.
_RUAMEL_SCALARS = {
    "ruamel.yaml.scalarfloat.ScalarFloat": (float, float),
    "ruamel.yaml.scalarbool.ScalarBoolean": (int, bool),
    **{f"ruamel.yaml.scalarint.{name}": (int, int)
       for name in ("ScalarInt", "BinaryInt", "OctalInt", "HexInt", "HexCapsInt", "DecimalInt")},
    **{f"ruamel.yaml.scalarstring.{name}": (str, str)
       for name in ("ScalarString", "LiteralScalarString", "FoldedScalarString",
                    "SingleQuotedScalarString", "DoubleQuotedScalarString",
                    "PlainScalarString")},
}
_STAND_INS = [(_yaml_scalar(base, builtin, path.rsplit(".", 1)[1]), path)
              for path, (base, builtin) in _RUAMEL_SCALARS.items()]


def plain_values(value: Any) -> Any:
    """Replaces the ruamel stand-ins inside containers and `argparse.Namespace`s by builtins."""
    if isinstance(value, _YamlScalar):
        return value.builtin(value)
    if isinstance(value, argparse.Namespace):
        return argparse.Namespace(**{k: plain_values(v) for k, v in vars(value).items()})
    if isinstance(value, dict):
        return type(value)((k, plain_values(v)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(plain_values(v) for v in value)
    return value


def load_torch_file(path: str | os.PathLike) -> dict:
    """Reads a `torch.save` file on the CPU without executing arbitrary pickled code.

    torch's weights-only unpickler reads tensors, containers and numbers; we also allow
    `argparse.Namespace` (DetailFlow stores its args) and ruamel.yaml's round-trip scalars,
    which come back as plain floats, ints, bools and strings.

    Raises:
      ConversionError: the file refers to anything else (named in the message).
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading PyTorch checkpoints needs torch (CPU is enough): "
            "pip install 'tokenizers_jax[convert]'"
        ) from e
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_STAND_INS]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|unrecognized function (\S+)|got <class '([\w.]+)'>",
                          str(e))
        what = next((g for g in found.groups() if g), "") if found else ""
        raise ConversionError(
            f"{path} holds pickled objects that are not read safely"
            + (f" ({what})" if what else "")
            + ": only tensors, containers, numbers, argparse.Namespace and ruamel.yaml scalars "
            "are read (no pickled code runs). Re-save its state dicts alone with "
            "torch.save({'model': ..., 'ema': ...}, path).") from e
    return plain_values(checkpoint)
