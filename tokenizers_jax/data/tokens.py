"""Exported token datasets: the record format, the manifest, and a grain source to read them.

A token export directory DIR (written by `python -m tokenizers_jax.export_tokens`) holds

  DIR/tokens-SSSSS-of-NNNNN.array_record   the shards; shard s holds examples
                              [s * examples_per_shard, ...) of the source split, in order
  DIR/labels.txt              the class names, one per line: line i names label i
  DIR/manifest.json           written last, once every shard is complete (fields below)
  DIR/export_plan.json        the settings the shards are written with (checked on resume)

A shard appears under its final name only once it is complete (it is written to a
`.tmp` name and renamed), and readers refuse a directory without a manifest, so a partial
export is never read.

Record format: one array_record record per example, a msgpack map with
  "index"   int, the example's position in the source split;
  "label"   int, its class (`manifest["label_names"][label]`);
  "tokens"  bytes, the token array in C order, little-endian;
  "dtype"   its numpy dtype string ("<u2" when the codebook fits 16 bits, else "<i4");
  "shape"   its shape [V, *token_shape]: V views of the image (DetailFlow: the 10 crops of
            TenCrop; FlowMo: the image, and its mirror image with export.hflip);
  and scheme extras: DetailFlow records carry "noise_idx" (the self-correction noise index
  shared by the image's crops) and "neighbour_seed" (seeds its random neighbour draws).
`decode_record` reads it back; nothing but msgpack and numpy is needed.

Manifest fields: format, kind ("flowmo_lfq" | "detailflow_self_correction"), tokenizer
{path, step, model}, tokenizer_config, num_examples, token_shape ([V, *per-view shape]),
views (names), canonical_view (the view of a plain evaluation: FlowMo's unmirrored image,
DetailFlow's centre crop), channels (DetailFlow: clean / input / label), tokens_per_image,
codebook_size, dtype, label_names, num_classes, examples_per_shard, shards [{file,
num_examples}], data and export (the settings used), record_format.

Reading for training (`data.name = "tokens"`, `data.path = DIR`): every access of an example
picks one of its V views at random (`RandomView`, DetailFlow's loader behaviour), from grain's
per-index generator, so the choice is a function of the seed, the epoch and the position and a
restored iterator replays it exactly. Batches are {"tokens": int32 [L, *token_shape],
"label": int32 [L]}. Tasks should call `check_manifest` with what their model expects.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import grain
import msgpack
import numpy as np

FORMAT = "tokenizers_jax.tokens.v1"
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"
PLAN_FILE = "export_plan.json"


def shard_name(shard: int, num_shards: int) -> str:
    return f"tokens-{shard:05d}-of-{num_shards:05d}.array_record"


def storage_dtype(codebook_size: int) -> np.dtype:
    """The narrowest stored index dtype: uint16 for codebooks up to 2^16, else int32."""
    return np.dtype("<u2") if codebook_size <= 2**16 else np.dtype("<i4")


def encode_record(index: int, label: int, tokens: np.ndarray, **extras: int) -> bytes:
    """One example -> record bytes (see the module docstring). tokens: [V, *token_shape]."""
    tokens = np.ascontiguousarray(tokens)
    dtype = tokens.dtype.newbyteorder("<") if tokens.dtype.byteorder == ">" else tokens.dtype
    record = dict(index=int(index), label=int(label), tokens=tokens.astype(dtype).tobytes(),
                  dtype=dtype.str, shape=list(tokens.shape))
    record.update({name: int(value) for name, value in extras.items()})
    return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Record bytes -> dict with "tokens" as a numpy array [V, *token_shape] (stored dtype)."""
    record = msgpack.unpackb(data, raw=False)
    record["tokens"] = np.frombuffer(record["tokens"], np.dtype(record.pop("dtype"))).reshape(
        record.pop("shape"))
    return record


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished export; a clear error for anything else."""
    path = os.fspath(path)
    file = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(file):
        if os.path.isfile(os.path.join(path, PLAN_FILE)):
            raise FileNotFoundError(
                f"token export {path} is not finished (no {MANIFEST_FILE}); re-run the same "
                "python -m tokenizers_jax.export_tokens command to complete it")
        raise FileNotFoundError(
            f"{path} is not a token export (no {MANIFEST_FILE}); write one with "
            "python -m tokenizers_jax.export_tokens --tokenizer=DIR --config=... --output=DIR")
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} has format {manifest.get('format')!r}; this library reads "
                         f"{FORMAT!r}")
    return manifest


def check_manifest(manifest: dict[str, Any], *, tokens_per_image: int | None = None,
                   codebook_size: int | None = None, kind: str | None = None,
                   num_classes: int | None = None, where: str = "the training config") -> None:
    """Checks an export against what a model expects; a ValueError names every mismatch.

    Args:
      tokens_per_image: token positions per image (FlowMo: LFQ codewords; DetailFlow: N).
      codebook_size: the vocabulary the model predicts over.
      kind: the export kind ("flowmo_lfq" or "detailflow_self_correction").
      num_classes: the model's class count; the export must not have more classes.
      where: names the expectation's origin in the message.
    """
    problems = []
    for name, expected in (("tokens_per_image", tokens_per_image),
                           ("codebook_size", codebook_size), ("kind", kind)):
        if expected is not None and manifest[name] != expected:
            problems.append(f"{name} is {manifest[name]!r} but {where} expects {expected!r}")
    if num_classes is not None and manifest["num_classes"] > num_classes:
        problems.append(f"it has {manifest['num_classes']} classes but {where} has only "
                        f"{num_classes}")
    if problems:
        tokenizer = manifest["tokenizer"]
        raise ValueError(
            f"the token export from {tokenizer['model']} tokenizer {tokenizer['path']} does not "
            f"fit: {'; '.join(problems)}. Export with the matching tokenizer, or change the "
            "model config to the export's values.")


class TokenSource:
    """Random access to an export: item i is {"tokens": int32 [V, *token_shape], "label": int32}.

    Attributes:
      manifest: the export's manifest (`load_manifest`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self.manifest = load_manifest(self.path)
        files = [os.path.join(self.path, shard["file"]) for shard in self.manifest["shards"]]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"token export {self.path} lacks {len(missing)} shard(s) "
                                    f"named in its manifest, e.g. {missing[0]}")
        self._records = grain.sources.ArrayRecordDataSource(files)
        if len(self._records) != self.manifest["num_examples"]:
            raise ValueError(f"token export {self.path} holds {len(self._records)} records but "
                             f"its manifest says {self.manifest['num_examples']}")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = decode_record(self._records[index])
        return {"tokens": record["tokens"].astype(np.int32), "label": np.int32(record["label"])}

    def __repr__(self) -> str:
        return (f"TokenSource({self.path!r}, {len(self)} examples, {self.manifest['kind']}, "
                f"tokens {self.manifest['token_shape']})")


def _view(example: dict[str, np.ndarray], view: int) -> dict[str, np.ndarray]:
    return {"tokens": example["tokens"][view], "label": example["label"]}


@dataclasses.dataclass(frozen=True)
class RandomView:
    """grain random map: one of the example's views, uniformly -> {"tokens", "label"}."""

    def __call__(self, example: dict[str, np.ndarray], rng: np.random.Generator):
        return _view(example, int(rng.integers(example["tokens"].shape[0])))


@dataclasses.dataclass(frozen=True)
class EvalView:
    """index -> the canonical view with "mask" True; indices past the data are zero padding."""

    source: Sequence[dict[str, np.ndarray]]
    num_examples: int
    view: int
    token_shape: tuple[int, ...]

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if index < self.num_examples:
            return {**_view(self.source[index], self.view), "mask": np.bool_(True)}
        return {"tokens": np.zeros(self.token_shape, np.int32), "label": np.int32(0),
                "mask": np.bool_(False)}


def eval_view(source: TokenSource, num_examples: int) -> EvalView:
    """The evaluation map of a token source: its canonical view, padded with mask False."""
    manifest = source.manifest
    return EvalView(source, num_examples, manifest["canonical_view"],
                    tuple(manifest["token_shape"][1:]))
