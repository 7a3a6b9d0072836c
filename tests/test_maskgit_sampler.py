"""MaskGIT's decoding (maskgit.md section 4) against direct re-statements of the spec.

A fake model (logits that depend on the label and on the known tokens) replaces the
transformer, so every rule is checked exactly: the per-step counts, the CFG formula and
ramps, the confidence, the cut-off, and the final output.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers_jax import sampling
from tokenizers_jax.models import maskgit_sampler as ms

N, K, CLASSES = 12, 5, 3  # units, codebook, classes (the null label is CLASSES)
TABLE = np.random.RandomState(0).randn(CLASSES + 1, N, K).astype(np.float32)
MIX = np.random.RandomState(1).randn(N, K).astype(np.float32)


def fake_logits(tokens, labels):
    """Label table + a term that grows with the number of known tokens of the sample."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    known = xp.mean((tokens != K).astype(np.float32), axis=-1)  # [B]
    return xp.asarray(TABLE)[labels] + 2.0 * known[:, None, None] * xp.asarray(MIX)


def spec_gamma(r, schedule):
    ratio = math.acos(r) / (math.pi / 2) if schedule == "arccos" else math.cos(math.pi * r / 2)
    return min(max(ratio, 1e-6), 1.0)


def spec_guidance(sampler, k):
    t = sampler.steps
    if sampler.cfg_ramp == "constant":
        return sampler.cfg
    if sampler.cfg_ramp == "linear":
        return sampler.cfg * k / t
    return sampler.cfg * (1 - math.cos(math.pi * (k / t) ** sampler.cfg_power)) / 2


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def spec_decode(sampler, label, key):
    """Section 4, one sample, in numpy float64: (final tokens, masked after each step)."""
    t = sampler.steps
    tokens = np.full(N, K)
    masked = np.ones(N, bool)
    history = []
    for k in range(t):
        r = (k + 1) / t
        conditional = fake_logits(tokens[None], np.array([label]))[0].astype(np.float64)
        logits = conditional
        if sampler.cfg != 0:
            unconditional = fake_logits(tokens[None], np.array([CLASSES]))[0]
            logits = conditional + spec_guidance(sampler, k) * (conditional - unconditional)
        tau_s = 0.5 + 0.8 * (1 - r) if sampler.softmax_annealing else sampler.softmax_temperature
        logits = logits / tau_s
        draws = ms.step_draws(key, k, N, K)
        token_gumbel = np.asarray(draws.token_gumbel, np.float64)
        tau_k = sampler.choice_temperature * (1 - r)
        if sampler.token_sampling == "gumbel_max":
            token_gumbel = tau_k * token_gumbel
        predicted = np.where(masked, np.argmax(logits + token_gumbel, -1), tokens)
        scores = log_softmax(logits) if sampler.confidence == "log_prob" else logits
        confidence = scores[np.arange(N), predicted] + tau_k * np.asarray(
            draws.confidence_gumbel, np.float64)
        confidence = np.where(masked, confidence, np.inf)
        m = min(max(math.floor(N * spec_gamma(r, sampler.mask_schedule)), 1), masked.sum() - 1)
        ordered = np.sort(confidence)
        if sampler.cutoff == "<=":
            masked = confidence <= ordered[m - 1] if m > 0 else np.zeros(N, bool)
        else:
            masked = confidence < ordered[m]
        tokens = np.where(masked, K, predicted)
        history.append(masked)
    return predicted, np.stack(history)


PASSES = []  # the batch size of every model pass, recorded when `decode` is traced


def recording_logits(tokens, labels):
    PASSES.append(labels.shape[0])
    return fake_logits(tokens, labels)


@functools.partial(jax.jit, static_argnames="sampler")
def decode(labels, keys, sampler):
    return ms.sample(recording_logits, labels, keys, N, K, CLASSES, sampler, with_history=True)


SAMPLERS = {
    "maskbit": ms.SamplerConfig(steps=6, cfg=3.0, choice_temperature=2.0),
    "titok": ms.SamplerConfig(steps=5, cfg=2.0, cfg_ramp="linear", choice_temperature=3.0,
                              token_sampling="gumbel_max", confidence="logit",
                              softmax_annealing=True, cutoff="<"),
    "maskgit": ms.SamplerConfig(steps=4, cfg=0.0, cfg_ramp="constant", mask_schedule="cosine",
                                choice_temperature=1.5, softmax_temperature=0.7, cutoff="<"),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_decoding_follows_the_spec_step_by_step(name):
    sampler = SAMPLERS[name]
    labels = np.array([0, 2, 1])
    keys = sampling.sample_keys(jax.random.PRNGKey(7), 0, 3)
    PASSES.clear()
    decode.trace(jnp.asarray(labels), keys, sampler)
    # One pass per step: the conditional and null-label batches together (2B) when guided.
    assert PASSES == [6 if sampler.cfg else 3]
    tokens, history = decode(jnp.asarray(labels), keys, sampler)
    assert tokens.shape == (3, N) and int(tokens.max()) < K  # nothing left masked
    for i, label in enumerate(labels):
        expected_tokens, expected_masks = spec_decode(sampler, label, keys[i])
        np.testing.assert_array_equal(history.masked[:, i], expected_masks)
        np.testing.assert_array_equal(tokens[i], expected_tokens)
    # Counts (no ties under continuous noise): after step k, clip(floor(N gamma(r)), 1, M_k - 1)
    # units stay masked (the last step's re-mask is discarded: its x^ is the output).
    still_masked = N
    for k in range(sampler.steps):
        expected = min(max(math.floor(N * spec_gamma((k + 1) / sampler.steps,
                                                     sampler.mask_schedule)), 1),
                       still_masked - 1)
        np.testing.assert_array_equal(history.masked[k].sum(-1), [expected] * 3)
        if k:  # a known unit keeps its token and is never masked again
            known = ~np.asarray(history.masked[k - 1])
            assert not np.any(np.asarray(history.masked[k])[known])
            np.testing.assert_array_equal(np.asarray(history.predicted[k])[known],
                                          np.asarray(history.predicted[k - 1])[known])
        still_masked = expected


def test_step_schedule_restates_the_spec():
    for schedule in ("arccos", "cosine"):
        sampler = ms.SamplerConfig(steps=64, mask_schedule=schedule, softmax_annealing=True)
        plan = ms.step_schedule(sampler, 512)
        for k in range(64):
            r = (k + 1) / 64
            assert plan.remask_count[k] == math.floor(512 * spec_gamma(r, schedule)), (schedule, k)
            assert plan.choice_temperature[k] == pytest.approx(8.5 * (1 - r), abs=1e-6)
            assert plan.softmax_temperature[k] == pytest.approx(0.5 + 0.8 * (1 - r))
    for ramp in ms.CFG_RAMPS:
        sampler = ms.SamplerConfig(steps=16, cfg=5.7, cfg_ramp=ramp, cfg_power=2.5)
        np.testing.assert_allclose(ms.step_schedule(sampler, 512).guidance,
                                   [spec_guidance(sampler, k) for k in range(16)], rtol=1e-6)
    assert ms.guidance_scales(ms.SamplerConfig(steps=4, cfg_ramp="linear"))[0] == 0


def test_cfg_formula():
    conditional, unconditional = np.random.RandomState(3).randn(2, 4, K).astype(np.float32)
    np.testing.assert_allclose(ms.guided_logits(conditional, unconditional, 2.5),
                               conditional + 2.5 * (conditional - unconditional), rtol=1e-6)


def test_remask_cutoffs_and_ties():
    confidence = jnp.array([[0.3, 0.1, 0.1, 0.5, jnp.inf], [0.2, 0.4, 0.4, 0.4, 0.9]])
    count = jnp.array([2, 2])
    at_or_below = np.asarray(ms.remask(confidence, count, "<="))
    below = np.asarray(ms.remask(confidence, count, "<"))
    # "<=" against sorted[m - 1]: ties at the cut are added; "<" against sorted[m]: dropped.
    np.testing.assert_array_equal(at_or_below, [[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(below, [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert not np.any(ms.remask(confidence, jnp.array([0, 0]), "<="))


def test_samples_do_not_depend_on_their_batch():
    sampler = SAMPLERS["maskbit"]
    labels = jnp.array([0, 2, 1])
    together, _ = decode(labels, sampling.sample_keys(jax.random.PRNGKey(4), 0, 3), sampler)
    alone, _ = decode(labels[1:2], sampling.sample_keys(jax.random.PRNGKey(4), 1, 1), sampler)
    np.testing.assert_array_equal(together[1], alone[0])
    assert not np.array_equal(together[0], together[1])


def test_sampler_config_errors():
    with pytest.raises(ValueError, match="cutoff"):
        ms.SamplerConfig(cutoff="<<")
    with pytest.raises(ValueError, match=r"unknown sampler field\(s\) \['temprature'\]"):
        ms.SamplerConfig.from_config({"steps": 4}, temprature=1.0)
    assert ms.SamplerConfig.from_config({"steps": 4}, cfg=0.0).cfg == 0.0
