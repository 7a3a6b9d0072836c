"""The generation evaluation: FID, sFID, Inception Score, precision and recall of a generator's
class-conditional samples, with the ADM evaluator's definitions and pytorch-fid's Inception.

    result = evaluate_generation(generator, "VIRTUAL_imagenet256_labeled.npz", "eval/df16",
                                 num_samples=50_000, sampling={"cfg": 1.45})
    write_reference(config, "imagenet256_reference.npz")   # a reference batch of our own

Metrics (the ADM evaluator, openai/guided-diffusion `evaluations/evaluator.py`):
  fid               Frechet distance of the samples' pool features to the reference's mu, sigma.
  sfid              the same on the spatial features (mixed_6/conv, 7 channels) vs mu_s, sigma_s.
  inception_score   over consecutive parts of `is_split_size` samples (ADM: 5000), averaged.
  precision, recall k-NN manifolds (k = 3) of the reference batch's images and the samples.
Which activations these are, and how pytorch-fid's network differs from the TF graph the ADM
evaluator runs, is in `perceptual.inception`. Our numbers are therefore close to the papers'
but not identical; every result says which network produced it.

Reference batches (.npz), read by `read_reference`:
  ADM's, from the guided-diffusion evaluation suite (its evaluations/README links the published
  reference batches; ImageNet 256: VIRTUAL_imagenet256_labeled.npz, the one DetailFlow and BT
  evaluate against):
    arr_0          uint8 [10000, 256, 256, 3] images
    mu, sigma      [2048], [2048, 2048] pool_3 statistics of the dataset (TF Inception graph)
    mu_s, sigma_s  [2023], [2023, 2023] mixed_6/conv[..., :7] statistics (TF Inception graph)
  We read those four statistics as stored, and compute the pool features of arr_0 with our
  Inception for precision and recall (the file stores no activations; the ADM evaluator also
  computes them from arr_0). A file without statistics (e.g. a sample batch used as the
  reference) gets them from arr_0's features, as the ADM evaluator does.
  Ours (`write_reference`, from any image source of the data pipeline) has the same arrays,
  the statistics computed by our Inception over the whole split and arr_0 an evenly spread
  subset of its images, plus `inception_network` (which network computed the statistics).

Outputs, in the output directory OUT:
  OUT/samples/         the samples (`generation`: samples.npz, grid.png; resumable)
  OUT/metrics.json     the metrics with every setting, the networks and notes
  OUT/metrics.jsonl, OUT/tensorboard/   scalars generation/<metric>, and the sample grid
With a random-init Inception (`allow_random_init_inception`, smoke tests only) every output
says so: random_init_inception and a note in the JSON, the metric scalars are named
generation/<metric>_RANDOM_INIT, and the grid's TensorBoard tag is samples_RANDOM_INIT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterable, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from tokenizers_jax import adm_npz, api, data, exported, generation, metrics
from tokenizers_jax.data.pipeline import TOKEN_SOURCES
from tokenizers_jax.evaluation import RANDOM_INIT_MARKER
from tokenizers_jax.perceptual import common, inception
from tokenizers_jax.token_export import write_json_atomically
from tokenizers_jax.training import sharding
from tokenizers_jax.training.writer import MetricWriter

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
ADM_NETWORK = "TF Inception graph classify_image_graph_def.pb (the ADM evaluator's)"
OUR_NETWORK = ("pytorch-fid InceptionV3 (pt_inception-2015-12-05 weights, ported from the TF "
               "graph) run in JAX by tokenizers_jax")
RANDOM_NETWORK = f"{RANDOM_INIT_MARKER} InceptionV3 with random weights (smoke tests only)"
NETWORK_KEY = "inception_network"
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")


def default_reference_config() -> ml_collections.ConfigDict:
    """The `reference` section of a reference-batch config (configs/generation_reference.py).

    Fields:
      split: "train" or "eval": which split of `config.data` the statistics cover.
      num_images: statistics over the first N images of the split; 0 for all.
      keep_images: images stored as arr_0 for precision / recall, evenly spread over those
        N (ADM's reference batches keep 10,000).
    """
    return ml_collections.ConfigDict(dict(split="train", num_images=0, keep_images=10_000))


@dataclasses.dataclass
class Activations:
    """What the metrics need of N images' Inception outputs."""

    pool: np.ndarray  # float32 [N, 2048]
    spatial: metrics.FeatureStats  # of the [N, 2023] spatial features
    probs: np.ndarray  # float32 [N, 1008]

    def pool_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        stats = metrics.FeatureStats(self.pool.shape[1])
        stats.update(self.pool)
        return stats.mean_cov()


class InceptionExtractor:
    """Inception activations of uint8 image batches, split over this process's devices.

    Args:
      params: FID Inception params (`load` finds the converted weights).
      random_init: whether `params` are random (every output is then marked RANDOM_INIT).
      batch_size: images per step (rounded up to a multiple of the local device count).
      input_size: the network's input size; 299 for every real metric, less only in tests.
    """

    def __init__(self, params: Any, random_init: bool, batch_size: int = 200,
                 input_size: int = inception.INPUT_SIZE):
        self.random_init = random_init
        self.network = RANDOM_NETWORK if random_init else OUR_NETWORK
        self.input_size = input_size
        devices = jax.local_devices()
        self.mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
                                       devices)
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.params = jax.device_put(params, sharding.replicated(self.mesh))
        batch = sharding.batch_sharding(self.mesh)

        def step(params, images):  # uint8 [B, H, W, 3] -> pool, spatial, probabilities
            with jax.default_matmul_precision("highest"):
                outputs = inception.inception_outputs(
                    params, images.astype(jnp.float32) / 255.0, input_size)
            return outputs.pool, outputs.spatial, jax.nn.softmax(outputs.logits, axis=-1)

        self._step = jax.jit(step, in_shardings=(sharding.replicated(self.mesh), batch),
                             out_shardings=batch)

    @classmethod
    def load(cls, path: str | None = None, allow_random_init: bool = False,
             batch_size: int = 200) -> InceptionExtractor:
        """The converted Inception in `path` (default: `perceptual.common`'s folder); random
        weights if it is missing and `allow_random_init`, else FileNotFoundError saying how to
        get it."""
        directory = os.path.expanduser(path or common.default_weights_dir(inception.NAME))
        params = inception.load_inception_params(path, allow_random_init=allow_random_init)
        return cls(params, not exported.is_model_dir(directory), batch_size)

    def spatial_dim(self) -> int:
        """Size of the flattened spatial features (2023 at input size 299)."""
        outputs = jax.eval_shape(lambda p, x: inception.inception_outputs(p, x, self.input_size),
                                 self.params, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
        return outputs.spatial.shape[1]

    def __call__(self, batches: Iterable[np.ndarray], total: int, description: str,
                 progress: bool = True) -> Activations:
        """Activations of every image of `batches` (uint8 [b, H, W, 3] each, b <= batch_size)."""
        pool, probs, spatial = [], [], metrics.FeatureStats(self.spatial_dim())
        bar = tqdm(total=total, unit="img", desc=description, disable=not progress,
                   dynamic_ncols=True)
        for images in batches:
            count = len(images)
            padded = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)
            padded[:count] = images
            outputs = jax.device_get(self._step(self.params, jax.device_put(
                padded, sharding.batch_sharding(self.mesh))))
            pool.append(outputs[0][:count])
            spatial.update(outputs[1][:count])
            probs.append(outputs[2][:count])
            bar.update(count)
        bar.close()
        return Activations(np.concatenate(pool), spatial, np.concatenate(probs))


@dataclasses.dataclass(frozen=True)
class Reference:
    """What a reference batch provides (see the module docstring)."""

    path: str
    num_images: int  # rows of arr_0
    statistics: dict[str, np.ndarray] | None  # mu, sigma, mu_s, sigma_s as stored, or None
    network: str  # which network computed the statistics


def read_reference(path: str, spatial_dim: int) -> Reference:
    """Reads and checks a reference batch's statistics and arr_0 header (not its images)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no reference batch {path}: download the ADM reference batch (ImageNet 256: "
            "VIRTUAL_imagenet256_labeled.npz, linked from openai/guided-diffusion's "
            "evaluations/README) or write one with python -m "
            "tokenizers_jax.evaluate_generation reference")
    shape, dtype = adm_npz.array_shape(path, "arr_0")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 images [N, H, W, 3], got {dtype} {shape}")
    with np.load(path) as archive:
        present = [name for name in STATISTICS if name in archive.files]
        if present and len(present) != len(STATISTICS):
            raise ValueError(f"{path} holds {present} but not all of {list(STATISTICS)}")
        statistics = {name: archive[name].astype(np.float64) for name in present} or None
        network = str(archive[NETWORK_KEY]) if NETWORK_KEY in archive.files else ADM_NETWORK
    if statistics is not None:
        expected = dict(mu=(inception.FEATURE_DIM,), sigma=(inception.FEATURE_DIM,) * 2,
                        mu_s=(spatial_dim,), sigma_s=(spatial_dim,) * 2)
        for name, value in statistics.items():
            if value.shape != expected[name]:
                raise ValueError(f"{path}: {name} is shaped {value.shape}, expected "
                                 f"{expected[name]} (statistics of another network or input "
                                 "size)")
    else:
        network = "computed here from arr_0"
    return Reference(os.path.abspath(path), shape[0], statistics, network)


def check_networks(reference: Reference, extractor: InceptionExtractor):
    """Refuses reference statistics of a random network for an evaluation with real weights."""
    if not extractor.random_init and reference.network.startswith(RANDOM_INIT_MARKER):
        raise ValueError(f"the statistics in {reference.path} come from a random-init Inception; "
                         "write the reference again with the real weights")


def _notes(reference: Reference, extractor: InceptionExtractor) -> list[str]:
    notes = [
        f"Inception: {extractor.network}. The ADM evaluator runs the TF graph itself; the "
        "weights are the same, but the resize to 299 and the input scaling differ "
        "(tokenizers_jax/perceptual/inception.py), so these numbers are close to, not "
        "identical with, the ADM evaluator's and the papers'.",
        "precision and recall use squared distances in float32; the ADM evaluator computes "
        "them in float16 (float32 only on overflow), which can move points on a ball's edge.",
        "inception_score uses the classifier without its bias (softmax(pool @ W)), over "
        "consecutive parts of the samples in their order, as the ADM evaluator.",
    ]
    if reference.statistics is not None and reference.network != extractor.network:
        notes.insert(1, f"fid and sfid compare our Inception's sample statistics with reference "
                        f"statistics of another network ({reference.network}).")
    if extractor.random_init:
        notes.insert(0, "RANDOM-INIT Inception (allow_random_init_inception=True): every "
                        "metric is meaningless; for tests and smoke runs only.")
    return notes


def evaluate_generation(generator: api.Generator, reference_path: str, output_dir: str, *,
                        num_samples: int = 50_000, classes: Sequence[int] | None = None,
                        seed: int = 0, batch_size: int = 64,
                        sampling: dict[str, Any] | None = None,
                        extractor: InceptionExtractor | None = None,
                        is_split_size: int = 5000, k: int = 3,
                        progress: bool = True) -> dict[str, Any]:
    """Samples (resumably) and scores a generator against a reference batch.

    Args:
      generator: the `api.Generator`.
      reference_path: a reference batch .npz (see the module docstring).
      output_dir: OUT; the samples go to OUT/samples (a rerun resumes them).
      num_samples, classes, seed, batch_size, sampling: as `generation.generate_samples`.
      extractor: the Inception (default: `InceptionExtractor.load()`, the converted weights).
      is_split_size: samples per Inception Score part (ADM: 5000).
      k: the neighbourhood of precision and recall (ADM: 3).
    Returns:
      The results (also written to OUT/metrics.json, metrics.jsonl and TensorBoard).
    """
    extractor = extractor or InceptionExtractor.load()
    reference = read_reference(reference_path, extractor.spatial_dim())
    check_networks(reference, extractor)
    start = time.perf_counter()
    samples_path = generation.generate_samples(
        generator, os.path.join(output_dir, "samples"), num_samples, classes, seed=seed,
        batch_size=batch_size, sampling=sampling, progress=progress)
    sampled = time.perf_counter()
    fake = extractor(adm_npz.read_batches(samples_path, extractor.batch_size), num_samples,
                     "sample features", progress)
    real = extractor(adm_npz.read_batches(reference.path, extractor.batch_size),
                     reference.num_images, "reference features", progress)
    if reference.statistics is None:
        mu, sigma = real.pool_statistics()
        mu_s, sigma_s = real.spatial.mean_cov()
    else:
        mu, sigma, mu_s, sigma_s = (reference.statistics[name] for name in STATISTICS)
    precision, recall = metrics.precision_recall(real.pool, fake.pool, k)
    result = dict(
        fid=metrics.frechet_distance(*fake.pool_statistics(), mu, sigma),
        sfid=metrics.frechet_distance(*fake.spatial.mean_cov(), mu_s, sigma_s),
        inception_score=metrics.inception_score(fake.probs, is_split_size),
        precision=precision,
        recall=recall,
        num_samples=num_samples,
        classes="all" if classes is None else [int(c) for c in classes],
        seed=seed,
        sampling=dict(sampling or {}),
        generator=generator.config.model.name,
        tokenizer=generator.tokenizer.config.model.name,
        samples=samples_path,
        reference=reference.path,
        reference_images=reference.num_images,
        reference_statistics_network=reference.network,
        inception_network=extractor.network,
        inception_input_size=extractor.input_size,
        random_init_inception=extractor.random_init,
        inception_score_split_size=is_split_size,
        precision_recall_k=k,
        sampling_seconds=sampled - start,
        metric_seconds=time.perf_counter() - sampled,
        notes=_notes(reference, extractor),
    )
    _write(output_dir, result, extractor.random_init)
    return result


def _write(output_dir: str, result: dict[str, Any], random_init: bool):
    write_json_atomically(os.path.join(output_dir, "metrics.json"), result)
    print(json.dumps({name: result[name] for name in METRICS}), flush=True)
    marked = lambda name: f"{name}_{RANDOM_INIT_MARKER}" if random_init else name
    writer = MetricWriter(output_dir, total_steps=0)
    writer.write_scalars(0, {f"generation/{marked(name)}": result[name] for name in METRICS})
    grid = np.asarray(Image.open(os.path.join(os.path.dirname(result["samples"]),
                                              generation.GRID_FILE)))
    writer.write_image(0, marked("samples"), grid)
    writer.close()


def _reference_images(config: ml_collections.ConfigDict, batch_size: int
                      ) -> tuple[Iterable[tuple[np.ndarray, np.ndarray]], int]:
    """Batches (uint8 images [b, S, S, 3], indices [b]) of the split with the evaluation
    transform, and their count."""
    if config.data.name in TOKEN_SOURCES:
        raise ValueError(f"data.name={config.data.name!r} holds tokens; a reference batch "
                         "needs images")
    source = data.make_source(config.data, config.reference.split)
    count = len(source)
    if config.reference.num_images > 0:
        count = min(count, config.reference.num_images)
    transform = data.get_transform(config.data.transform).eval
    size = config.data.image_size
    dataset = (grain.MapDataset.range(count)
               .map(lambda i: (transform(source[i], size), np.int64(i)))
               .batch(batch_size))
    read = grain.ReadOptions(num_threads=config.data.read_threads,
                             prefetch_buffer_size=config.data.read_threads)
    return dataset.to_iter_dataset(read), count


def write_reference(config: ml_collections.ConfigDict, output_path: str,
                    extractor: InceptionExtractor | None = None, progress: bool = True
                    ) -> dict[str, Any]:
    """Writes a reference batch of `config.data`'s images in the ADM format (plus the network).

    Args:
      config: `data` (the images, with their evaluation transform at data.image_size) and
        `reference` (`default_reference_config`).
      output_path: the .npz to write.
    Returns:
      A summary (path, counts, network).
    """
    extractor = extractor or InceptionExtractor.load()
    if os.path.exists(output_path):
        raise FileExistsError(f"{output_path} exists; choose a new output file")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    batches, count = _reference_images(config, extractor.batch_size)
    if count < 2:
        raise ValueError(f"the {config.reference.split} split has {count} image(s); statistics "
                         "need at least 2")
    num_kept = min(config.reference.keep_images, count)
    kept_indices = set(((np.arange(num_kept) * count) // num_kept).tolist())
    kept = []

    def images():
        for batch_images, indices in batches:
            kept.extend(image for image, i in zip(batch_images, indices) if int(i) in kept_indices)
            yield batch_images

    activations = extractor(images(), count, "reference features", progress)
    mu, sigma = activations.pool_statistics()
    mu_s, sigma_s = activations.spatial.mean_cov()
    size = config.data.image_size
    arrays = dict(arr_0=((num_kept, size, size, 3), np.uint8, kept),
                  **{name: (value.shape, np.float64, [value]) for name, value in
                     dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s).items()},
                  **{NETWORK_KEY: ((), np.dtype(f"<U{len(extractor.network)}"),
                                   [np.array(extractor.network)])})
    adm_npz.write_npz(output_path, arrays)
    return dict(reference=os.path.abspath(output_path), images=count, kept_images=num_kept,
                split=config.reference.split, data=config.data.name,
                inception_network=extractor.network)
