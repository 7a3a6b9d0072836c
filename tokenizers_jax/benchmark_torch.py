"""Side by side with eager PyTorch: `python -m tokenizers_jax.benchmark NAME --compare-torch`.

  train       the FlowMo train step (ours: the training loop's jitted step; PyTorch: the
              reference loss, backward and torch.optim.Adam)
  flowmo      the FlowMo reconstruction (encode, LFQ, the config's sampler)
  detailflow  DetailFlow encode (to indices) and decode (every token, full resolution)
  detailflow_ar  DetailFlow's GPT sampling all N tokens of a class-conditional batch with the
              config's sampler (ours: the cached parallel group decoder; PyTorch: the
              original's `generate_group_par` loop, which re-runs the whole prefix each pass)

Both sides run the same weights (ours, through the importers' inverse) on the same inputs
and batch; PyTorch (`tokenizers_jax.torch_reference`, eager fp32) uses as many threads as the
CPUs this process may run on, which is what XLA's CPU client uses. After one warm-up call of
each side (our compile happens before it and is timed on its own), `rounds` rounds alternate
`iterations` calls of ours with `iterations` calls of PyTorch, so that both see the same
machine load. Reported per workload: median images/s of each side over the rounds, their
ratio, our compile seconds, matrix FLOPs per call (`timing.matmul_flops`) and how far apart the
two sides' outputs of the warm-up call are (where both compute the same function of the same
inputs).

A new workload is a function (config, batch_size) -> [Workload] registered in `WORKLOADS`
under the benchmark name it compares (e.g. the DetailFlow generator).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokenizers_jax import timing
from tokenizers_jax.torch_reference import import_torch


@dataclasses.dataclass
class Workload:
    """One function timed on both sides. The calls block until their results are ready."""

    name: str
    ours: Callable[[], Any]
    torch: Callable[[], Any]
    images_per_call: int
    compile_seconds: float
    flops_per_call: float
    # (our output, torch output) -> max |ours - torch| / max |torch| (None: not comparable).
    difference: Callable[[Any, Any], float] | None = None


def threads() -> int:
    """The CPUs this process may run on (XLA's CPU thread pool has as many threads)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def relative_difference(ours: Any, theirs: Any) -> float:
    """max |ours - theirs| / max |theirs| over arrays of the same shape (NHWC vs NCHW images
    are compared after moving torch's channels last)."""
    ours = np.asarray(ours, np.float64)
    theirs = theirs.detach().numpy().astype(np.float64)
    if theirs.ndim == 4 and theirs.shape[1] == 3 and ours.shape[-1] == 3:
        theirs = theirs.transpose(0, 2, 3, 1)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def _nchw(images: np.ndarray):
    torch = import_torch()
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32)
                                                 .transpose(0, 3, 1, 2)))


def _state_dict(numpy_state: dict[str, Any]) -> dict[str, Any]:
    torch = import_torch()
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in numpy_state.items()}


def _ready(fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args: jax.block_until_ready(fn(*args))


# ------------------------------------------------------------------------------------------
# FlowMo
# ------------------------------------------------------------------------------------------
def _torch_flowmo(config: ml_collections.ConfigDict, params: Any):
    """The reference FlowMo of a config, holding our params."""
    # pylint: disable=import-outside-toplevel
    from tokenizers_jax.convert import flowmo as convert_flowmo
    from tokenizers_jax.torch_reference import flowmo as reference

    m = config.model
    trunk = lambda t: reference.TrunkConfig(t.hidden_size, t.num_heads, t.depth,  # noqa: E731
                                            tuple(t.axes_dim), t.mlp_ratio)
    model = reference.FlowMo(reference.FlowMoConfig(
        image_size=m.image_size, patch_size=m.patch_size, code_length=m.code_length,
        context_dim=m.context_dim, codebook_size_for_entropy=m.codebook_size_for_entropy,
        encoder=trunk(m.encoder), decoder=trunk(m.decoder), rope_theta=m.rope_theta))
    model.load_state_dict(_state_dict(convert_flowmo.params_to_state_dict(params, config)))
    return model


def _check_float32(config: ml_collections.ConfigDict):
    if config.model.get("dtype", "float32") != "float32":
        raise ValueError(f"--compare-torch compares fp32 eager PyTorch with an fp32 model; the "
                         f"config has model.dtype={config.model.dtype!r}: drop the override")


def flowmo_reconstruct(config: ml_collections.ConfigDict, batch_size: int) -> list[Workload]:
    """The FlowMo reconstruction (encode, LFQ, the config's sampler) on random images."""
    from tokenizers_jax.models import flowmo  # pylint: disable=import-outside-toplevel

    torch = import_torch()
    _check_float32(config)
    model = flowmo.build_model(config)
    params = flowmo.init_params(model, jax.random.key(config.seed))
    size = config.model.image_size
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
    noise = rng.standard_normal(images.shape).astype(np.float32)
    fn = lambda p, x, z: flowmo.reconstruct(model, p, x, None, config, noise=z)  # noqa: E731
    ours, compile_s = timing.compile_seconds(jax.jit(fn), params, images, noise)
    reference = _torch_flowmo(config, params)
    x_t, z_t = _nchw(images), _nchw(noise)
    s = config.sampler

    def theirs():
        with torch.no_grad():
            return reference.reconstruct(x_t, z_t, steps=s.steps, schedule=s.schedule, cfg=s.cfg,
                                         cfg_interval_sigma=tuple(s.cfg_interval_sigma))

    return [Workload("reconstruct", lambda: _ready(ours)(params, images, noise), theirs,
                     batch_size, compile_s, timing.matmul_flops(fn, params, images, noise),
                     relative_difference)]


def flowmo_train_step(config: ml_collections.ConfigDict, batch_size: int) -> list[Workload]:
    """The whole FlowMo train step of the training loop (loss, gradients, Adam, EMA, fixed
    norms) against the reference's loss, backward and torch.optim.Adam step."""
    from tokenizers_jax.training import loop  # pylint: disable=import-outside-toplevel

    torch = import_torch()
    _check_float32(config)
    if config.loss.perceptual != "none" or config.loss.posttrain:
        raise ValueError("--compare-torch times the stage-1A step without a perceptual term: "
                         "set --config.loss.perceptual=none (configs/benchmark.py:flowmo does)")
    if config.train.grad_accum_steps != 1 or config.train.loss_groups != 1:
        raise ValueError("--compare-torch times one micro-batch in one LFQ group: set "
                         "train.grad_accum_steps=1 and train.loss_groups=1")
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.batch_size = batch_size
    fresh = loop.fresh_step(config)
    state = {"state": fresh.state}

    def ours():
        state["state"], metrics = fresh.step(state["state"], fresh.constants, fresh.batch)
        return jax.block_until_ready(metrics)

    run = loop.setup(config)
    static, draws = run.task.host_draws(0)
    step_fn = loop.make_train_step(run.task, run.txs, config.train, run.mesh,
                                   run.fixed_norm_mask, static)
    flops = timing.matmul_flops(step_fn, fresh.state, fresh.constants, fresh.batch, draws)

    params = jax.device_get(fresh.state.params)
    reference = _torch_flowmo(config, params)
    optim = config.optim
    adam = torch.optim.Adam(reference.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                            eps=optim.eps)
    rng = np.random.default_rng(0)
    size = config.model.image_size
    images = _nchw(rng.uniform(-1, 1, (batch_size, size, size, 3)))
    noise = torch.from_numpy(rng.standard_normal(tuple(images.shape)).astype(np.float32))
    times = torch.from_numpy(rng.uniform(0, 1, batch_size).astype(np.float32))
    keep = torch.from_numpy(rng.uniform(0, 1, batch_size) > config.loss.code_dropout)
    q = config.quantizer

    def theirs():
        adam.zero_grad(set_to_none=True)
        loss, _ = reference.training_loss(images, times, noise, keep,
                                          entropy_weight=q.entropy_weight,
                                          commit_weight=q.commit_weight,
                                          temperature=q.entropy_temperature)
        loss.backward()
        adam.step()
        return loss

    return [Workload("train_step", ours, theirs, batch_size, fresh.compile_seconds, flops)]


# ------------------------------------------------------------------------------------------
# DetailFlow
# ------------------------------------------------------------------------------------------
def detailflow_encode_decode(config: ml_collections.ConfigDict,
                             batch_size: int) -> list[Workload]:
    """DetailFlow encode (images -> indices) and decode (every token, full resolution)."""
    # pylint: disable=import-outside-toplevel
    from tokenizers_jax.convert import detailflow as convert_detailflow
    from tokenizers_jax.models import detailflow
    from tokenizers_jax.torch_reference.detailflow import Reference

    torch = import_torch()
    _check_float32(config)
    params = detailflow.init_params(config, jax.random.PRNGKey(config.seed))
    tokenizer = detailflow.DetailFlowTokenizer(config, params)
    m = config.model
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, m.image_size, m.image_size, 3))
    images = jnp.asarray(images, jnp.float32)
    n, grid = m.num_latent_tokens, m.image_size // m.decoder.patch_size
    # pylint: disable=protected-access
    encode, encode_s = timing.compile_seconds(tokenizer._encode, params, images)
    indices = encode(params, images)
    decode, decode_s = timing.compile_seconds(tokenizer._decode, params, indices, n, grid)
    encode_flops = timing.matmul_flops(tokenizer._encode, params, images)
    decode_flops = timing.matmul_flops(lambda p, i: tokenizer._decode(p, i, n, grid), params,
                                       indices)
    reference = Reference(convert_detailflow.params_to_state_dict(params, config), config)
    x_t = _nchw(images)
    codebook = torch.nn.functional.normalize(reference.sd["quantize.embedding.weight"], dim=-1)
    codes = codebook[torch.from_numpy(np.array(indices)).long()]

    def torch_encode():
        with torch.no_grad():
            return reference.quantize(reference.encoder(x_t))[1]

    def torch_decode():
        with torch.no_grad():
            return reference.decode(codes, n, m.image_size)

    def index_mismatch(ours, theirs):  # the fraction of indices that differ
        return float(np.mean(np.asarray(ours) != theirs.numpy()))

    return [
        Workload("encode", lambda: _ready(encode)(params, images), torch_encode, batch_size,
                 encode_s, encode_flops, index_mismatch),
        Workload("decode", lambda: _ready(decode)(params, indices, n), torch_decode,
                 batch_size, decode_s, decode_flops, relative_difference),
    ]


# ------------------------------------------------------------------------------------------
# DetailFlow's GPT
# ------------------------------------------------------------------------------------------
def detailflow_ar_generate(config: ml_collections.ConfigDict,
                           batch_size: int) -> list[Workload]:
    """Sampling N tokens per image for `batch_size` labels (random draws differ between the
    sides, so their outputs are not compared; tests/test_gpt.py compares their logits)."""
    # pylint: disable=import-outside-toplevel
    from tokenizers_jax import sampling
    from tokenizers_jax.convert import detailflow_gpt as convert_gpt
    from tokenizers_jax.models import gpt, group_decoding
    from tokenizers_jax.torch_reference.detailflow_gpt import TorchGPT

    _check_float32(config)
    m = config.model
    model = gpt.model_from_config(config)
    params = gpt.init_params(config, jax.random.PRNGKey(config.seed))
    settings = group_decoding.SamplerSettings.from_config(config.sampler, m.vocab_size)
    labels = jnp.arange(batch_size, dtype=jnp.int32) % m.num_classes
    keys = sampling.sample_keys(config.seed, 0, batch_size)
    dynamic = (params, labels, keys, settings.cfg, settings.temperature)
    static = dict(top_k=settings.top_k, top_p=settings.top_p, gradual_cfg=settings.gradual_cfg)
    sample = jax.jit(functools.partial(group_decoding.sample_cached, model),
                     static_argnames=tuple(static))
    compiled, compile_s = timing.compile_seconds(sample, *dynamic, **static)
    flops = timing.matmul_flops(lambda *a: sample(*a, **static), *dynamic)
    reference = TorchGPT(convert_gpt.params_to_state_dict(params, config),
                         num_tokens=m.num_tokens, group_size=m.group_size,
                         causal_num=m.causal_num, num_heads=m.num_heads,
                         num_classes=m.num_classes)
    torch_labels = np.asarray(labels)

    def theirs():
        return reference.generate(torch_labels, settings.cfg, settings.temperature,
                                  settings.top_k, settings.top_p, settings.gradual_cfg)

    return [Workload("generate", lambda: jax.block_until_ready(compiled(*dynamic)[0]), theirs,
                     batch_size, compile_s, flops)]


# Benchmark name -> the workloads it compares.
WORKLOADS: dict[str, Callable[[ml_collections.ConfigDict, int], list[Workload]]] = {
    "train": flowmo_train_step,
    "flowmo": flowmo_reconstruct,
    "detailflow": detailflow_encode_decode,
    "detailflow_ar": detailflow_ar_generate,
}


def _seconds(fn: Callable[[], Any], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def measure(workload: Workload, rounds: int, iterations: int) -> dict[str, Any]:
    """Warm-up call of each side, then `rounds` alternating rounds of `iterations` calls."""
    ours_out, torch_out = workload.ours(), workload.torch()
    difference = None if workload.difference is None else workload.difference(ours_out,
                                                                              torch_out)
    ours_s, torch_s = [], []
    for _ in range(rounds):
        ours_s.append(_seconds(workload.ours, iterations))
        torch_s.append(_seconds(workload.torch, iterations))
    ours_median, torch_median = float(np.median(ours_s)), float(np.median(torch_s))
    return {
        "ours_images_per_second": workload.images_per_call / ours_median,
        "torch_images_per_second": workload.images_per_call / torch_median,
        "ratio": torch_median / ours_median,
        "ours_compile_seconds": workload.compile_seconds,
        "ours_seconds_per_call_rounds": ours_s,
        "torch_seconds_per_call_rounds": torch_s,
        "flops_per_call": workload.flops_per_call,
        "ours_flops_per_second": workload.flops_per_call / ours_median,
        "ours_mfu": timing.utilisation(workload.flops_per_call, ours_median),
        "output_difference": difference,
    }


def run(name: str, config: ml_collections.ConfigDict, batch_size: int | None = None,
        rounds: int = 5, iterations: int = 1) -> dict[str, Any]:
    """Compares the workloads of benchmark `name`; returns a JSON-able dict."""
    if name not in WORKLOADS:
        raise ValueError(f"--compare-torch has no PyTorch side for {name!r}; it compares "
                         f"{tuple(WORKLOADS)}")
    torch = import_torch()
    torch.set_num_threads(threads())
    if batch_size is None:
        bench = config.get("benchmark")
        batch_size = (config.train.batch_size if name == "train"
                      else bench.batch_size if bench is not None else 8)
    results = {w.name: measure(w, rounds, iterations)
               for w in WORKLOADS[name](config, batch_size)}
    for workload, r in results.items():
        print(f"{name}/{workload}: ours {r['ours_images_per_second']:.2f} images/s, torch "
              f"{r['torch_images_per_second']:.2f} images/s, ratio {r['ratio']:.2f}x; "
              f"compile {r['ours_compile_seconds']:.1f} s", file=sys.stderr)
    return {
        "benchmark": f"{name} --compare-torch",
        "variant": config.get("variant"),
        "device": jax.devices()[0].device_kind,
        "threads": threads(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "jax_version": jax.__version__,
        "batch_size": batch_size,
        "rounds": rounds,
        "iterations_per_round": iterations,
        "workloads": results,
    }
