"""Token export: encode a dataset once into array_record shards that grain reads back.

    manifest = export_tokens("models/detailflow_16", config, "tokens/imagenet_df16")

`config.data` chooses the images exactly as for training (built-in photos, an image folder,
ImageNet via TFDS; see `data.default_data_config`) and `config.export` the export options
(`default_export_config`). The directory layout and record format are in `data.tokens`.

What is stored per image (`SCHEMES`, by the tokenizer's model.name):
  flowmo      the LFQ codeword indices [V, tokens_per_image] (flowmo.md section 4) of the
              evaluation transform's crop (`data.transform`: resize + centre crop); V = 1, or 2
              with export.hflip (the mirrored crop as a second view).
  detailflow  DetailFlow's code extraction (detailflow.md 6.2): ADM centre crop to
              int(export.crop_range * R) pixels, torchvision TenCrop(R) -> 10 crops, and the
              (clean, input, label) index stack [10, N, 3] of the self-correction encode
              (`DetailFlowTokenizer.encode_self_correction`) with ONE noise index per image,
              shared by its crops (p = 1, t = N, `draw_noise_index`).
Every random draw of an example comes from numpy's default_rng((export.seed, index)): the noise
index, then the record's neighbour_seed, which seeds the random-neighbour ranks exactly as
`encode_self_correction(crops, noise_idx, seed=neighbour_seed)` does. So the tokens depend
neither on the batch size nor on the device or process count, and a resumed export equals an
uninterrupted one.

Parallelism and resume: shard s is encoded by process s % process_count, batch by batch, with
one jitted step over a data mesh of that process's devices (params replicated, batch split).
A shard is written under a .tmp name and renamed when complete; a restart skips the shards
present under their final names and refuses settings that differ from the export plan written
at the start (batch size and read threads may change). Process 0 writes labels.txt and, last,
manifest.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils
from tqdm import tqdm

from tokenizers_jax import api, exported
from tokenizers_jax.data import pipeline, tokens
from tokenizers_jax.data.transforms import adm_center_crop, get_transform, ten_crop
from tokenizers_jax.detailflow_resolution import draw_noise_index
from tokenizers_jax.models import flowmo
from tokenizers_jax.models.detailflow import DetailFlow
from tokenizers_jax.quantizers.vq import draw_neighbour_ranks
from tokenizers_jax.tasks.flowmo import images_to_float
from tokenizers_jax.training import checkpoint, sharding

# array_record options: one record per chunk, so random access decodes just that record.
WRITER_OPTIONS = "group_size:1"
# Settings that do not change what is written, so a resume may change them.
FREE_SETTINGS = ("export.batch_size", "data.read_threads", "data.worker_count")
# Jitted encode steps by model, scheme, export options and devices (see `_Export._compile`).
_COMPILED_STEPS: dict[str, Callable] = {}
TEN_CROP_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


def default_export_config() -> ml_collections.ConfigDict:
    """The `export` section.

    Fields:
      split: "train" or "eval": which split of `config.data` to encode.
      num_examples: encode the first N examples of the split; 0 for all.
      examples_per_shard: examples per array_record file (the unit of resume).
      batch_size: images per encode step per process, a multiple of its device count.
      seed: seeds every per-example draw (DetailFlow's noise index and neighbours).
      hflip: FlowMo: store the mirrored crop's tokens as a second view.
      crop_range: DetailFlow: the ADM centre crop before TenCrop is int(crop_range * R) px.
      dtype: compute dtype, "float32" or "bfloat16"; "" keeps the tokenizer's model.dtype.
        (The original extracts DetailFlow codes under bf16 autocast.)
    """
    return ml_collections.ConfigDict(dict(
        split="train", num_examples=0, examples_per_shard=2048, batch_size=64, seed=0,
        hflip=False, crop_range=1.1, dtype=""))


@dataclasses.dataclass(frozen=True)
class Scheme:
    """The model-specific part of an export.

    image_views(uint8 [H, W, 3]) -> uint8 [V, S, S, 3], the views encoded per image.
    draws(example index) -> {name: int}, the example's random draws (stored in its record).
    encode(params, views float32 [B, V, S, S, 3] in [-1, 1], draws {name: int32 [B]}) ->
      int32 [B, V, *token_shape], traceable.
    """

    kind: str
    view_names: tuple[str, ...]
    canonical_view: int
    token_shape: tuple[int, ...]  # per view
    channels: tuple[str, ...]
    codebook_size: int
    tokens_per_image: int
    image_views: Callable[[np.ndarray], np.ndarray]
    draws: Callable[[int], dict[str, int]]
    encode: Callable[[Any, jax.Array, dict[str, jax.Array]], jax.Array]


def flowmo_scheme(tokenizer: api.Tokenizer, config: ml_collections.ConfigDict) -> Scheme:
    """FlowMo: LFQ codeword indices of the evaluation crop (and its mirror with hflip)."""
    model = tokenizer.model
    c = model.config
    transform = get_transform(config.data.transform).eval
    hflip = bool(config.export.hflip)

    def image_views(image):
        crop = transform(image, c.image_size)
        return np.stack([crop, crop[:, ::-1]] if hflip else [crop])

    def encode(params, views, draws):
        del draws
        batch, num_views = views.shape[:2]
        images = views.reshape(batch * num_views, *views.shape[2:])
        code = model.apply({"params": params}, images, method=flowmo.FlowMo.encode)
        indices = flowmo.quantize(code, c, with_losses=False).indices
        return indices.reshape(batch, num_views, -1)

    return Scheme(
        kind="flowmo_lfq", view_names=("image", "mirrored") if hflip else ("image",),
        canonical_view=0, token_shape=(c.tokens_per_image,), channels=(),
        codebook_size=2**c.codebook_size_for_entropy, tokens_per_image=c.tokens_per_image,
        image_views=image_views, draws=lambda index: {}, encode=encode)


def detailflow_scheme(tokenizer: api.Tokenizer, config: ml_collections.ConfigDict) -> Scheme:
    """DetailFlow: ten crops, one noise index per image, the clean/input/label stacks."""
    model = tokenizer.model
    m = tokenizer.config.model
    size, num_tokens = m.image_size, tokenizer.num_tokens
    crop_side = int(config.export.crop_range * size)
    if crop_side < size:
        raise ValueError(f"export.crop_range={config.export.crop_range} gives a {crop_side} px "
                         f"centre crop, smaller than the {size} px ten crops; use >= 1")
    seed = int(config.export.seed)

    def image_views(image):
        return ten_crop(adm_center_crop(image, crop_side), size)

    def draws(index):
        rng = np.random.default_rng((seed, index))
        noise_idx = draw_noise_index(tokenizer.resolutions, rng, num_tokens, correction_prob=1.0)
        return dict(noise_idx=noise_idx, neighbour_seed=int(rng.integers(2**31)))

    def encode(params, views, draws):
        def one_image(crops, noise_idx, neighbour_seed):  # crops [V, R, R, 3]
            ranks = draw_neighbour_ranks(jax.random.PRNGKey(neighbour_seed),
                                         (crops.shape[0], num_tokens), m.neighbour_top_k)
            return model.apply({"params": params}, crops, noise_idx, ranks,
                               method=DetailFlow.self_correction).indices  # [V, N, 3]

        return jax.vmap(one_image)(views, draws["noise_idx"], draws["neighbour_seed"])

    view_names = TEN_CROP_NAMES + tuple(f"mirrored_{name}" for name in TEN_CROP_NAMES)
    return Scheme(
        kind="detailflow_self_correction", view_names=view_names,
        canonical_view=TEN_CROP_NAMES.index("center"), token_shape=(num_tokens, 3),
        channels=("clean", "input", "label"), codebook_size=m.codebook_size,
        tokens_per_image=num_tokens, image_views=image_views, draws=draws, encode=encode)


# model.name -> Scheme factory.
SCHEMES: dict[str, Callable[[api.Tokenizer, ml_collections.ConfigDict], Scheme]] = {
    "flowmo": flowmo_scheme,
    "detailflow": detailflow_scheme,
}


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked copy with `export` filled in from the defaults, checked."""
    if "data" not in config:
        raise ValueError("the export config needs a `data` section (see "
                         "configs/export_tokens.py)")
    resolved = ml_collections.ConfigDict(config.to_dict())
    export = default_export_config()
    export.lock()  # an unknown export field is an error, not a silent no-op
    export.update(resolved.get("export", {}))
    resolved.export = export
    if export.split not in ("train", "eval"):
        raise ValueError(f"export.split must be 'train' or 'eval', got {export.split!r}")
    for name in ("examples_per_shard", "batch_size"):
        if export[name] <= 0:
            raise ValueError(f"export.{name} must be positive, got {export[name]}")
    if export.num_examples < 0:
        raise ValueError(f"export.num_examples must be >= 0, got {export.num_examples}")
    if export.dtype not in ("", "float32", "bfloat16"):
        raise ValueError(f"export.dtype must be '', 'float32' or 'bfloat16', got "
                         f"{export.dtype!r}")
    return resolved


def load_export_tokenizer(directory: str, dtype: str) -> tuple[api.Tokenizer, int | None]:
    """(tokenizer with the compute dtype applied, training step or None for a model dir)."""
    tokenizer = api.load_tokenizer(directory)
    step = None if exported.is_model_dir(directory) else checkpoint.latest_step(directory)
    if dtype and dtype != tokenizer.config.model.dtype:
        config = ml_collections.ConfigDict(tokenizer.config.to_dict())
        config.model.dtype = dtype
        tokenizer = api.tokenizer_class(config.model.name)(config, tokenizer.params)
    if tokenizer.config.model.name not in SCHEMES:
        raise ValueError(f"no token export for model {tokenizer.config.model.name!r}; known: "
                         f"{sorted(SCHEMES)}")
    return tokenizer, step


@dataclasses.dataclass(frozen=True)
class _LoadExample:
    """index -> {"views": uint8 [V, S, S, 3], "label", "index", **draws} (for grain)."""

    source: Any
    scheme: Scheme

    def __call__(self, index: int) -> dict[str, Any]:
        image, label = self.source.read_labelled(index)
        return dict(views=self.scheme.image_views(image), label=np.int32(label),
                    index=np.int64(index), **self.scheme.draws(index))


def json_differences(written: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two JSON trees."""
    if isinstance(written, dict) and isinstance(wanted, dict):
        found = []
        for key in sorted(set(written) | set(wanted)):
            found += json_differences(written.get(key), wanted.get(key), f"{prefix}{key}.")
        return found
    return [] if written == wanted else [prefix.rstrip(".")]


def write_json_atomically(path: str, value: Any):
    """Writes `value` as JSON under a .tmp name, then renames it over `path`."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def _barrier(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class _Export:
    """One export run (see `export_tokens`)."""

    def __init__(self, tokenizer_dir: str, config: ml_collections.ConfigDict, output_dir: str,
                 process_index: int, process_count: int):
        self.config = resolve_config(config)
        self.export = self.config.export
        self.output_dir = os.path.abspath(output_dir)
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer_dir = os.path.abspath(tokenizer_dir)
        self.tokenizer, self.step = load_export_tokenizer(self.tokenizer_dir, self.export.dtype)
        self.scheme = SCHEMES[self.tokenizer.config.model.name](self.tokenizer, self.config)
        self.config.data.image_size = self.tokenizer.config.model.image_size
        self.source = pipeline.make_source(self.config.data, self.export.split,
                                           self.config.data.seed)
        self.num_examples = len(self.source)
        if self.export.num_examples:
            self.num_examples = min(self.num_examples, self.export.num_examples)
        self.per_shard = self.export.examples_per_shard
        self.num_shards = math.ceil(self.num_examples / self.per_shard)
        self.dtype = tokens.storage_dtype(self.scheme.codebook_size)
        if self.export.batch_size % jax.local_device_count():
            raise ValueError(f"export.batch_size={self.export.batch_size} must be a multiple "
                             f"of this process's {jax.local_device_count()} devices")

    def plan(self) -> dict[str, Any]:
        """What the shards hold; a resume must agree on all of it."""
        free = {tuple(name.split(".")) for name in FREE_SETTINGS}
        sections = {}
        for section in ("data", "export"):
            values = self.config[section].to_dict()
            sections[section] = {k: v for k, v in values.items() if (section, k) not in free}
        scheme = self.scheme
        plan = dict(
            format=tokens.FORMAT, kind=scheme.kind,
            tokenizer=dict(path=self.tokenizer_dir, step=self.step,
                           model=self.tokenizer.config.model.name),
            tokenizer_config=self.tokenizer.config.to_dict(),
            num_examples=self.num_examples, examples_per_shard=self.per_shard,
            token_shape=[len(scheme.view_names), *scheme.token_shape],
            views=list(scheme.view_names), canonical_view=scheme.canonical_view,
            channels=list(scheme.channels), tokens_per_image=scheme.tokens_per_image,
            codebook_size=scheme.codebook_size, dtype=self.dtype.name, **sections)
        return json.loads(json.dumps(plan))  # tuples -> lists, as read back

    def check_plan(self):
        """Process 0 writes the plan of a new export; every process checks it on a resume."""
        path = os.path.join(self.output_dir, tokens.PLAN_FILE)
        plan = self.plan()
        if self.process_index == 0:
            if not os.path.exists(path):
                if os.path.isdir(self.output_dir) and os.listdir(self.output_dir):
                    raise FileExistsError(
                        f"{self.output_dir} is not empty and holds no token export plan; "
                        "choose a new --output directory")
                os.makedirs(self.output_dir, exist_ok=True)
                write_json_atomically(path, plan)
        _barrier("token export plan")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no token export plan in {self.output_dir}: process 0 "
                                    "writes it; start process 0 with the same --output")
        with open(path) as f:
            differences = json_differences(json.load(f), plan)
        if differences:
            raise ValueError(
                f"{self.output_dir} holds a token export with other settings (they differ in "
                f"{', '.join(differences)}); resume with the same tokenizer and config, or "
                "choose a new --output directory")

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.output_dir, tokens.shard_name(shard, self.num_shards))

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.per_shard
        return start, min(start + self.per_shard, self.num_examples)

    def run(self) -> dict[str, Any] | None:
        self.check_plan()
        if os.path.isfile(os.path.join(self.output_dir, tokens.MANIFEST_FILE)):
            logging.info("token export %s is already complete", self.output_dir)
            return tokens.load_manifest(self.output_dir)
        mine = range(self.process_index, self.num_shards, self.process_count)
        todo = [s for s in mine if not os.path.exists(self.shard_path(s))]
        sizes = {s: self.shard_range(s)[1] - self.shard_range(s)[0] for s in mine}
        logging.info("process %d: %d of its %d shards to encode (%d images each)",
                     self.process_index, len(todo), len(sizes), self.per_shard)
        if todo:
            done = sum(sizes.values()) - sum(sizes[s] for s in todo)
            step = self._compile()
            with tqdm(total=sum(sizes.values()), initial=done, unit="img", desc="export",
                      dynamic_ncols=True, disable=self.process_index != 0) as progress:
                for shard in todo:
                    self._write_shard(shard, step, progress)
        _barrier("token export shards")
        manifest = self._finish() if self.process_index == 0 else None
        _barrier("token export manifest")
        return manifest

    def _compile(self) -> Callable:
        devices = jax.local_devices()
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices)
        replicated, self.batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        self.params = jax.device_put(self.tokenizer.params, replicated)
        # Exports of the same model and options (a resume, a notebook) share one compilation.
        plan = self.plan()
        key = json.dumps([plan["tokenizer_config"]["model"], plan["kind"], plan["export"],
                          plan["data"]["transform"], [d.id for d in devices]], sort_keys=True)
        if key not in _COMPILED_STEPS:
            encode = self.scheme.encode
            _COMPILED_STEPS[key] = jax.jit(
                lambda params, views, draws: encode(params, images_to_float(views), draws),
                in_shardings=(replicated, self.batch_sharding, self.batch_sharding),
                out_shardings=self.batch_sharding)
        return _COMPILED_STEPS[key]

    def _batches(self, shard: int) -> Iterator[dict[str, np.ndarray]]:
        threads = self.config.data.read_threads
        return iter(
            grain.MapDataset.range(*self.shard_range(shard))
            .map(_LoadExample(self.source, self.scheme))
            .batch(self.export.batch_size)
            .to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                               prefetch_buffer_size=threads)))

    def _encoded(self, shard: int, step: Callable) -> Iterator[tuple[dict, np.ndarray]]:
        """(host batch, tokens [b, V, ...]) per batch; batch k+1 is dispatched before the
        tokens of batch k are fetched, so host loading and device work overlap."""
        size = self.export.batch_size
        pending = None
        for batch in self._batches(shard):
            rows = len(batch["index"])
            padded = {k: np.concatenate([v, np.repeat(v[-1:], size - rows, axis=0)])
                      for k, v in batch.items() if k not in ("label", "index")}
            views = jax.device_put(padded.pop("views"), self.batch_sharding)
            draws = jax.device_put({k: v.astype(np.int32) for k, v in padded.items()},
                                   self.batch_sharding)
            result = step(self.params, views, draws)
            if pending is not None:
                yield pending[0], np.asarray(pending[1])[: len(pending[0]["index"])]
            pending = batch, result
        if pending is not None:
            yield pending[0], np.asarray(pending[1])[: len(pending[0]["index"])]

    def _write_shard(self, shard: int, step: Callable, progress: tqdm):
        path = self.shard_path(shard)
        temporary = f"{path}.tmp"
        writer = ArrayRecordWriter(temporary, WRITER_OPTIONS)
        try:
            for batch, indices in self._encoded(shard, step):
                for row, example_tokens in enumerate(indices.astype(self.dtype)):
                    extras = {name: values[row] for name, values in batch.items()
                              if name not in ("views", "label", "index")}
                    writer.write(tokens.encode_record(batch["index"][row], batch["label"][row],
                                                      example_tokens, **extras))
                progress.update(len(indices))
        finally:
            writer.close()
        os.replace(temporary, path)

    def _finish(self) -> dict[str, Any]:
        missing = [s for s in range(self.num_shards) if not os.path.exists(self.shard_path(s))]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {self.num_shards} shards of {self.output_dir} are missing "
                f"(e.g. {os.path.basename(self.shard_path(missing[0]))}), so no manifest was "
                "written; re-run the export to encode them")
        label_names = list(self.source.label_names)
        with open(os.path.join(self.output_dir, tokens.LABELS_FILE), "w") as f:
            f.write("".join(f"{name}\n" for name in label_names))
        manifest = self.plan()
        manifest.update(
            label_names=label_names, num_classes=len(label_names),
            shards=[dict(file=os.path.basename(self.shard_path(s)),
                         num_examples=self.shard_range(s)[1] - self.shard_range(s)[0])
                    for s in range(self.num_shards)],
            record_format=("msgpack map per record: index, label, tokens (bytes, C order), "
                           "dtype, shape [V, *token_shape], and the scheme's draws "
                           "(see tokenizers_jax.data.tokens)"))
        write_json_atomically(os.path.join(self.output_dir, tokens.MANIFEST_FILE), manifest)
        return manifest


def export_tokens(tokenizer_dir: str, config: ml_collections.ConfigDict, output_dir: str, *,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> dict[str, Any] | None:
    """Encodes `config.data`'s `export.split` into a token export in `output_dir`.

    Re-running the same call resumes an interrupted export (finished shards are skipped) and
    returns at once for a finished one.

    Args:
      tokenizer_dir: a model directory or a training workdir (`load_tokenizer`).
      config: with a `data` section and optionally `export` (`default_export_config`).
      process_index / process_count: None for jax.process_index() / jax.process_count();
        explicit values encode that process's share of the shards only.
    Returns:
      The manifest on process 0 (once every shard is present); None on other processes.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return _Export(tokenizer_dir, config, output_dir, process_index, process_count).run()
