"""Subprocess entry for the distributed / signal training tests (see test_training_distributed).

    python tests/training_worker.py step WORKDIR NUM_DEVICES MODEL one step (toy|toy_gan|flowmo|
                                                                  detailflow) -> result.json
    python tests/training_worker.py sigterm WORKDIR                a long toy run (to be killed)
    python tests/training_worker.py multiprocess WORKDIR PORT ID   one of two processes
"""

import json
import os
import sys

import jax
import numpy as np


def micro_flowmo_config(batch_size=16):
    """A FlowMo small enough to compile in seconds (16x16 images, one block each side)."""
    from training_toy import toy_config

    config = toy_config(num_steps=1, batch_size=batch_size, grad_accum_steps=2, loss_groups=2)
    config.model.name = "flowmo"
    config.model.update(image_size=16, code_length=4, context_dim=4, codebook_size_for_entropy=2)
    for side in ("encoder", "decoder"):
        config.model[side].update(hidden_size=32, num_heads=2, axes_dim=(4, 6, 6), depth=1)
    config.data.image_size = 16
    config.loss.perceptual = "none"
    config.sampler.steps = 2
    return config


def micro_detailflow_config(batch_size=4):
    """configs/detailflow.py:tiny shrunk to compile in seconds: 16x16 images, 8 tokens in
    groups of 4, one block per tower, a two-block DINO trunk at 16 px (three heads), LPIPS
    off (tests opt in), random frozen networks, one step variant unless degradation.prob > 0."""
    from tokenizers_jax.config_file import load_config
    from training_toy import ROOT

    config = load_config(os.path.join(ROOT, "configs", "detailflow.py") + ":tiny")
    config.unlock()
    tower = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, position_grid=2)
    config.model.update(image_size=16, num_latent_tokens=8, codebook_size=16, neighbour_top_k=4,
                        alignment_hidden=16)
    for name in ("encoder", "decoder", "teacher"):
        config.model[name].update(tower)
    config.discriminator.dino.update(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=8,
                                     image_size=16, feature_blocks=(0, 1))
    config.degradation.prob = 0.0
    config.data.update(image_size=16, read_threads=1)
    config.train.update(num_steps=1, batch_size=batch_size, codebook_window=64)
    for optim in (config.optim, config.discriminator_optim):
        optim.decay_steps = 1000  # the tiny warmup and cosine, whatever the run's length
    config.checkpoint.update(every=2, keep=5)
    config.logging.every = 1
    config.eval.update(every=0, num_images=2)
    return config


def main(mode, workdir, *args):
    if mode == "step":
        jax.config.update("jax_num_cpu_devices", int(args[0]))
        from tokenizers_jax.training import loop
        from training_toy import toy_config, toy_gan_config

        if args[1] == "flowmo":
            config = micro_flowmo_config()
        elif args[1] == "detailflow":  # GAN partner, BatchNorm / spectral / LeCam variables
            config = micro_detailflow_config(batch_size=16)
            config.train.grad_accum_steps = 2
            config.loss.disc_start = 0  # both networks get gradients
            for optim in (config.optim, config.discriminator_optim):
                optim.eps = 1.0  # Adam's first step ~ lr * grad, not lr * sign(grad)
        elif args[1] == "toy_gan":  # partner network, non-trained variables, host draws
            config = toy_gan_config(batch_size=16, grad_accum_steps=2, loss_groups=1)
        else:
            config = toy_config(batch_size=16, grad_accum_steps=2, loss_groups=2)
        config.mesh.update(data=2 if int(args[0]) > 1 else 1, fsdp=-1)
        size = config.data.image_size
        batch = {"image": np.random.default_rng(0).integers(0, 256, (16, size, size, 3), np.uint8)}
        fresh = loop.fresh_step(config, batch)
        state, metrics = fresh.step(fresh.state, fresh.constants, fresh.batch)
        if args[1] == "detailflow":
            kernel = state.params["decoder"]["vit"]["layers_0"]["mlp"]["fc1"]["kernel"]
        else:
            block = state.params["decoder"]["double_blocks_0"]
            kernel = block["img_mlp"]["fc1"]["kernel"] if args[1] == "flowmo" else block["kernel"]
        result = dict(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
                      kernel=np.asarray(jax.device_get(kernel)).ravel()[:64].tolist(),
                      kernel_sharding=str(kernel.sharding.spec), devices=jax.device_count(),
                      discriminator_loss=float(metrics.get("discriminator_loss", 0.0)),
                      partners=jax.tree.map(lambda x: np.asarray(x).ravel().tolist(),
                                            jax.device_get((state.partner_params,
                                                            state.variables))))
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(result, f)
    elif mode == "sigterm":
        from tokenizers_jax.training import loop
        from training_toy import toy_config

        config = toy_config(num_steps=100_000)
        config.checkpoint.every = 100_000
        config.eval.every = 0
        summary = loop.train_and_evaluate(config, workdir)
        print("SUMMARY", summary["stopped"], summary["step"], flush=True)
    elif mode == "multiprocess":
        port, process_id = args
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                                   process_id=int(process_id))
        from tokenizers_jax.training import loop
        from training_toy import toy_config

        config = toy_config(num_steps=4)
        config.checkpoint.update(every=2, async_save=True)
        config.eval.every = 2
        summary = loop.train_and_evaluate(config, workdir)
        print("SUMMARY", summary["stopped"], summary["step"], summary["train"]["loss"], flush=True)
    else:
        raise ValueError(mode)


if __name__ == "__main__":
    main(*sys.argv[1:])
