"""The evaluation job: reconstruction metrics of a tokenizer checkpoint on an evaluation set.

    result = evaluate(config, "runs/flowmo_lo", "runs/flowmo_lo/eval")   # latest EMA params
    evaluate_continuously(config, "runs/flowmo_lo", "runs/flowmo_lo/eval")  # each new step once

Metrics (spec flowmo.md section 8), over every non-padding example of the set:
  rfid              Frechet distance between Inception features of the originals and of the
                    reconstructions (both float in [0, 1]; reconstructions clamped, not uint8).
  psnr, ssim        per-image means on the float [0, 1] images (data range 1).
  psnr_flowmo_batch_compat  the original evaluator's PSNR: one PSNR per consecutive group of 5
                    uint8-truncated images, averaged (`metrics.batch_psnr_compat`); only when
                    eval.batch_size is a multiple of 5; groups holding padding are left out.
  lpips_vgg         LPIPS-VGG on [-1, 1]. The original also reports LPIPS-alex, which this
                    library does not provide.
  codebook_usage, codebook_perplexity, bits_per_pixel.

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
rows). The reconstruction noise of example i is drawn from fold_in(key(eval.seed), i), so the
results depend neither on the device count nor on the batch size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from tokenizers_jax import data, exported, metrics
from tokenizers_jax.models import flowmo
from tokenizers_jax.perceptual import inception, lpips
from tokenizers_jax.tasks.flowmo import images_to_float
from tokenizers_jax.training import checkpoint, sharding
from tokenizers_jax.training.writer import MetricWriter, image_grid

COMPAT_GROUP = 5  # images per PSNR in the original evaluator
RANDOM_INIT_MARKER = "RANDOM_INIT"
# Metrics computed with the Inception / LPIPS networks (meaningless when those are random).
NETWORK_METRICS = ("rfid", "lpips_vgg")
RECORD_FILE = "evaluated_steps.json"
NOTES = (
    "psnr and ssim are per-image means on float [0, 1] images; psnr_flowmo_batch_compat is the "
    "original evaluator's batch PSNR (groups of 5 uint8-truncated images), for comparison with "
    "the paper only.",
    "lpips_vgg only: LPIPS-alex (also reported by the original) is not available.",
    "rfid compares the originals' and the reconstructions' Inception features on the same images.",
)


@dataclasses.dataclass(frozen=True)
class Reconstructor:
    """The model-specific part of the evaluation.

    reconstruct(params, images [B, S, S, 3] in [-1, 1], noise [B, S, S, 3]) ->
      (indices int32 [B, tokens_per_image] in [0, codebook_size), reconstructions in [-1, 1]).
    """

    reconstruct: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    abstract_params: Any  # tree of jax.ShapeDtypeStruct
    codebook_size: int
    bits_per_token: float
    tokens_per_image: int


def flowmo_reconstructor(config: ml_collections.ConfigDict) -> Reconstructor:
    """FlowMo: LFQ codewords of fg bits, decoded with `config.sampler`."""
    model = flowmo.build_model(config)
    bits = model.config.codebook_size_for_entropy

    def reconstruct(params, images, noise):
        code = model.apply({"params": params}, images, method=flowmo.FlowMo.encode)
        quantized = flowmo.quantize(code, model.config, with_losses=False)
        return quantized.indices, flowmo.sample(model, params, quantized.codes, noise,
                                                config.sampler)

    return Reconstructor(reconstruct, flowmo.abstract_params(model), 2**bits, bits,
                         model.config.tokens_per_image)


# model.name -> Reconstructor factory.
RECONSTRUCTORS: dict[str, Callable[[ml_collections.ConfigDict], Reconstructor]] = {
    "flowmo": flowmo_reconstructor,
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


def make_eval_step(reconstructor: Reconstructor, seed: int):
    """(params, inception params, lpips params, uint8 images [B, S, S, 3], mask [B], first
    example index []) -> (per-batch outputs, reconstructions [B, S, S, 3] in [-1, 1]).

    Outputs: mask [B]; psnr, ssim, lpips [B]; real_features, recon_features [B, 2048];
    code_counts [codebook_size] over the unmasked rows; compat_psnr, compat_valid [B / 5] when
    B % 5 == 0.
    """

    def step(params, inception_params, lpips_params, images_uint8, mask, first_index):
        images = images_to_float(images_uint8)
        noise = example_noise(seed, first_index, images.shape)
        indices, reconstructions = reconstructor.reconstruct(params, images, noise)
        images01, reconstructions01 = (images + 1) / 2, (reconstructions + 1) / 2
        weights = jnp.broadcast_to(mask[:, None], indices.shape).astype(jnp.int32)
        counts = jnp.zeros(reconstructor.codebook_size, jnp.int32).at[indices].add(weights)
        outputs = dict(
            mask=mask,
            psnr=metrics.psnr(images01, reconstructions01),
            ssim=metrics.ssim(images01, reconstructions01),
            lpips=lpips.lpips_distance(lpips_params, images, reconstructions),
            real_features=inception.inception_features(inception_params, images01),
            recon_features=inception.inception_features(inception_params, reconstructions01),
            code_counts=counts,
        )
        batch = images.shape[0]
        if batch % COMPAT_GROUP == 0:
            grouped = lambda x: x.reshape(batch // COMPAT_GROUP, COMPAT_GROUP, *x.shape[1:])
            outputs["compat_psnr"] = jax.vmap(metrics.batch_psnr_compat)(
                grouped(images01), grouped(reconstructions01))
            outputs["compat_valid"] = jnp.all(grouped(mask), axis=1)
        return outputs, reconstructions

    return step


class _Totals:
    """Host accumulators (float64) of the per-batch outputs, over the valid rows."""

    def __init__(self, codebook_size: int):
        self.count = 0
        self.sums = dict(psnr=0.0, ssim=0.0, lpips=0.0)
        self.real = metrics.FeatureStats(inception.FEATURE_DIM)
        self.recon = metrics.FeatureStats(inception.FEATURE_DIM)
        self.code_counts = np.zeros(codebook_size, np.int64)
        self.compat_sum, self.compat_groups = 0.0, 0

    def update(self, outputs: dict[str, np.ndarray]):
        mask = outputs["mask"]
        self.count += int(mask.sum())
        for name in self.sums:
            self.sums[name] += float(np.sum(outputs[name][mask], dtype=np.float64))
        self.real.update(outputs["real_features"][mask])
        self.recon.update(outputs["recon_features"][mask])
        self.code_counts += outputs["code_counts"]
        if "compat_psnr" in outputs:
            valid = outputs["compat_valid"]
            self.compat_sum += float(np.sum(outputs["compat_psnr"][valid], dtype=np.float64))
            self.compat_groups += int(valid.sum())


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
        self._compiled: dict[str, tuple[Reconstructor, Callable]] = {}

    def _step_for(self, config: ml_collections.ConfigDict) -> tuple[Reconstructor, Callable]:
        key = exported.config_to_json(config.model)
        if key not in self._compiled:
            check_supported(config)
            reconstructor = RECONSTRUCTORS[config.model.name](config)
            step = make_eval_step(reconstructor, config.eval.seed)
            batch = sharding.batch_sharding(self.mesh)
            replicated = sharding.replicated(self.mesh)
            # Outputs replicated: every process reads the whole global batch's metrics.
            self._compiled[key] = reconstructor, jax.jit(
                step, in_shardings=(replicated, replicated, replicated, batch, batch, replicated),
                out_shardings=(replicated, batch))
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
        reconstructor, eval_step = self._step_for(config)
        params = restore_params(checkpoint_dir, reconstructor.abstract_params, self.mesh, step)
        totals, grid, seconds = self._loop(config, reconstructor, eval_step, params)
        result = self._summarise(config, reconstructor, totals, checkpoint_dir,
                                 None if is_model_dir else step, seconds)
        if jax.process_index() == 0:
            self._write(output_dir, result, grid, step or 0)
        return result

    def _loop(self, config, reconstructor, eval_step, params):
        batch_size = config.eval.batch_size
        totals = _Totals(reconstructor.codebook_size)
        grid_size = min(config.eval.grid_size, self.num_examples)
        originals, reconstructions = [], []
        start = time.perf_counter()
        progress = tqdm(total=self.num_examples, unit="img", desc="eval", dynamic_ncols=True,
                        disable=jax.process_index() != 0)
        batches = data.make_eval_iterator(config.data, global_batch_size=batch_size)
        for index, local_batch in enumerate(batches):
            images, mask = sharding.global_batch((local_batch["image"], local_batch["mask"]),
                                                 self.mesh)
            first_index = sharding.replicate(np.int32(index * batch_size), self.mesh)
            outputs, recon = eval_step(params, self.inception_params, self.lpips_params,
                                       images, mask, first_index)
            outputs = jax.device_get(outputs)
            valid = outputs["mask"]
            totals.update(outputs)
            if sum(len(x) for x in originals) < grid_size:
                images_host, recon_host = multihost_utils.process_allgather(
                    (images, recon), tiled=True)
                originals.append(images_to_float(images_host[valid]))
                reconstructions.append(recon_host[valid])
            progress.update(int(valid.sum()))
        progress.close()
        grid = None
        if grid_size:
            grid = image_grid([np.concatenate(originals)[:grid_size],
                               np.concatenate(reconstructions)[:grid_size]])
        return totals, grid, time.perf_counter() - start

    def _summarise(self, config, reconstructor, totals: _Totals, checkpoint_dir, step, seconds):
        if totals.count != self.num_examples:
            raise RuntimeError(f"evaluated {totals.count} examples, expected {self.num_examples}")
        real_mean, real_cov = totals.real.mean_cov()
        recon_mean, recon_cov = totals.recon.mean_cov()
        usage = metrics.codebook_usage_from_counts(totals.code_counts)
        size = config.data.image_size
        compat = totals.compat_sum / totals.compat_groups if totals.compat_groups else None
        notes = list(NOTES)
        if self.random_init:
            notes.insert(0, "RANDOM-INIT Inception and LPIPS networks "
                         "(eval.allow_random_init_networks=True): rfid and lpips_vgg are "
                         "meaningless; for tests and smoke runs only.")
        return dict(
            checkpoint=checkpoint_dir,
            step=step,
            model=config.model.name,
            num_examples=totals.count,
            rfid=metrics.frechet_distance(real_mean, real_cov, recon_mean, recon_cov),
            psnr=totals.sums["psnr"] / totals.count,
            psnr_flowmo_batch_compat=compat,
            ssim=totals.sums["ssim"] / totals.count,
            lpips_vgg=totals.sums["lpips"] / totals.count,
            codebook_usage=float(usage.fraction_used),
            codebook_perplexity=float(usage.perplexity),
            bits_per_pixel=metrics.bits_per_pixel(reconstructor.tokens_per_image,
                                                  reconstructor.bits_per_token, size, size),
            random_init_networks=self.random_init,
            seed=config.eval.seed,
            batch_size=config.eval.batch_size,
            image_size=size,
            data=config.data.name,
            sampler=config.sampler.to_dict(),
            devices=jax.device_count(),
            processes=jax.process_count(),
            seconds=seconds,
            images_per_second=totals.count / seconds,
            notes=notes,
        )

    def _write(self, output_dir: str, result: dict, grid: np.ndarray | None, step: int):
        os.makedirs(output_dir, exist_ok=True)
        tag = "model" if result["step"] is None else f"step_{step}"
        text = json.dumps(result, indent=2, sort_keys=True)
        _write_atomically(os.path.join(output_dir, f"metrics_{tag}.json"), text)
        print(text, flush=True)
        writer = MetricWriter(output_dir, total_steps=step)
        marked = lambda name: (f"{name}_{RANDOM_INIT_MARKER}" if self.random_init
                               else name)
        scalars = {f"eval/{marked(name) if name in NETWORK_METRICS else name}": value
                   for name, value in result.items()
                   if isinstance(value, float) and name not in ("seconds", "images_per_second")}
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
