"""A training workdir's identity: its resolved config, DIR/config.json.

A run resumes a workdir only with the config that made it. Before anything is written,
`check_resumable` compares the new resolved config with the stored one; a difference in any
field outside `RESUMABLE_FIELDS` (the model, the sampler it decodes with, the loss, the
optimizer, the data and how it is read, the seeds, ...) is refused with one message that lists
the fields. The fields that may change on resume are those that leave the model, the meaning
of the data and the checkpoint layout alone: how long to train, how often to log, save and
evaluate, the evaluation settings, the device mesh, and where some files live.

`save_config` writes config.json atomically (a temporary file, then `os.replace`), so a crash
never leaves a truncated one.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any

import jax
import ml_collections

from tokenizers_jax import exported

# Fields (dotted paths, `*` matches any rest) that may differ between a workdir's stored config
# and the config that resumes it.
RESUMABLE_FIELDS = (
    "train.num_steps",
    "logging.*",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.keep_every",
    "checkpoint.async_save",
    "eval.*",
    "mesh.*",  # orbax re-lays the arrays out for any mesh
    "data.num_eval_examples",
    "data.eval_path",
    "data.eval_split",
    "data.data_dir",  # where the prepared TFDS files live, not which data
    "data.worker_count",
    "data.read_threads",
    "train.perceptual_weights",  # where the converted perceptual weights live
    "train.dino_weights",  # ... DetailFlow's discriminator trunk
    "train.siglip2_weights",  # ... DetailFlow's teacher
)

_MAX_LISTED = 8


class WorkdirMismatchError(ValueError):
    """The config differs from the workdir's stored config in fields that cannot change."""


def config_path(workdir: str) -> str:
    return os.path.join(workdir, exported.CONFIG_FILE)


def save_config(workdir: str, config: ml_collections.ConfigDict):
    """Writes the resolved config to DIR/config.json atomically (process 0)."""
    if jax.process_index() != 0:
        return
    text = exported.config_to_json(config)
    os.makedirs(workdir, exist_ok=True)
    path = config_path(workdir)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = config_path(workdir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a training workdir: {path} is missing")
    return exported.load_config(workdir)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _json_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Dotted path -> value, as stored in config.json (tuples become lists)."""
    return _flatten(json.loads(exported.config_to_json(config)))


def is_resumable_field(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in RESUMABLE_FIELDS)


_ABSENT = object()


def config_differences(stored: ml_collections.ConfigDict, new: ml_collections.ConfigDict
                       ) -> list[tuple[str, Any, Any]]:
    """(path, stored value, new value) of every field that differs and may not change.

    A field present in only one of the configs counts as differing (its other value shows as
    "(absent)").
    """
    old_fields, new_fields = _json_fields(stored), _json_fields(new)
    differences = []
    for path in sorted(set(old_fields) | set(new_fields)):
        old, now = old_fields.get(path, _ABSENT), new_fields.get(path, _ABSENT)
        if old != now and not is_resumable_field(path):
            differences.append((path, old, now))
    return differences


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def check_resumable(workdir: str, config: ml_collections.ConfigDict):
    """Raises WorkdirMismatchError if `workdir` holds a run whose config `config` may not resume.

    A workdir without config.json is new and always passes. Reads only; writes nothing.
    """
    if not os.path.isfile(config_path(workdir)):
        return
    differences = config_differences(load_config(workdir), config)
    if not differences:
        return
    listed = ", ".join(f"{path} {_show(old)} -> {_show(new)}"
                       for path, old, new in differences[:_MAX_LISTED])
    if len(differences) > _MAX_LISTED:
        listed += f" and {len(differences) - _MAX_LISTED} more"
    raise WorkdirMismatchError(
        f"{workdir} holds a run made with a different config: {listed}.\n"
        "Undo these changes, or start a new workdir (--workdir=NEW; --config.init_from="
        f"{workdir} starts it from this run's weights). On resume only these may change: "
        f"{', '.join(RESUMABLE_FIELDS)}.")
