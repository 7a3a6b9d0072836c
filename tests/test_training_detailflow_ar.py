"""DetailFlow AR training (detailflow.md section 6.2): the per-sample choice of the training
sequence, the label drop, the loss against torch, the optimizer against torch's AdamW with the
original's parameter groups and LambdaLR, the task's checks of the token export, a short run
with its evaluation grid and load_generator, and (slow) the tiny flow from the command line:
random DetailFlow -> token export -> training -> sample -> evaluate_generation."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tokenizers_jax
from tokenizers_jax import token_export
from tokenizers_jax.config_file import load_config
from tokenizers_jax.models import gpt
from tokenizers_jax.tasks import build_task
from tokenizers_jax.tasks.detailflow_ar import draw_correction, token_loss, training_sequences
from tokenizers_jax.training import loop, optimizer

import generation_fixtures
from test_gpt import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "configs", "detailflow_ar.py")


def test_training_sequences_pick_the_channels_per_sample():
    batch, n, g = 6, 16, 4
    # Channel c of token p holds 100 c + p, so every entry says where it came from.
    tokens = 100 * jnp.arange(3)[None, None, :] + jnp.arange(n)[None, :, None]
    tokens = jnp.broadcast_to(tokens, (batch, n, 3))
    correction = jnp.array([True, False, False, True, True, False])
    inputs, targets = training_sequences(tokens, correction, g)
    assert inputs.shape == (batch, n - g) and targets.shape == (batch, n)
    for row, corrected in enumerate(np.asarray(correction)):
        # The original: input ch1[:, :N-g] and target ch2 if corrected, else ch0 and ch0.
        input_channel, target_channel = (1, 2) if corrected else (0, 0)
        np.testing.assert_array_equal(inputs[row], 100 * input_channel + np.arange(n - g))
        np.testing.assert_array_equal(targets[row], 100 * target_channel + np.arange(n))


def test_correction_is_drawn_per_sample_with_its_probability():
    key = jax.random.PRNGKey(3)
    drawn = np.asarray(draw_correction(key, 20000, 0.3))
    np.testing.assert_array_equal(drawn, np.asarray(jax.random.uniform(key, (20000,))) < 0.3)
    assert abs(drawn.mean() - 0.3) < 0.015
    assert not draw_correction(key, 100, 0.0).any() and draw_correction(key, 100, 1.0).all()


def test_token_loss_is_torch_mean_cross_entropy():
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((3, 16, 64))).astype(np.float32)
    targets = rng.integers(0, 64, (3, 16))
    loss, metrics = token_loss(jnp.asarray(logits), jnp.asarray(targets))
    expected = F.cross_entropy(torch.tensor(logits).reshape(-1, 64),
                               torch.tensor(targets).reshape(-1))  # mean over all positions
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx((logits.argmax(-1) == targets).mean())


# --- the task on a token export ------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A random one-block tiny DetailFlow (16 tokens, groups of 4, 64 codes) and its token
    export of 7 photo crops (one per photo, ten crops each)."""
    root = tmp_path_factory.mktemp("detailflow_ar")
    generation_fixtures.tiny_detailflow(root / "detailflow")
    export = load_config(os.path.join(ROOT, "configs", "export_tokens.py:photos"))
    export.unlock()
    export.data.crops_per_photo = 1
    export.export.update(examples_per_shard=8, batch_size=8)
    token_export.export_tokens(str(root / "detailflow"), export, str(root / "tokens"))
    return root


def ar_config(root, **overrides):
    config = load_config(f"{CONFIG_FILE}:tiny")
    config.unlock()
    # One block and no dropout but the label drop: the step compiles quickly (the slow test
    # trains with every dropout).
    config.model.update(depth=1, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    config.data.path = str(root / "tokens")
    config.train.update(num_steps=2, batch_size=4)
    config.optim.warmup_steps = 1
    config.checkpoint.every = 2
    config.eval.update(every=2, num_images=3)
    for name, value in overrides.items():
        section, field = name.split(".")
        config[section][field] = value
    return config


def edited_export(root, name, **fields):
    """A copy of the export whose manifest has `fields` replaced."""
    copy = root / name
    if not copy.exists():
        shutil.copytree(root / "tokens", copy)
    manifest = json.loads((root / "tokens" / "manifest.json").read_text())
    for field, value in fields.items():
        section, _, key = field.rpartition(".")
        (manifest[section] if section else manifest)[key] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return str(copy)


def test_the_task_checks_the_export_and_the_tokenizer(export_dir):
    def refused(message, **overrides):
        with pytest.raises(ValueError, match=message):
            build_task(ar_config(export_dir, **overrides))

    config = re.escape("the DetailFlow AR config (model.*)")
    refused(f"tokens_per_image is 16 but {config} expects 32", **{"model.num_tokens": 32})
    refused(f"codebook_size is 64 but {config} expects 128", **{"model.vocab_size": 128})
    refused(f"it has 7 classes but {config} has only 5", **{"model.num_classes": 5})
    refused(f"kind is 'flowmo_lfq' but {config} expects 'detailflow_self_correction'",
            **{"data.path": edited_export(export_dir, "flowmo_kind", kind="flowmo_lfq")})
    refused(r"group size 4 \(generator group size 8\)",
            **{"model.group_size": 8, "model.causal_num": 8})
    refused("set --config.data.name=tokens", **{"data.name": "sample_photos"})
    refused("set --config.data.path=DIR", **{"data.path": ""})
    refused("train.correction_prob must be in", **{"train.correction_prob": 1.5})
    gone = edited_export(export_dir, "moved",
                         **{"tokenizer.path": str(export_dir / "gone")})
    refused("which is gone.*--config.eval.tokenizer=DIR, or --config.eval.every=0",
            **{"data.path": gone})
    build_task(ar_config(export_dir, **{"data.path": gone, "eval.every": 0}))
    task = build_task(ar_config(export_dir, **{
        "data.path": gone, "eval.tokenizer": str(export_dir / "detailflow")}))
    assert task.tokenizer.config.model.name == "detailflow"
    # Only what decoding indices reads: no encoder, no alignment head.
    assert set(task.constants["detailflow_decoder"]) == {"quantize", "post_quant_conv",
                                                         "decoder"}


@pytest.fixture(scope="module")
def task_and_params(export_dir):
    config = ar_config(export_dir, **{"eval.every": 0})
    return build_task(config), random_params(config)


def test_label_drop_once_and_correction_per_sample_in_the_training_forward(task_and_params):
    """Each row of the training logits is the deterministic forward of its chosen sequence
    with its label or with the null label: 10% of them null (the model's class_dropout, not
    applied twice), 30% of the sequences self-correction ones."""
    task, params = task_and_params
    m = task.config.model
    batch, n, g = 2000, m.num_tokens, m.group_size
    rng = np.random.default_rng(0)
    clean = rng.integers(0, m.vocab_size, (batch, n))
    tokens = np.stack([clean, rng.integers(0, m.vocab_size, (batch, n)),
                       (clean + 1) % m.vocab_size], axis=-1)  # label channel != clean
    labels = rng.integers(0, m.num_classes, batch)
    data = {"tokens": jnp.asarray(tokens, jnp.int32), "label": jnp.asarray(labels, jnp.int32)}
    forward = jax.jit(lambda p, b, k: task.forward(p, b, k, None, train=True))
    logits, targets = forward(params, data, jax.random.PRNGKey(1))
    corrected = np.all(np.asarray(targets) == tokens[..., 2], axis=1)
    assert np.all(corrected | np.all(np.asarray(targets) == clean, axis=1))
    assert abs(corrected.mean() - 0.3) < 0.04
    inputs, _ = training_sequences(data["tokens"], jnp.asarray(corrected), g)
    plain = jax.jit(lambda p, y, x: task.model.apply({"params": p}, y, x))
    with_label = np.asarray(plain(params, data["label"], inputs))
    with_null = np.asarray(plain(params, jnp.full_like(data["label"], m.num_classes), inputs))
    logits = np.asarray(logits)

    def rows_equal(other):
        return np.all(np.isclose(logits, other, rtol=1e-5, atol=1e-5), axis=(1, 2))

    kept, dropped = rows_equal(with_label), rows_equal(with_null)
    assert np.all(kept ^ dropped)  # every row one or the other, never both
    assert abs(dropped.mean() - 0.1) < 0.025, dropped.mean()
    loss, _ = task.loss(params, {}, data, jax.random.PRNGKey(1))
    expected = F.cross_entropy(torch.tensor(logits).reshape(-1, m.vocab_size),
                               torch.tensor(np.asarray(targets, np.int64)).reshape(-1))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_bf16_compute_keeps_an_fp32_loss_close_to_fp32(export_dir, task_and_params):
    task, params = task_and_params
    bf16 = build_task(ar_config(export_dir, **{"eval.every": 0, "model.dtype": "bfloat16"}))
    batch = task.synthetic_batch(4)
    key = jax.random.PRNGKey(0)
    loss32, _ = jax.jit(task.loss)(params, {}, batch, key)
    loss16, _ = jax.jit(bf16.loss)(params, {}, batch, key)
    assert loss16.dtype == jnp.float32 and np.isfinite(float(loss16))
    assert float(loss16) != float(loss32) and abs(float(loss16) - float(loss32)) < 0.05


def original_lr_lambda(step, warmup_steps, max_train_steps):
    """train_c2i.py's LambdaLR factor (warmup from 0.005, cosine to 0.01)."""
    if step < warmup_steps:
        return 0.005 + (step / warmup_steps) * (1 - 0.005)
    progress = (step - warmup_steps) / (max_train_steps - warmup_steps)
    return 0.01 + (1 - 0.01) * 0.5 * (1 + math.cos(math.pi * progress))


def test_optimizer_is_the_originals_adamw_groups_and_lambda_lr():
    config = load_config(f"{CONFIG_FILE}:df16")
    o, steps = config.optim, config.train.num_steps
    assert (o.lr, o.b1, o.b2, o.weight_decay, o.clip_grad_norm) == (1e-4, 0.9, 0.95, 0.05, 1.0)
    assert o.schedule == "warmup_cosine" and o.warmup_steps == int(0.05 * steps)
    assert o.warmup_init_lr == pytest.approx(0.005 * o.lr)
    assert o.min_lr == pytest.approx(0.01 * o.lr)
    assert steps == 300 * (1_281_167 // 512) and config.train.ema_decay == 0.9999
    assert config.train.ema_every == 1 and config.train.correction_prob == 0.3

    tiny = load_config(f"{CONFIG_FILE}:tiny")
    params = random_params(tiny)
    decayed = optimizer.rank_at_least_2(params)
    # The original decays every parameter of rank >= 2: embeddings (token, class, placeholder)
    # and Linear weights; not the RMSNorm scales.
    assert decayed["tok_embeddings"] and decayed["cls_embedding"] and decayed["spe_embeddings"]
    assert decayed["layers_0"]["attention"]["wqkv"]["kernel"] and decayed["output"]["kernel"]
    assert not decayed["norm"]["scale"] and not decayed["layers_1"]["ffn_norm"]["scale"]

    # Ten updates of a short schedule (2 warmup steps) against torch.
    warmup, total = 2, 10
    short = o.copy_and_resolve_references()
    short.update(warmup_steps=warmup, lr=1e-2, warmup_init_lr=0.005 * 1e-2, min_lr=0.01 * 1e-2)
    tx = optimizer.make_optimizer(short, num_steps=total)
    names = [jax.tree_util.keystr(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    leaves = jax.tree.leaves(params)
    torch_params = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in leaves]
    groups = [{"params": [p for p in torch_params if p.dim() >= 2], "weight_decay": 0.05},
              {"params": [p for p in torch_params if p.dim() < 2], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        torch_opt, lambda step: original_lr_lambda(step, warmup, total))
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for _ in range(total):
        grads = [(0.3 * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves]
        grad_tree = jax.tree.unflatten(jax.tree.structure(params), grads)
        updates, state = update(grad_tree, state, params)
        params = optax.apply_updates(params, updates)
        for p, g in zip(torch_params, grads):
            p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
        torch_opt.step()
        scheduler.step()
    for name, ours, theirs in zip(names, jax.tree.leaves(params), torch_params):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_a_short_run_evaluates_and_loads_as_a_generator(export_dir):
    """Two steps through the generic loop, with the evaluation grid at step 2."""
    workdir = export_dir / "run"
    summary = loop.train_and_evaluate(ar_config(export_dir), str(workdir))
    assert summary["step"] == 2 and np.isfinite(summary["train"]["loss"])
    assert "accuracy" in summary["train"]
    assert set(summary["eval"]) >= {"eval/loss", "eval/accuracy", "eval/correction_loss"}
    grid = np.asarray(Image.open(workdir / "images" / "reconstruction_00000002.png"))
    # Two rows of the 3 evaluation examples (32 px): their clean tokens, then samples.
    assert grid.shape == (2 * 32, 3 * 32, 3)
    generator = tokenizers_jax.load_generator(workdir)  # the tokenizer of the export's manifest
    assert isinstance(generator, gpt.DetailFlowGenerator)
    assert generator.tokenizer.config.model.num_latent_tokens == 16


def _run(*args, timeout=1800):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_tiny_flow_from_the_command_line(tmp_path):
    """configs/detailflow.py:tiny with random params -> export of the built-in photos ->
    train configs/detailflow_ar.py:tiny with falling loss -> grid, load_generator, sample and
    evaluate_generation (random-init Inception)."""
    tokenizer, tokens, workdir = tmp_path / "detailflow", tmp_path / "tokens", tmp_path / "ar"
    _run("-c", "import jax; from tokenizers_jax import exported; "
         "from tokenizers_jax.config_file import load_config; from tokenizers_jax.models import "
         "detailflow; c = load_config('configs/detailflow.py:tiny'); "
         f"exported.save_model_dir({str(tokenizer)!r}, c, "
         "detailflow.init_params(c, jax.random.PRNGKey(0)))")
    _run("-m", "tokenizers_jax.export_tokens", f"--tokenizer={tokenizer}",
         "--config=configs/export_tokens.py:photos", "--config.data.crops_per_photo=16",
         f"--output={tokens}")
    _run("-m", "tokenizers_jax.train", "--config=configs/detailflow_ar.py:tiny",
         f"--workdir={workdir}", f"--config.data.path={tokens}")
    with open(workdir / "metrics.jsonl") as f:
        losses = [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]
    assert len(losses) == 20 and np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses
    grid = np.asarray(Image.open(workdir / "images" / "reconstruction_00001000.png"))
    assert grid.shape == (2 * 32, 7 * 32, 3)  # the 7 evaluation crops' tokens, then samples
    generator = tokenizers_jax.load_generator(workdir)
    images = generator.generate_images(np.arange(7), seed=1)
    assert images.shape == (7, 32, 32, 3) and math.isfinite(float(jnp.abs(images).max()))

    classes = "0,1,2,3,4,5,6"
    _run("-m", "tokenizers_jax.sample", "--generator", str(workdir), "--num-samples", "7",
         "--classes", classes, "--seed", "1", "--output", str(tmp_path / "samples"))
    with np.load(tmp_path / "samples" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (7, 32, 32, 3)
        np.testing.assert_array_equal(samples["arr_1"], np.arange(7))
        np.testing.assert_array_equal(samples["arr_0"], tokenizers_jax.to_uint8(images))
    reference = str(tmp_path / "reference.npz")
    _run("-m", "tokenizers_jax.evaluate_generation", "reference",
         "--config=configs/generation_reference.py:photos", "--config.data.crops_per_photo=1",
         "--output", reference, "--allow-random-init-inception", "--inception-batch-size", "7")
    _run("-m", "tokenizers_jax.evaluate_generation", "--generator", str(workdir),
         "--reference", reference, "--num-samples", "7", "--classes", classes,
         "--is-split-size", "7", "--allow-random-init-inception", "--inception-batch-size", "7",
         "--output", str(tmp_path / "evaluation"))
    with open(tmp_path / "evaluation" / "metrics.json") as f:
        result = json.load(f)
    assert result["random_init_inception"] is True
    assert all(math.isfinite(result[name]) for name in ("fid", "sfid", "inception_score"))
