"""The evaluation job: reconstruction metrics of a tokenizer checkpoint on an evaluation set.

    result = evaluate(config, "runs/flowmo_lo", "runs/flowmo_lo/eval")   # latest EMA params
    evaluate_continuously(config, "runs/flowmo_lo", "runs/flowmo_lo/eval")  # each new step once

Metrics (spec flowmo.md section 8, detailflow.md section 7), over every non-padding example:
  rfid              Frechet distance between Inception features of the originals and of the
                    reconstructions (both float in [0, 1]; reconstructions clamped, not uint8).
  psnr, ssim        per-image means on the float [0, 1] images (data range 1).
  psnr_flowmo_batch_compat  (FlowMo) the original evaluator's PSNR: one PSNR per consecutive
                    group of 5 uint8-truncated images, averaged (`metrics.batch_psnr_compat`);
                    only when eval.batch_size is a multiple of 5; groups holding padding are
                    left out.
  psnr_detailflow_compat, ssim_detailflow_compat  (DetailFlow) the original's
                    reconstruct_vq.py numbers: reconstructions to uint8 by clamp(127.5 x + 128)
                    truncation, PSNR with data range 1 and SSIM with data_range=2.0 on [0, 1]
                    images (which inflates SSIM), per image.
  lpips_vgg         LPIPS-VGG on [-1, 1]. The original also reports LPIPS-alex, which this
                    library does not provide. Left out (None) below 16 px, where VGG's fifth
                    stage has no pixels.
  codebook_usage, codebook_perplexity, bits_per_pixel (of the full reconstruction).

A model may add variants, each with the same per-image metrics and rFID against its own
targets, listed under its group in the results and logged as eval/<variant>/<metric>.
DetailFlow has two (`detailflow_reconstructor`):
  prefix_curve      (eval.prefix_curve) for each prefix length n of eval.prefix_lengths (empty:
                    every allowed one), the decode of the first n clean tokens at its output
                    size S(n) (R(n) rounded up to the patch size), against the image degraded
                    as in training (area to R(n), bicubic to S(n); spec 2). The original has no
                    such curve (its evaluator reconstructs with all tokens); this target is the
                    one the model is trained to reproduce at n.
  noisy             (eval.noisy) the original's noisy evaluation (reconstruct_vq.py
                    --noisy-eval, on by default there): the self-correction encode with the
                    token (noise_idx < causal_num) or group at noise_idx replaced by a random
                    one of its 50 nearest codes and the rest re-encoded, decoded with all N
                    tokens against the original image, for noise_idx in
                    g * [0, G // 4, 2 (G // 4), 3 (G // 4), G - 1], G = N / g ({0, 32, 64, 96,
                    120} for DetailFlow-16).

Outputs (process 0), in the output directory OUT:
  OUT/metrics_<tag>.json              everything above, plus the run's settings and notes
  OUT/images/reconstructions_<step>.png  originals (top row) above their reconstructions
  OUT/metrics.jsonl, OUT/tensorboard/ scalars "eval/<name>" (`training.writer.MetricWriter`)
  OUT/evaluated_steps.json            continuous mode: the steps already evaluated
where <tag> is step_<step> for a training workdir and "model" for a model directory (step 0).

With random-init metric networks (eval.allow_random_init_networks, smoke tests only) every
output says so: the JSON has random_init_networks=true and a note, the metrics that depend on
those networks are named rfid_RANDOM_INIT / lpips_vgg_RANDOM_INIT in metrics.jsonl and
TensorBoard, and the grid is named reconstructions_RANDOM_INIT (file and TensorBoard tag).

Batches are split over all devices (a data mesh) and processes (the data pipeline's per-process
rows). The reconstruction noise of example i is drawn from fold_in(key(eval.seed), i) (variant v:
from fold_in(fold_in(key(eval.seed), v + 1), i)), so the results depend neither on the device
count nor on the batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from tokenizers_jax import data, exported, metrics
from tokenizers_jax.detailflow_resolution import ResolutionMap
from tokenizers_jax.models import detailflow, flowmo
from tokenizers_jax.perceptual import inception, lpips
from tokenizers_jax.quantizers.vq import draw_neighbour_ranks
from tokenizers_jax.tasks.detailflow import grid_prefix_lengths, prefix_target, upsample_nearest
from tokenizers_jax.tasks.flowmo import images_to_float
from tokenizers_jax.training import checkpoint, sharding
from tokenizers_jax.training.writer import MetricWriter, image_grid

COMPAT_GROUP = 5  # images per PSNR in the original evaluator
RANDOM_INIT_MARKER = "RANDOM_INIT"
# Metrics computed with the Inception / LPIPS networks (meaningless when those are random).
NETWORK_METRICS = ("rfid", "lpips_vgg")
RECORD_FILE = "evaluated_steps.json"
LPIPS_MIN_SIZE = 16  # VGG16's fifth stage needs at least 16 x 16 pixels
NOTES = (
    "psnr and ssim are per-image means on float [0, 1] images.",
    "lpips_vgg only: LPIPS-alex (also reported by the original) is not available.",
    "rfid compares the originals' and the reconstructions' Inception features on the same images.",
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """An extra evaluation of the same images, e.g. one point of DetailFlow's prefix curve.

    run(params, images [B, S, S, 3] in [-1, 1], indices [B, L] of the main reconstruction,
    keys [B] (one per example)) -> (targets, reconstructions), both [B, s, s, 3] in [-1, 1].
    """

    name: str  # metric prefix, e.g. "prefix_16"
    group: str  # the results list it joins, e.g. "prefix_curve"
    info: Mapping[str, Any]  # reported beside its metrics, e.g. {"num_tokens": 16}
    run: Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Reconstructor:
    """The model-specific part of the evaluation.

    reconstruct(params, images [B, S, S, 3] in [-1, 1], noise [B, S, S, 3]) ->
      (indices int32 [B, tokens_per_image] in [0, codebook_size), reconstructions in [-1, 1]).
    compat(targets, reconstructions), both [B, S, S, 3] in [-1, 1] -> {name: [B]}: the
      original evaluator's per-image metrics, for comparison with the paper only.
    grid(params, indices) -> [R, B, S, S, 3] in [-1, 1]: the image grid's rows under the
      originals (default: the reconstructions).
    """

    reconstruct: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    abstract_params: Any  # tree of jax.ShapeDtypeStruct
    codebook_size: int
    bits_per_token: float
    tokens_per_image: int
    batch_psnr_compat: bool = False  # FlowMo's psnr_flowmo_batch_compat
    compat: Callable[[jax.Array, jax.Array], dict[str, jax.Array]] | None = None
    grid: Callable[[Any, jax.Array], jax.Array] | None = None
    variants: tuple[Variant, ...] = ()
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # in the results
    notes: tuple[str, ...] = ()


def flowmo_reconstructor(config: ml_collections.ConfigDict) -> Reconstructor:
    """FlowMo: LFQ codewords of fg bits, decoded with `config.sampler`."""
    model = flowmo.build_model(config)
    bits = model.config.codebook_size_for_entropy

    def reconstruct(params, images, noise):
        code = model.apply({"params": params}, images, method=flowmo.FlowMo.encode)
        quantized = flowmo.quantize(code, model.config, with_losses=False)
        return quantized.indices, flowmo.sample(model, params, quantized.codes, noise,
                                                config.sampler)

    return Reconstructor(
        reconstruct, flowmo.abstract_params(model), 2**bits, bits, model.config.tokens_per_image,
        batch_psnr_compat=True, settings={"sampler": config.sampler.to_dict()},
        notes=("psnr_flowmo_batch_compat is the original evaluator's batch PSNR (groups of 5 "
               "uint8-truncated images), for comparison with the paper only.",))


def detailflow_compat(targets: jax.Array, reconstructions: jax.Array) -> dict[str, jax.Array]:
    """DetailFlow's reconstruct_vq.py metrics (compatibility only): the reconstruction to uint8
    by clamp(127.5 x + 128, 0, 255) truncated, then skimage PSNR (data range 1) and SSIM with
    data_range=2.0 on [0, 1] images. [B, S, S, 3] in [-1, 1] -> {name: [B]}."""
    targets01 = (jnp.asarray(targets, jnp.float32) + 1) / 2
    uint8 = jnp.floor(jnp.clip(127.5 * reconstructions + 128, 0, 255))
    reconstructions01 = uint8 / 255.0
    return {"psnr_detailflow_compat": metrics.psnr(targets01, reconstructions01, 1.0),
            "ssim_detailflow_compat": metrics.ssim(targets01, reconstructions01, 2.0)}


def detailflow_noise_indices(res_map: ResolutionMap) -> tuple[int, ...]:
    """The original's noisy-eval indices g * [0, G//4, 2 (G//4), 3 (G//4), G - 1], G = N / g,
    without repeats ({0, 32, 64, 96, 120} for N = 128, g = 8)."""
    groups = res_map.num_tokens // res_map.group_size
    quarter = groups // 4
    indices = [i * res_map.group_size for i in (0, quarter, 2 * quarter, 3 * quarter, groups - 1)]
    return tuple(dict.fromkeys(indices))


def detailflow_reconstructor(config: ml_collections.ConfigDict) -> Reconstructor:
    """DetailFlow: VQ indices of log2(K) bits, all N tokens decoded at full size; the prefix
    curve and the noisy-eval variants of `eval` (see the module docstring)."""
    model = detailflow.model_from_config(config)
    m, ev = config.model, config.eval
    res_map = ResolutionMap.from_config(m)
    n_max = m.num_latent_tokens
    full_grid = res_map.output_grid(n_max)
    apply = lambda params, *args, method: model.apply({"params": params}, *args, method=method)

    def decode(params, indices, n):
        images = apply(params, indices, n, res_map.output_grid(n),
                       method=detailflow.DetailFlow.decode_indices)
        return jnp.clip(images, -1.0, 1.0)

    def reconstruct(params, images, noise):
        del noise
        indices = apply(params, images, method=detailflow.DetailFlow.encode).indices
        return indices, decode(params, indices, n_max)

    def prefix_variant(n):
        def run(params, images, indices, keys):
            del keys
            return prefix_target(images, res_map, n), decode(params, indices, n)

        info = dict(num_tokens=n, resolution=res_map.resolution(n),
                    output_size=res_map.output_resolution(n))
        return Variant(f"prefix_{n}", "prefix_curve", info, run)

    def noisy_variant(noise_idx):
        def run(params, images, indices, keys):
            del indices
            ranks = jax.vmap(lambda k: draw_neighbour_ranks(k, (n_max,), m.neighbour_top_k))(keys)

            def corrected(module, x):
                quant = module.self_correction(x, noise_idx, ranks).quant
                return module.decode(quant, n_max, full_grid)

            return images, jnp.clip(apply(params, images, method=corrected), -1.0, 1.0)

        info = dict(noise_idx=noise_idx, noise_num=res_map.noise_count(noise_idx))
        return Variant(f"noise_{noise_idx}", "noisy", info, run)

    allowed = res_map.prefix_lengths()
    prefixes = tuple(ev.prefix_lengths) or allowed
    wrong = [n for n in prefixes if n not in allowed]
    if wrong:
        raise ValueError(f"eval.prefix_lengths {wrong} are not allowed prefix lengths; choose "
                         f"from {allowed} (or () for all)")
    variants = []
    if ev.prefix_curve:
        variants += [prefix_variant(n) for n in prefixes]
    if ev.noisy:
        variants += [noisy_variant(i) for i in detailflow_noise_indices(res_map)]
    grid_prefixes = grid_prefix_lengths(res_map)

    def grid(params, indices):
        return jnp.stack([upsample_nearest(decode(params, indices, n), m.image_size)
                          for n in grid_prefixes])

    bits = float(np.log2(m.codebook_size))
    return Reconstructor(
        reconstruct, detailflow.init_params(config, jax.random.PRNGKey(0), abstract=True),
        m.codebook_size, bits, n_max, compat=detailflow_compat, grid=grid,
        variants=tuple(variants),
        settings={"grid_prefix_lengths": list(grid_prefixes)},
        notes=("psnr_detailflow_compat and ssim_detailflow_compat are the original "
               "reconstruct_vq.py's numbers (uint8 by clamp(127.5 x + 128) truncation; SSIM "
               "with data_range 2.0 on [0, 1] images, which inflates it), for comparison with "
               "the paper only. Its rFID uses torchmetrics' Inception on uint8 images; rfid here "
               "uses the pytorch-fid Inception on float images.",
               "prefix_curve: the first n clean tokens decoded at their output size against the "
               "image degraded as in training (area to R(n), bicubic to the output size); the "
               "original evaluates with all tokens only.",
               "noisy: the original's noisy evaluation (one token or group at noise_idx replaced "
               "by a random one of its top-k nearest codes, the rest re-encoded), against the "
               "original image.",
               f"The grid shows decodes at {list(grid_prefixes)} tokens, each at its output "
               "size, nearest-upsampled to the full size."))


class _Compiled(NamedTuple):
    """An Evaluator's jitted functions for one model config."""

    reconstructor: Reconstructor
    main: Callable  # make_eval_step
    variants: tuple[Callable, ...]  # make_variant_step, per variant
    image_metrics: Callable  # image_metrics, for the main reconstruction and the variants
    grid: Callable | None  # Reconstructor.grid


# model.name -> Reconstructor factory.
RECONSTRUCTORS: dict[str, Callable[[ml_collections.ConfigDict], Reconstructor]] = {
    "flowmo": flowmo_reconstructor,
    "detailflow": detailflow_reconstructor,
}


def check_checkpoint_dir(checkpoint_dir: str):
    """Raises FileNotFoundError unless `checkpoint_dir` is a model directory or a workdir."""
    if exported.is_model_dir(checkpoint_dir):
        return
    model_dir = "a model directory (config.json and params/, from python -m tokenizers_jax.convert)"
    workdir = "a training workdir (config.json and checkpoints/)"
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no such directory: {checkpoint_dir}; --checkpoint must be "
                                f"{model_dir} or {workdir}")
    if not os.path.isfile(os.path.join(checkpoint_dir, exported.CONFIG_FILE)):
        raise FileNotFoundError(f"{checkpoint_dir} is neither {model_dir} nor {workdir}: it has "
                                "no config.json")


def check_supported(config: ml_collections.ConfigDict):
    """Raises ValueError unless the evaluation supports `config.model.name`."""
    name = config.model.name
    if name not in RECONSTRUCTORS:
        raise ValueError(f"evaluation is not supported yet for {name}; supported models: "
                         f"{', '.join(sorted(RECONSTRUCTORS))}")


def checkpoint_config(checkpoint_dir: str) -> ml_collections.ConfigDict:
    """The config stored with a model directory or a training workdir."""
    check_checkpoint_dir(checkpoint_dir)
    if exported.is_model_dir(checkpoint_dir):
        return exported.load_config(checkpoint_dir)
    return checkpoint.load_config(checkpoint_dir)


def with_model_of(config: ml_collections.ConfigDict, checkpoint_dir: str
                  ) -> ml_collections.ConfigDict:
    """`config` with its `model` section replaced by the checkpoint's (what its params fit)."""
    stored = checkpoint_config(checkpoint_dir).model
    merged = ml_collections.ConfigDict(config.to_dict())
    if exported.config_to_json(merged.model) != exported.config_to_json(stored):
        logging.warning("the model section of %s differs from --config; using the checkpoint's",
                        checkpoint_dir)
    merged.model = stored
    return merged


def restore_params(checkpoint_dir: str, abstract_params: Any, mesh: jax.sharding.Mesh,
                   step: int | None) -> Any:
    """Params replicated over `mesh`: a model directory's, or the EMA params of a workdir step."""
    replicated = sharding.replicated(mesh)
    shardings = jax.tree.map(lambda _: replicated, abstract_params)
    if exported.is_model_dir(checkpoint_dir):
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params, shardings)
        return exported.load_params(checkpoint_dir, target)
    return checkpoint.restore_params(checkpoint_dir, abstract_params, shardings,
                                     item="ema_params", step=step)


def example_noise(seed: int, first_index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Noise [B, *shape[1:]] of examples first_index .. first_index + B - 1 (B = shape[0])."""
    key = jax.random.key(seed)
    indices = first_index + jnp.arange(shape[0])
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape[1:]))(indices)


def example_keys(seed: int, stream: int, first_index: jax.Array, batch: int) -> jax.Array:
    """Keys [B] of examples first_index .. + B - 1 in random stream `stream` (variant v: v + 1)."""
    key = jax.random.fold_in(jax.random.key(seed), stream)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(batch))


def image_metrics(inception_params: Any, lpips_params: Any, targets: jax.Array,
                  reconstructions: jax.Array, compat: Callable | None = None) -> dict:
    """Per-image metrics of reconstructions against targets, both [B, S, S, 3] in [-1, 1]:
    psnr, ssim, lpips [B] (lpips only from 16 px on), real_features, recon_features
    [B, 2048], and the model's compatibility metrics."""
    targets01, reconstructions01 = (targets + 1) / 2, (reconstructions + 1) / 2
    outputs = dict(
        psnr=metrics.psnr(targets01, reconstructions01),
        ssim=metrics.ssim(targets01, reconstructions01),
        real_features=inception.inception_features(inception_params, targets01),
        recon_features=inception.inception_features(inception_params, reconstructions01),
    )
    if min(targets.shape[1:3]) >= LPIPS_MIN_SIZE:
        outputs["lpips"] = lpips.lpips_distance(lpips_params, targets, reconstructions)
    if compat is not None:
        outputs.update(compat(targets, reconstructions))
    return outputs


def make_eval_step(reconstructor: Reconstructor, seed: int):
    """(params, uint8 images [B, S, S, 3], mask [B], first example index []) -> (per-batch
    outputs, images and reconstructions [B, S, S, 3] in [-1, 1], indices [B, tokens_per_image]).

    Outputs: mask [B]; code_counts [codebook_size] over the unmasked rows; compat_psnr,
    compat_valid [B / 5] for FlowMo's batch PSNR when B % 5 == 0. The `image_metrics` are a
    separate step, shared with the variants (one compilation per image size).
    """

    def step(params, images_uint8, mask, first_index):
        images = images_to_float(images_uint8)
        noise = example_noise(seed, first_index, images.shape)
        indices, reconstructions = reconstructor.reconstruct(params, images, noise)
        weights = jnp.broadcast_to(mask[:, None], indices.shape).astype(jnp.int32)
        counts = jnp.zeros(reconstructor.codebook_size, jnp.int32).at[indices].add(weights)
        outputs = dict(mask=mask, code_counts=counts)
        batch = images.shape[0]
        if reconstructor.batch_psnr_compat and batch % COMPAT_GROUP == 0:
            images01, reconstructions01 = (images + 1) / 2, (reconstructions + 1) / 2
            grouped = lambda x: x.reshape(batch // COMPAT_GROUP, COMPAT_GROUP, *x.shape[1:])
            outputs["compat_psnr"] = jax.vmap(metrics.batch_psnr_compat)(
                grouped(images01), grouped(reconstructions01))
            outputs["compat_valid"] = jnp.all(grouped(mask), axis=1)
        return outputs, images, reconstructions, indices

    return step


def make_variant_step(variant: Variant, stream: int, seed: int):
    """(params, uint8 images [B, S, S, 3], indices [B, L], first example index []) ->
    (targets, reconstructions) of `variant`, with the example keys of `stream`."""

    def step(params, images_uint8, indices, first_index):
        keys = example_keys(seed, stream, first_index, images_uint8.shape[0])
        return variant.run(params, images_to_float(images_uint8), indices, keys)

    return step


# make_eval_step outputs that are not per-image metrics.
_NOT_PER_IMAGE = ("mask", "code_counts", "real_features", "recon_features", "compat_psnr",
                  "compat_valid")


class _Totals:
    """Host accumulators (float64) of the per-batch outputs, over the valid rows."""

    def __init__(self, codebook_size: int = 0):
        self.count = 0
        self.sums: dict[str, float] = {}
        self.real = metrics.FeatureStats(inception.FEATURE_DIM)
        self.recon = metrics.FeatureStats(inception.FEATURE_DIM)
        self.code_counts = np.zeros(codebook_size, np.int64)
        self.compat_sum, self.compat_groups = 0.0, 0

    def update(self, outputs: dict[str, np.ndarray], mask: np.ndarray):
        self.count += int(mask.sum())
        for name, value in outputs.items():
            if name not in _NOT_PER_IMAGE:
                self.sums[name] = self.sums.get(name, 0.0) + float(
                    np.sum(value[mask], dtype=np.float64))
        self.real.update(outputs["real_features"][mask])
        self.recon.update(outputs["recon_features"][mask])
        if "code_counts" in outputs:
            self.code_counts += outputs["code_counts"]
        if "compat_psnr" in outputs:
            valid = outputs["compat_valid"]
            self.compat_sum += float(np.sum(outputs["compat_psnr"][valid], dtype=np.float64))
            self.compat_groups += int(valid.sum())

    def image_metrics(self) -> dict[str, Any]:
        """rfid, psnr, ssim, lpips_vgg (None when not measured) and the compat means."""
        real_mean, real_cov = self.real.mean_cov()
        recon_mean, recon_cov = self.recon.mean_cov()
        mean = lambda name: self.sums[name] / self.count if name in self.sums else None
        result = dict(rfid=metrics.frechet_distance(real_mean, real_cov, recon_mean, recon_cov),
                      psnr=mean("psnr"), ssim=mean("ssim"), lpips_vgg=mean("lpips"))
        result.update({name: mean(name) for name in sorted(self.sums)
                       if name not in ("psnr", "ssim", "lpips")})
        return result


class Evaluator:
    """Compiles once per model config and evaluates checkpoints on `config.data`'s eval set."""

    def __init__(self, config: ml_collections.ConfigDict):
        check_supported(config)
        self.config = config
        ev = config.eval
        random_init = bool(ev.allow_random_init_networks)
        # Fails here, before any model work, when the perceptual weights are missing.
        self.inception_params = inception.load_inception_params(
            ev.inception_path or None, allow_random_init=random_init)
        self.lpips_params = lpips.load_lpips_params(ev.lpips_path or None,
                                                    allow_random_init=random_init)
        if random_init:
            logging.warning("!!! eval.allow_random_init_networks=True: rfid and lpips_vgg use "
                            "RANDOM networks and are MEANINGLESS (tests and smoke runs only) !!!")
        self.random_init = random_init
        self.mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
        if ev.batch_size % jax.device_count():
            raise ValueError(f"eval.batch_size={ev.batch_size} must be a multiple of the "
                             f"{jax.device_count()} devices")
        self.inception_params = sharding.replicate(self.inception_params, self.mesh)
        self.lpips_params = sharding.replicate(self.lpips_params, self.mesh)
        self.num_examples = len(data.make_source(config.data, "eval"))
        if config.data.num_eval_examples > 0:
            self.num_examples = min(self.num_examples, config.data.num_eval_examples)
        if self.num_examples < 2:
            raise ValueError(f"the evaluation set has {self.num_examples} examples; FID needs 2")
        self._compiled: dict[str, _Compiled] = {}
        batch = sharding.batch_sharding(self.mesh)
        replicated = sharding.replicated(self.mesh)
        self._batch, self._replicated = batch, replicated

    def _step_for(self, config: ml_collections.ConfigDict) -> _Compiled:
        key = exported.config_to_json(config.model)
        if key not in self._compiled:
            check_supported(config)
            reconstructor = RECONSTRUCTORS[config.model.name](config)
            step = make_eval_step(reconstructor, config.eval.seed)
            batch, replicated = self._batch, self._replicated
            # Outputs replicated: every process reads the whole global batch's metrics.
            main = jax.jit(step, in_shardings=(replicated, batch, batch, replicated),
                           out_shardings=(replicated, batch, batch, batch))
            variants = tuple(
                jax.jit(make_variant_step(variant, index + 1, config.eval.seed),
                        in_shardings=(replicated, batch, batch, replicated),
                        out_shardings=(batch, batch))
                for index, variant in enumerate(reconstructor.variants))
            # One metrics function for all (compiled once per image size).
            image_metrics_step = jax.jit(
                functools.partial(image_metrics, compat=reconstructor.compat),
                in_shardings=(replicated, replicated, batch, batch), out_shardings=replicated)
            grid = None
            if reconstructor.grid is not None:
                grid = jax.jit(reconstructor.grid, in_shardings=(replicated, batch),
                               out_shardings=replicated)
            self._compiled[key] = _Compiled(reconstructor, main, variants, image_metrics_step,
                                            grid)
        return self._compiled[key]

    def run(self, checkpoint_dir: str, output_dir: str, step: int | None = None) -> dict:
        """Evaluates one checkpoint (a workdir's `step`, default its latest) -> the results."""
        checkpoint_dir = os.path.abspath(checkpoint_dir)
        config = with_model_of(self.config, checkpoint_dir)
        is_model_dir = exported.is_model_dir(checkpoint_dir)
        if not is_model_dir and step is None:
            step = checkpoint.latest_step(checkpoint_dir)
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}")
        compiled = self._step_for(config)
        params = restore_params(checkpoint_dir, compiled.reconstructor.abstract_params,
                                self.mesh, step)
        totals, variant_totals, grid, seconds = self._loop(config, compiled, params)
        result = self._summarise(config, compiled.reconstructor, totals, variant_totals,
                                 checkpoint_dir, None if is_model_dir else step, seconds)
        if jax.process_index() == 0:
            self._write(output_dir, result, grid, step or 0)
        return result

    def _loop(self, config, compiled: _Compiled, params):
        batch_size = config.eval.batch_size
        reconstructor = compiled.reconstructor
        totals = _Totals(reconstructor.codebook_size)
        variant_totals = [_Totals() for _ in reconstructor.variants]
        grid_size = min(config.eval.grid_size, self.num_examples)
        originals, rows = [], []
        start = time.perf_counter()
        progress = tqdm(total=self.num_examples, unit="img", desc="eval", dynamic_ncols=True,
                        disable=jax.process_index() != 0)
        batches = data.make_eval_iterator(config.data, global_batch_size=batch_size)
        for index, local_batch in enumerate(batches):
            images, mask = sharding.global_batch((local_batch["image"], local_batch["mask"]),
                                                 self.mesh)
            first_index = sharding.replicate(np.int32(index * batch_size), self.mesh)
            outputs, images_float, recon, indices = compiled.main(params, images, mask,
                                                                  first_index)
            outputs = jax.device_get(outputs)
            valid = outputs["mask"]
            outputs.update(jax.device_get(compiled.image_metrics(
                self.inception_params, self.lpips_params, images_float, recon)))
            totals.update(outputs, valid)
            for variant_step, variant_total in zip(compiled.variants, variant_totals):
                targets, variant_recon = variant_step(params, images, indices, first_index)
                variant_total.update(jax.device_get(compiled.image_metrics(
                    self.inception_params, self.lpips_params, targets, variant_recon)), valid)
            if sum(len(x) for x in originals) < grid_size:
                batch_rows = recon[None] if compiled.grid is None else compiled.grid(params,
                                                                                     indices)
                images_host, rows_host = multihost_utils.process_allgather(
                    (images, batch_rows), tiled=True)
                originals.append(images_to_float(images_host[valid]))
                rows.append(np.asarray(rows_host)[:, valid])
            progress.update(int(valid.sum()))
        progress.close()
        grid = None
        if grid_size:
            grid_rows = np.concatenate(rows, axis=1)[:, :grid_size]
            grid = image_grid([np.concatenate(originals)[:grid_size], *grid_rows])
        return totals, variant_totals, grid, time.perf_counter() - start

    def _summarise(self, config, reconstructor, totals: _Totals, variant_totals, checkpoint_dir,
                   step, seconds):
        if totals.count != self.num_examples:
            raise RuntimeError(f"evaluated {totals.count} examples, expected {self.num_examples}")
        usage = metrics.codebook_usage_from_counts(totals.code_counts)
        size = config.data.image_size
        notes = list(NOTES) + list(reconstructor.notes)
        if self.random_init:
            notes.insert(0, "RANDOM-INIT Inception and LPIPS networks "
                         "(eval.allow_random_init_networks=True): rfid and lpips_vgg are "
                         "meaningless; for tests and smoke runs only.")
        result = dict(checkpoint=checkpoint_dir, step=step, model=config.model.name,
                      num_examples=totals.count, **totals.image_metrics())
        if reconstructor.batch_psnr_compat:
            result["psnr_flowmo_batch_compat"] = (
                totals.compat_sum / totals.compat_groups if totals.compat_groups else None)
        result.update(
            codebook_usage=float(usage.fraction_used),
            codebook_perplexity=float(usage.perplexity),
            bits_per_pixel=metrics.bits_per_pixel(reconstructor.tokens_per_image,
                                                  reconstructor.bits_per_token, size, size),
        )
        for variant, variant_total in zip(reconstructor.variants, variant_totals):
            result.setdefault(variant.group, []).append(
                {"name": variant.name, **variant.info, **variant_total.image_metrics()})
        result.update(
            random_init_networks=self.random_init,
            seed=config.eval.seed,
            batch_size=config.eval.batch_size,
            image_size=size,
            data=config.data.name,
            **reconstructor.settings,
            devices=jax.device_count(),
            processes=jax.process_count(),
            seconds=seconds,
            images_per_second=totals.count / seconds,
            notes=notes,
        )
        return result

    def _write(self, output_dir: str, result: dict, grid: np.ndarray | None, step: int):
        os.makedirs(output_dir, exist_ok=True)
        tag = "model" if result["step"] is None else f"step_{step}"
        text = json.dumps(result, indent=2, sort_keys=True)
        _write_atomically(os.path.join(output_dir, f"metrics_{tag}.json"), text)
        print(text, flush=True)
        writer = MetricWriter(output_dir, total_steps=step)
        marked = lambda name: (f"{name}_{RANDOM_INIT_MARKER}" if self.random_init
                               and name in (*NETWORK_METRICS, "reconstructions") else name)
        scalars = {f"eval/{marked(name)}": value for name, value in result.items()
                   if isinstance(value, float) and name not in ("seconds", "images_per_second")}
        for entries in result.values():  # the variants' lists, e.g. prefix_curve
            if isinstance(entries, list) and entries and isinstance(entries[0], dict):
                scalars.update({f"eval/{entry['name']}/{marked(name)}": value
                                for entry in entries for name, value in entry.items()
                                if isinstance(value, float)})
        writer.write_scalars(step, scalars)
        if grid is not None:
            writer.write_image(step, marked("reconstructions"), grid)
        writer.close()


def _write_atomically(path: str, text: str):
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def evaluate(config: ml_collections.ConfigDict, checkpoint_dir: str, output_dir: str,
             step: int | None = None) -> dict:
    """Evaluates a model directory or a training workdir (`step`, default the latest).

    Returns the results (also written to `output_dir` and printed, on process 0).
    """
    check_supported(config)
    check_checkpoint_dir(checkpoint_dir)  # before the minutes spent loading the networks
    return Evaluator(config).run(checkpoint_dir, output_dir, step)


def read_record(output_dir: str) -> list[int]:
    """The steps already evaluated by `evaluate_continuously` into `output_dir`."""
    path = os.path.join(output_dir, RECORD_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)["steps"]


def _next_step(workdir: str, done: list[int], max_checkpoints: int, evaluated: int) -> int:
    """Process 0's decision: the oldest unevaluated step, -1 to wait, -2 to stop."""
    if max_checkpoints and evaluated >= max_checkpoints:
        return -2
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    steps = sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []
    pending = [s for s in steps if s not in done]
    if pending:
        return pending[0]
    if os.path.isfile(os.path.join(workdir, exported.CONFIG_FILE)):
        final_step = checkpoint.load_config(workdir).train.num_steps
        if final_step in done:
            return -2
    return -1


def evaluate_continuously(config: ml_collections.ConfigDict, workdir: str, output_dir: str,
                          poll_seconds: float = 60.0, max_checkpoints: int = 0,
                          evaluator: Evaluator | None = None) -> list[dict]:
    """Evaluates each checkpoint of a training workdir once, oldest first, as they appear.

    The evaluated steps are recorded in OUT/evaluated_steps.json (written atomically after each
    evaluation), so a restarted job skips them. Stops after `max_checkpoints` evaluations (0:
    no limit) or once the workdir's final step (train.num_steps) has been evaluated.

    Args:
      evaluator: an `Evaluator` of `config` to reuse (its networks and compiled step).
    Returns:
      The results of this call's evaluations.
    """
    workdir = os.path.abspath(workdir)
    check_supported(config)
    if exported.is_model_dir(workdir):
        raise ValueError(f"{workdir} is a model directory, which has no checkpoints to watch: "
                         "evaluate it once, without --continuous")
    evaluator = evaluator or Evaluator(config)
    done = read_record(output_dir)
    results = []
    while True:
        step = _next_step(workdir, done, max_checkpoints, len(results))
        step = int(multihost_utils.broadcast_one_to_all(np.int64(step)))
        if step == -2:
            return results
        if step == -1:
            time.sleep(poll_seconds)
            continue
        logging.info("evaluating step %d of %s", step, workdir)
        results.append(evaluator.run(workdir, output_dir, step))
        done = sorted(done + [step])
        if jax.process_index() == 0:
            _write_atomically(os.path.join(output_dir, RECORD_FILE),
                              json.dumps({"workdir": workdir, "steps": done}))
