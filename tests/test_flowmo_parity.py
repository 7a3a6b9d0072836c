"""Parity of our JAX FlowMo (through the converter) with an independent PyTorch reference.

The reference (tokenizers_jax/torch_reference/flowmo.py) is written from the behavioural spec
(/work/shared/specs/flowmo.md), not from the JAX code. Every parameter of a tiny reference is
randomised (including the zero-initialised modulation gates), its state_dict converted with
`convert.flowmo.state_dict_to_params`, and outputs compared in fp32 on CPU with all random
inputs injected.

Errors are measured as max|ours - ref| / max|ref| over a tensor (a relative error w.r.t. the
tensor's scale, robust to entries that happen to be near 0). fp32 accumulation over a few
hundred-term dot products in differently ordered kernels gives ~1e-6; the 25-step sampler and
8-step integrator compound it. Run with -s to see the measured errors.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from reference.flowmo_layout import spec_state_dict_shapes  # noqa: E402

from tokenizers_jax import flow  # noqa: E402
from tokenizers_jax.config_file import load_config  # noqa: E402
from tokenizers_jax.convert import flowmo as convert_flowmo  # noqa: E402
from tokenizers_jax.models import flowmo  # noqa: E402
from tokenizers_jax.torch_reference import flowmo as R  # noqa: E402

torch.set_grad_enabled(True)
RTOL = 2e-5  # single network passes
RTOL_ITER = 1e-4  # 25-step sampler / 8-step integrator and their gradients
MAX_ERRORS: dict[str, float] = {}
# Tiny graphs: XLA's CPU backend optimisations cost far more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_jit(fn, *args):
    """fn(*args), jit-compiled with FAST_COMPILE (eager op-by-op is slower on first use)."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def rel_err(ours, ref, name: str) -> float:
    ours = np.asarray(ours, np.float64)
    ref = ref.detach().numpy().astype(np.float64) if isinstance(ref, torch.Tensor) else np.asarray(
        ref, np.float64)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    scale = max(np.max(np.abs(ref)), 1e-30)
    err = float(np.max(np.abs(ours - ref)) / scale)
    MAX_ERRORS[name] = max(err, MAX_ERRORS.get(name, 0.0))
    print(f"  {name:45s} rel err {err:.2e}")
    return err


def check(ours, ref, name: str, rtol: float = RTOL):
    err = rel_err(ours, ref, name)
    assert err < rtol, f"{name}: relative error {err:.3e} >= {rtol}"


def nchw(x_nhwc) -> torch.Tensor:
    return torch.from_numpy(np.array(x_nhwc, np.float32)).permute(0, 3, 1, 2).contiguous()


def nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return x_nchw.detach().permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------------
# Tiny configs: both sides from the same numbers.
# --------------------------------------------------------------------------------------------
TINY = R.FlowMoConfig(
    image_size=32, patch_size=4, code_length=12, context_dim=8, codebook_size_for_entropy=4,
    # head_dim 32 / 48, three RoPE axes of different sizes so axis order matters
    encoder=R.TrunkConfig(hidden_size=64, num_heads=2, depth=2, axes_dim=(4, 12, 16)),
    decoder=R.TrunkConfig(hidden_size=96, num_heads=2, depth=2, axes_dim=(6, 22, 20)),
    rope_theta=10000.0,
)


def jax_config(ref_cfg: R.FlowMoConfig, **sampler):
    config = load_config("configs/flowmo.py:tiny")
    config.unlock()
    m = config.model
    m.image_size = ref_cfg.image_size
    m.patch_size = ref_cfg.patch_size
    m.code_length = ref_cfg.code_length
    m.context_dim = ref_cfg.context_dim
    m.codebook_size_for_entropy = ref_cfg.codebook_size_for_entropy
    m.rope_theta = ref_cfg.rope_theta
    m.dtype = "float32"
    for side in ("encoder", "decoder"):
        t = getattr(ref_cfg, side)
        getattr(m, side).update(dict(hidden_size=t.hidden_size, num_heads=t.num_heads,
                                     depth=t.depth, axes_dim=tuple(t.axes_dim),
                                     mlp_ratio=t.mlp_ratio))
    config.sampler.update(dict(steps=25, schedule="pow_0.25", cfg=1.5,
                               cfg_interval_sigma=(0.17, 1.02)))
    config.sampler.update(sampler)
    return config


@dataclasses.dataclass
class Pair:
    ref: R.FlowMo
    config: object
    model: flowmo.FlowMo
    params: dict


@pytest.fixture(scope="module")
def pair() -> Pair:
    torch.manual_seed(0)
    ref = R.randomize_(R.FlowMo(TINY), seed=1)
    config = jax_config(TINY)
    model = flowmo.build_model(config)
    params = convert_flowmo.state_dict_to_params(ref.state_dict(), config)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return Pair(ref, config, model, params)


def rng(seed):
    return np.random.default_rng(seed)


def images_nhwc(b, size, seed=0):
    return rng(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def normal_nhwc(b, size, seed):
    return rng(seed).standard_normal((b, size, size, 3)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# State dict layout of the full configs (spec 9)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,ref_cfg,ctx,n_params", [
    ("lo", R.LO, 18, 945_374_085), ("hi", R.HI, 56, 945_520_081)])
def test_state_dict_layout_full(variant, ref_cfg, ctx, n_params):
    with torch.device("meta"):
        ref = R.FlowMo(ref_cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(ref_shapes) == 608
    assert ref_shapes == spec_state_dict_shapes(ctx)
    assert sum(int(np.prod(s)) for s in ref_shapes.values()) == n_params

    config = load_config(f"configs/flowmo.py:{variant}")
    model = flowmo.build_model(config)
    abstract = flowmo.abstract_params(model)
    # Zero-stride arrays: the converter's transposes / reshapes run without allocating.
    fake = jax.tree_util.tree_map(
        lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)
    ours = convert_flowmo.params_to_state_dict(fake, config)
    ours_shapes = {k: tuple(np.shape(v)) for k, v in ours.items()}
    assert set(ours_shapes) == set(ref_shapes), (
        sorted(set(ours_shapes) ^ set(ref_shapes))[:10])
    assert ours_shapes == ref_shapes


def test_roundtrip_state_dict(pair):
    back = convert_flowmo.params_to_state_dict(pair.params, pair.config)
    sd = pair.ref.state_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(np.asarray(back[k]), v.numpy(), err_msg=k)


# --------------------------------------------------------------------------------------------
# Encoder, LFQ, decoder
# --------------------------------------------------------------------------------------------
def test_encode(pair):
    x = images_nhwc(3, TINY.image_size, seed=10)
    ours = run_jit(lambda p, x: pair.model.apply({"params": p}, x, method=flowmo.FlowMo.encode),
                   pair.params, jnp.asarray(x))
    with torch.no_grad():
        ref = pair.ref.encode(nchw(x))
    assert ours.shape == (3, TINY.code_length, TINY.context_dim)
    check(ours, ref, "encode: code")


def _lfq_compare(code: np.ndarray, ctx: int, fg: int, tag: str):
    config = jax_config(dataclasses.replace(TINY, context_dim=ctx, codebook_size_for_entropy=fg))
    model = flowmo.build_model(config)
    ours = run_jit(lambda c: flowmo.quantize(c, model.config, with_losses=True,
                                             quantizer=config.quantizer), jnp.asarray(code))
    ref = R.lfq(torch.from_numpy(code), fg, config.quantizer.entropy_weight,
                config.quantizer.commit_weight, config.quantizer.entropy_temperature)
    np.testing.assert_array_equal(np.asarray(ours.codes), ref.codes.numpy(), err_msg=tag)
    ref_idx = ref.indices.numpy()
    our_idx = np.asarray(ours.indices)
    assert our_idx.size == ref_idx.size, (our_idx.shape, ref_idx.shape)
    np.testing.assert_array_equal(our_idx.reshape(ref_idx.shape), ref_idx, err_msg=tag)
    check(ours.sample_entropy, ref.sample_entropy, f"lfq {tag}: sample entropy")
    check(ours.codebook_entropy, ref.codebook_entropy, f"lfq {tag}: codebook entropy")
    check(ours.commitment, ref.commitment, f"lfq {tag}: commitment")
    check(ours.loss, ref.loss, f"lfq {tag}: loss")
    return ref


@pytest.mark.parametrize("ctx,fg", [(8, 4), (12, 3), (6, 6)])
def test_lfq_random_codes(ctx, fg):
    code = rng(ctx * 100 + fg).standard_normal((3, 7, ctx)).astype(np.float32) * 0.7
    code[0, 0, :] = 0.0  # exact zeros quantise to -1
    ref = _lfq_compare(code, ctx, fg, f"ctx{ctx} fg{fg}")
    assert np.all(ref.codes.numpy()[0, 0] == -1)


def test_lfq_grouping_is_strided():
    """Spec 4: codeword (t, j) is features {g*fh + j}, bit g little-endian (the reference)."""
    code = -np.ones((1, 1, 8), np.float32)
    code[0, 0, 2] = 1.0  # fh = 2: feature 2 = g 1 of codeword j 0 -> index 2; codeword 1 -> 0
    code[0, 0, 7] = 1.0  # feature 7 = g 3 of codeword j 1 -> index 8
    ref = R.lfq(torch.from_numpy(code), 4)
    assert ref.indices.flatten().tolist() == [2, 8]
    ours = flowmo.quantize(jnp.asarray(code), flowmo.build_model(jax_config(TINY)).config, False)
    assert np.asarray(ours.indices).flatten().tolist() == [2, 8]


def test_lfq_of_model_code(pair):
    x = images_nhwc(2, TINY.image_size, seed=11)
    with torch.no_grad():
        code = pair.ref.encode(nchw(x)).numpy()
    assert np.min(np.abs(code)) > 1e-4  # no sign flips from rounding
    _lfq_compare(code, TINY.context_dim, TINY.codebook_size_for_entropy, "model code")


def _codes(pair, seed, b):
    x = images_nhwc(b, TINY.image_size, seed=seed)
    with torch.no_grad():
        q = pair.ref.quantize(pair.ref.encode(nchw(x)), with_losses=False)
    return R.append_mask(q.codes)


def test_decode_velocity(pair):
    b = 4
    code = _codes(pair, 12, b)
    code[1] = 0.0  # a null code
    z = normal_nhwc(b, TINY.image_size, seed=13)
    decode = jax.jit(lambda p, z, t, c: pair.model.apply({"params": p}, z, t, c,
                                                         method=flowmo.FlowMo.decode))
    decode = decode.lower(pair.params, jnp.asarray(z), jnp.zeros((b,), jnp.float32),
                          jnp.asarray(code.numpy())).compile(FAST_COMPILE)
    for t in ([0.0, 0.3, 0.77, 1.0], [0.05, 0.5, 0.5, 0.95], [0.1452991, 0.5049505, 0.2, 0.8]):
        t_np = np.asarray(t, np.float32)
        ours = decode(pair.params, jnp.asarray(z), jnp.asarray(t_np), jnp.asarray(code.numpy()))
        with torch.no_grad():
            ref = pair.ref.decode(nchw(z), torch.from_numpy(t_np), code)
        check(ours, nhwc(ref), f"decode: velocity t={t}")


# --------------------------------------------------------------------------------------------
# Training loss (spec 5, 6)
# --------------------------------------------------------------------------------------------
MODES = ("no_perceptual", "one_step", "posttrain")
LOSS_TERMS = ("flow", "sample_entropy", "codebook_entropy", "commit", "quantizer", "perceptual",
              "total")


def torch_mse(x, y):
    return ((x - y) ** 2).mean(dim=(1, 2, 3))


def jax_mse(x, y):
    return jnp.mean(jnp.square(x - y), axis=(1, 2, 3))


def _loss_setup(mode):
    config = jax_config(TINY)
    config.loss.posttrain = mode == "posttrain"
    config.loss.perceptual_weight = 0.01 if mode == "posttrain" else 0.1
    return config, (None if mode == "no_perceptual" else jax_mse)


def _draws(b, size, k):
    return flowmo.TrainingDraws(
        times=jnp.asarray([0.2, 0.6, 0.93][:b], jnp.float32),
        noise=jnp.asarray(normal_nhwc(b, size, seed=21)),
        keep_code=jnp.asarray([True, False, True][:b]),  # the 2nd sample gets the null code
        posttrain_noise=jnp.asarray(normal_nhwc(b, size, seed=22)),
        posttrain_uniforms=jnp.asarray(rng(23).uniform(0.05, 1.0, (b, k + 1)), jnp.float32),
    )


def _ref_loss(pair, x, draws, config, mode):
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    return pair.ref.training_loss(
        nchw(x), t(draws.times), nchw(draws.noise), t(draws.keep_code),
        perceptual_fn=None if mode == "no_perceptual" else torch_mse,
        perceptual_weight=config.loss.perceptual_weight, posttrain=config.loss.posttrain,
        posttrain_noise=nchw(draws.posttrain_noise), posttrain_uniforms=t(draws.posttrain_uniforms),
        entropy_weight=config.quantizer.entropy_weight,
        commit_weight=config.quantizer.commit_weight,
        temperature=config.quantizer.entropy_temperature)


def test_training_loss_terms(pair):
    """All three modes (no perceptual / one-step estimate / post-training sample), one compile."""
    b, size = 3, TINY.image_size
    x = images_nhwc(b, size, seed=20)
    draws = _draws(b, size, jax_config(TINY).loss.posttrain_sample_k)

    def all_modes(params, x, draws):
        out = {}
        for mode in MODES:
            config, perceptual = _loss_setup(mode)
            out[mode] = flowmo.training_loss(pair.model, params, x, jax.random.key(0), config,
                                             perceptual_fn=perceptual, draws=draws)
        return out

    ours = run_jit(all_modes, pair.params, jnp.asarray(x), draws)
    for mode in MODES:
        config, _ = _loss_setup(mode)
        total, terms = ours[mode]
        with torch.no_grad():
            ref_total, ref_terms = _ref_loss(pair, x, draws, config, mode)
        assert float(ref_terms["perceptual"]) > 0 or mode == "no_perceptual"
        for name in LOSS_TERMS:
            if name == "perceptual" and mode == "no_perceptual":
                assert float(terms[name]) == 0.0
                continue
            check(terms[name], ref_terms[name], f"loss[{mode}]: {name}",
                  RTOL_ITER if mode == "posttrain" else RTOL)
        check(total, ref_total, f"loss[{mode}]: returned total", RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["one_step", "posttrain"])
def test_training_loss_param_grads(pair, mode):
    """Gradient of the total loss w.r.t. every parameter, in the original's layout."""
    b, size = 3, TINY.image_size
    config, perceptual = _loss_setup(mode)
    x = images_nhwc(b, size, seed=20)
    draws = _draws(b, size, config.loss.posttrain_sample_k)

    def loss(params, x, draws):
        return flowmo.training_loss(pair.model, params, x, jax.random.key(0), config,
                                    perceptual_fn=perceptual, draws=draws)[0]

    grads = run_jit(jax.grad(loss), pair.params, jnp.asarray(x), draws)
    pair.ref.zero_grad()
    _ref_loss(pair, x, draws, config, mode)[0].backward()
    ours_g = convert_flowmo.params_to_state_dict(grads, pair.config)
    worst = (0.0, "")
    for k, p in pair.ref.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        scale = float(g.abs().max())
        diff = float(np.max(np.abs(np.asarray(ours_g[k], np.float64) - g.numpy())))
        if scale == 0.0:
            assert diff == 0.0, k  # dead parameters (spec 1.7) get zero gradient on both sides
            continue
        worst = max(worst, (diff / scale, k))
    MAX_ERRORS[f"loss[{mode}]: param grad (worst tensor)"] = worst[0]
    print(f"  loss[{mode}]: param grad worst rel err {worst[0]:.2e} at {worst[1]}")
    assert worst[0] < 1e-4, worst


# --------------------------------------------------------------------------------------------
# Sampler (spec 7) and post-training integrator (spec 6)
# --------------------------------------------------------------------------------------------
def test_pow_schedule_guidance_count():
    ts = R.pow_times(25, 0.25)
    lo, hi = R.cfg_interval_t((0.17, 1.02))
    guided = [i for i in range(25) if lo <= float(ts[i]) <= hi]
    assert guided == [4, 5, 6, 7, 8, 9]  # 31 decoder evaluations (spec 7)
    np.testing.assert_allclose(float(ts[1]), 0.8493, atol=1e-4)


def test_reconstruct_25_steps_cfg_interval(pair):
    b, size = 2, TINY.image_size
    config = jax_config(TINY, steps=25, cfg=1.5, schedule="pow_0.25",
                        cfg_interval_sigma=(0.17, 1.02))
    x = images_nhwc(b, size, seed=30)
    noise = normal_nhwc(b, size, seed=31)
    ours = run_jit(
        lambda p, x, n: flowmo.reconstruct(pair.model, p, x, jax.random.key(0), config, noise=n),
        pair.params, jnp.asarray(x), jnp.asarray(noise))
    with torch.no_grad():
        ref, n_evals = pair.ref.reconstruct(
            nchw(x), nchw(noise), steps=25, schedule="pow_0.25", cfg=1.5,
            cfg_interval_sigma=(0.17, 1.02), return_evals=True)
        unguided = pair.ref.reconstruct(nchw(x), nchw(noise), steps=25, cfg=1.0)
    assert n_evals == 31
    assert float((ref - unguided).abs().max()) > 1e-2  # guidance matters in this test
    assert np.any(np.abs(nhwc(ref)) == 1.0)  # and so does the clip
    check(ours, nhwc(ref), "reconstruct: 25 steps pow_0.25 cfg 1.5", RTOL_ITER)


def test_posttrain_integrator_and_grads(pair):
    b, size = 2, TINY.image_size
    u = rng(40).uniform(0.05, 1.0, (b, 9)).astype(np.float32)
    ts_ref = R.random_step_times(torch.from_numpy(u))
    code = _codes(pair, 41, b).numpy()
    noise = normal_nhwc(b, size, seed=42)
    w = normal_nhwc(b, size, seed=43)  # random cotangent

    def ours_obj(z, c, params, u):
        times = flow.random_step_times(u)
        decode = lambda zz, t: pair.model.apply({"params": params}, zz, t, c,  # noqa: E731
                                                method=flowmo.FlowMo.decode)
        out = flow.integrate_random_steps(decode, z, times)
        return jnp.sum(out * w), (out, times)

    grad_fn = jax.value_and_grad(ours_obj, argnums=(0, 1), has_aux=True)
    (_, (out, ts_ours)), (g_z, g_c) = run_jit(grad_fn, jnp.asarray(noise), jnp.asarray(code),
                                              pair.params, jnp.asarray(u))
    check(ts_ours, ts_ref, "posttrain: random step times")
    np.testing.assert_allclose(np.asarray(ts_ours)[:, 0], 1.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ts_ours)[:, -1], 0.0)

    z_t = nchw(noise).requires_grad_(True)
    c_t = torch.from_numpy(code).requires_grad_(True)
    ref_out = pair.ref.integrate_random_steps(z_t, c_t, torch.from_numpy(u))
    (ref_out * nchw(w)).sum().backward()

    check(out, nhwc(ref_out), "posttrain: integrator output", RTOL_ITER)
    check(g_z, nhwc(z_t.grad), "posttrain: d/d noise", RTOL_ITER)
    check(g_c, c_t.grad, "posttrain: d/d code", RTOL_ITER)


def test_zz_report_max_errors():
    """Prints the worst relative errors seen in this module (run with -s)."""
    if MAX_ERRORS:
        worst = max(MAX_ERRORS.items(), key=lambda kv: kv[1])
        print(f"\n  max relative error over {len(MAX_ERRORS)} checks: {worst[1]:.2e} ({worst[0]})")
