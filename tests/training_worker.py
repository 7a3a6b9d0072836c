"""Subprocess entry for the distributed / signal training tests (see test_training_distributed).

    python tests/training_worker.py step WORKDIR NUM_DEVICES MODEL one step (toy|toy_gan|flowmo) -> result.json
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


def main(mode, workdir, *args):
    if mode == "step":
        jax.config.update("jax_num_cpu_devices", int(args[0]))
        from tokenizers_jax.training import loop
        from training_toy import toy_config, toy_gan_config

        if args[1] == "flowmo":
            config = micro_flowmo_config()
        elif args[1] == "toy_gan":  # partner network, non-trained variables, host draws
            config = toy_gan_config(batch_size=16, grad_accum_steps=2, loss_groups=1)
        else:
            config = toy_config(batch_size=16, grad_accum_steps=2, loss_groups=2)
        config.mesh.update(data=2 if int(args[0]) > 1 else 1, fsdp=-1)
        size = config.data.image_size
        batch = {"image": np.random.default_rng(0).integers(0, 256, (16, size, size, 3), np.uint8)}
        fresh = loop.fresh_step(config, batch)
        state, metrics = fresh.step(fresh.state, fresh.constants, fresh.batch)
        block = state.params["decoder"]["double_blocks_0"]
        kernel = block["img_mlp"]["fc1"]["kernel"] if args[1] == "flowmo" else block["kernel"]
        result = dict(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
                      kernel=np.asarray(jax.device_get(kernel)).ravel()[:64].tolist(),
                      kernel_sharding=str(kernel.sharding.spec), devices=jax.device_count(),
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
