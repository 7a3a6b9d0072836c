"""DetailFlow tokenizer training: self-correction, degradation, alignment and the DINO GAN
(spec 2-5), on the generic loop.

Networks: the model (`models.detailflow.DetailFlow`); the partner "discriminator" (the five
DINO heads, trained by their own Adam); non-trained variables {"discriminator": spectral-norm
vectors and BatchNorm statistics, "lecam": the LeCam EMAs, "codebook_window": the last clean
indices}. Frozen constants: LPIPS-VGG, the DINO trunk, the SigLIP2 teacher.

Host draws, one per step for the whole batch (spec 2, 3; `np.random.default_rng([seed,
step])`): the prefix length t (t = N with probability 1 - degradation.prob), the
self-correction noise index (none at t = 1) and the degradation matrix (area to R(t), bicubic
to the output size; the identity at t = N, whose R(N) = R). The static variant
`StepVariant(grid, correction)` picks the decoder output grid and whether the 2B correction
batch exists, so one step is compiled per variant (15 for DetailFlow-16: one per output size,
and t = 1).

Objectives of a micro-batch, in order:
  generator      MSE + w_p LPIPS (dropout on) + w_d hinge_G(D(DiffAug(x_hat))) + vq + commit
                 + alignment_weight * (-cos) of the first token to the teacher, on the decoder
                 batch [x_hat_clean ; x_hat_corrected] (2B) against the (degraded) target,
                 duplicated; carries the stopped target and reconstructions.
  discriminator  w_d (hinge_D + 0.001 LeCam) + 4 CR [step >= disc_start] from four D calls
                 (real, fake under DiffAugment; real, fake under the strong one).
with w_p = perceptual_weight * min(1, step / perceptual_warmup) and w_d = disc_weight from
disc_start on, `step` being the original's global step (update index + 1). Every D call (the
generator's included) runs the power iteration and updates the BatchNorm statistics, in this
order, as the original's training-mode discriminator does.

Logged per step (train/...): loss, reconstruction, perceptual (LPIPS, unweighted),
perceptual_weight, generator_adversarial (hinge_G, unweighted), disc_weight, codebook,
commitment, alignment (mean -cos, unweighted), token_cosine_similarity (the original's
fea_cosine_sim), codebook_usage and codebook_perplexity (over the codebook window),
num_tokens, noise_index, output_size; discriminator_loss, discriminator_hinge, lecam,
consistency (unweighted), logits_real, logits_fake, lecam_real_ema, lecam_fake_ema; the loop
adds grad norms and learning rates per network.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from tokenizers_jax import augment, exported, gan_losses, metrics, resize
from tokenizers_jax.convert.siglip2 import encoder_params_from_siglip2
from tokenizers_jax.detailflow_resolution import (ResolutionMap, draw_noise_index,
                                                  draw_prefix_length)
from tokenizers_jax.models import detailflow
from tokenizers_jax.models import discriminator as disc
from tokenizers_jax.models.dino import DinoViT, load_dino_params
from tokenizers_jax.perceptual import common as perceptual_common
from tokenizers_jax.perceptual import lpips
from tokenizers_jax.quantizers.vq import draw_neighbour_ranks, l2_normalize
from tokenizers_jax.tasks.base import MODEL, Batch, LossOutput, Networks, Objective, Params, Task
from tokenizers_jax.tasks.flowmo import images_to_float

DISCRIMINATOR = "discriminator"  # the partner network's name
SIGLIP2 = "siglip2"  # model.name of a converted SigLIP2 tower directory


class StepVariant(NamedTuple):
    """The static part of a step's host draws (one compiled step each)."""

    grid: int  # decoder output grid side G (output G * patch pixels square)
    correction: bool  # the self-correction pass and the 2B decoder batch (False only at t = 1)


def prefix_target(images: jax.Array, res_map: ResolutionMap, num_tokens: int) -> jax.Array:
    """The target of prefix length n (spec 2): area to R(n), bicubic to the output size.

    images [B, R, R, 3] -> [B, S, S, 3] fp32 with S = res_map.output_resolution(n); the
    images themselves at n = N.
    """
    if num_tokens == res_map.num_tokens:
        return jnp.asarray(images, jnp.float32)
    return resize.degrade(images, res_map.resolution(num_tokens),
                          res_map.output_resolution(num_tokens))


def grid_prefix_lengths(res_map: ResolutionMap) -> tuple[int, ...]:
    """Prefix lengths shown in coarse-to-fine image grids: the allowed ones that are powers of
    two, and N (1, 2, 4, ..., 64, 128 for DetailFlow-16)."""
    allowed = res_map.prefix_lengths()
    chosen = [n for n in allowed if n & (n - 1) == 0]
    return tuple(chosen) + (() if chosen[-1] == res_map.num_tokens else (res_map.num_tokens,))


def upsample_nearest(images: jax.Array, size: int) -> jax.Array:
    """[B, S, S, 3] -> [B, size, size, 3] by nearest-neighbour upsampling (for image grids of
    prefix decodes, whose output sizes differ: each pixel becomes a visible block)."""
    if images.shape[1] == size:
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "nearest")


def group_cosine_similarity(codes: jax.Array, group_size: int) -> jax.Array:
    """The original's `fea_cosine_sim`: the mean cosine similarity between the distinct codes
    of each group of g tokens. codes [B, N, D] -> scalar."""
    b, n, d = codes.shape
    groups = l2_normalize(codes.reshape(b * n // group_size, group_size, d).astype(jnp.float32))
    similarity = jnp.einsum("gid,gjd->gij", groups, groups)
    off_diagonal = jnp.sum(similarity, axis=(1, 2)) - jnp.trace(similarity, axis1=1, axis2=2)
    return jnp.mean(off_diagonal / (group_size * (group_size - 1)))


def update_codebook_window(window: jax.Array, indices: jax.Array) -> jax.Array:
    """Shifts the newest indices (any shape) into the end of the rolling window [W] (-1 marks
    slots not filled yet)."""
    new = jnp.ravel(indices).astype(window.dtype)
    if new.shape[0] >= window.shape[0]:
        return new[-window.shape[0]:]
    return jnp.concatenate([window[new.shape[0]:], new])


def window_usage(window: jax.Array, codebook_size: int) -> metrics.CodebookUsage:
    """Usage and perplexity of the filled slots of a codebook window."""
    filled = window >= 0
    counts = jnp.bincount(jnp.where(filled, window, 0), weights=filled.astype(jnp.float32),
                          length=codebook_size)
    return metrics.codebook_usage_from_counts(counts)


def siglip2_how_to_get(directory: str) -> str:
    """Download and conversion instructions for the SigLIP2 so400m tower."""
    return (
        "Download model.safetensors of google/siglip2-so400m-patch16-naflex from the Hugging "
        "Face hub, then convert it:\n"
        "  python -m tokenizers_jax.convert siglip2 --checkpoint model.safetensors "
        f"--config configs/detailflow.py:df16 --output {directory}\n"
        "(or take OUTPUT/teacher from `python -m tokenizers_jax.convert detailflow ... --teacher`)"
    )


class DetailFlowTask(Task):
    """DetailFlow's tokenizer: params of `DetailFlow`; batches {"image": uint8 [B, R, R, 3]}."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = detailflow.model_from_config(config)
        self.res_map = ResolutionMap.from_config(config.model)
        if config.data.image_size != config.model.image_size:
            raise ValueError(f"data.image_size ({config.data.image_size}) must equal "
                             f"model.image_size ({config.model.image_size})")
        if not 0 <= config.degradation.prob <= 1 or not 0 <= config.correction.prob <= 1:
            raise ValueError("degradation.prob and correction.prob must lie in [0, 1]")
        dtype = jnp.dtype(config.model.dtype)
        dino = config.discriminator.dino
        self.dino = DinoViT(width=dino.width, depth=dino.depth, num_heads=dino.num_heads,
                            mlp_dim=dino.mlp_dim, patch_size=dino.patch_size,
                            image_size=dino.image_size, feature_blocks=tuple(dino.feature_blocks),
                            dtype=dtype)
        self.heads = disc.DiscriminatorHeads(num_heads=1 + len(dino.feature_blocks),
                                             kernel_size=config.discriminator.kernel_size,
                                             dtype=dtype)
        self.teacher = detailflow.teacher_from_config(config)
        self._siglip2 = None  # SigLIP2 params, loaded once (teacher and encoder init)
        self._check_pretrained_dirs()
        self._constants = self._load_constants()

    # --- frozen networks ------------------------------------------------------------------

    def _random_init(self) -> bool:
        return bool(self.config.train.allow_random_init_networks)

    def _siglip2_dir(self) -> str:
        path = self.config.train.siglip2_weights
        return os.path.abspath(os.path.expanduser(
            path or perceptual_common.default_weights_dir(SIGLIP2)))

    def _check_pretrained_dirs(self):
        """Fails at start-up (before anything is written) when `pretrained` would lack files."""
        train = self.config.train
        if (train.encoder_from_siglip2 and not self._random_init()
                and not exported.is_model_dir(self._siglip2_dir())):
            raise FileNotFoundError(
                f"train.encoder_from_siglip2 needs the SigLIP2 so400m weights in "
                f"{self._siglip2_dir()}.\n" + siglip2_how_to_get(self._siglip2_dir())
                + "\nOr set --config.train.encoder_from_siglip2=False.")
        if train.discriminator_init and not exported.is_model_dir(train.discriminator_init):
            raise FileNotFoundError(
                f"train.discriminator_init: no converted discriminator in "
                f"{train.discriminator_init}; write one with `python -m tokenizers_jax.convert "
                "detailflow --checkpoint 128.pt ... --discriminator` (OUTPUT/discriminator)")

    def _load_siglip2(self) -> Any:
        if self._siglip2 is None:
            teacher = self.teacher
            size = teacher.patch_size * teacher.position_grid

            def init(key):
                images = jnp.zeros((1, size, size, 3), jnp.float32)
                return nn.unbox(teacher.init(key, images)["params"])

            self._siglip2 = perceptual_common.load_weights(
                SIGLIP2, init, siglip2_how_to_get, self._siglip2_dir(), self._random_init())
        return self._siglip2

    def _load_constants(self) -> dict[str, Any]:
        """LPIPS (if weighted), the DINO trunk and the teacher (if weighted); fails at start-up,
        naming what to fetch, when one is missing and random init is not allowed."""
        train, loss = self.config.train, self.config.loss
        constants = {"dino": load_dino_params(train.dino_weights or None, self._random_init(),
                                              self.dino)}
        if loss.perceptual_weight:
            constants["lpips"] = lpips.load_lpips_params(train.perceptual_weights or None,
                                                         allow_random_init=self._random_init())
        if loss.alignment_weight:
            constants["teacher"] = self._load_siglip2()
        if self._random_init():
            logging.warning("*** train.allow_random_init_networks=True: missing LPIPS / DINO / "
                            "SigLIP2 weights are RANDOM; the losses are meaningless (smoke "
                            "tests only) ***")
        return constants

    @property
    def constants(self) -> Any:
        return self._constants

    # --- networks ---------------------------------------------------------------------------

    def init_params(self, key: jax.Array) -> Params:
        m = self.config.model
        images = jnp.zeros((1, m.image_size, m.image_size, 3), jnp.float32)
        ranks = jnp.zeros((1, m.num_latent_tokens), jnp.int32)
        grid = self.res_map.output_grid(m.num_latent_tokens)
        return self.model.init(key, images, 0, ranks, m.num_latent_tokens, grid)["params"]

    def _init_discriminator(self, key: jax.Array) -> dict:
        return disc.init_discriminator_variables(key, self.heads, self.dino.width,
                                                 self.dino.num_tokens)

    def init_partners(self, key: jax.Array) -> dict[str, Params]:
        return {DISCRIMINATOR: self._init_discriminator(key)["params"]}

    def init_variables(self, key: jax.Array) -> Any:
        state = nn.unbox(self._init_discriminator(key))
        return {
            DISCRIMINATOR: {name: state[name] for name in disc.STATE_COLLECTIONS},
            "lecam": gan_losses.lecam_init()._asdict(),
            "codebook_window": jnp.full((self.config.train.codebook_window,), -1, jnp.int32),
        }

    def optimizer_configs(self) -> dict[str, ml_collections.ConfigDict]:
        return {MODEL: self.config.optim, DISCRIMINATOR: self.config.discriminator_optim}

    def pretrained(self) -> Networks | None:
        """The encoder from SigLIP2's first layers (spec 1.1) and a release's discriminator."""
        train = self.config.train
        params = partners = variables = None
        if train.encoder_from_siglip2:
            if exported.is_model_dir(self._siglip2_dir()):
                vit = encoder_params_from_siglip2(self._load_siglip2(),
                                                  self.config.model.encoder.depth)
                params = {"encoder": {"vit": vit}}
            else:  # allowed by train.allow_random_init_networks (_check_pretrained_dirs)
                logging.warning("train.encoder_from_siglip2: no SigLIP2 weights in %s; the "
                                "encoder starts from a random init", self._siglip2_dir())
        if train.discriminator_init:
            loaded = disc.load_discriminator_variables(train.discriminator_init, self.heads,
                                                       self.dino.width)
            partners = {DISCRIMINATOR: loaded["params"]}
            variables = {DISCRIMINATOR: {name: loaded[name] for name in disc.STATE_COLLECTIONS}}
        if params is None and partners is None:
            return None
        return Networks(params, partners, variables)

    # --- host draws ---------------------------------------------------------------------------

    def host_draws(self, step: int) -> tuple[StepVariant, dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.config.seed, step])
        res_map = self.res_map
        t = draw_prefix_length(res_map, rng, self.config.degradation.prob)
        noise_idx = draw_noise_index(res_map, rng, t, self.config.correction.prob)
        variant = StepVariant(res_map.output_grid(t), noise_idx is not None)
        # [S, R]: area to R(t), bicubic to S; at t = N exactly the identity (R(N) = S = R).
        degrade = resize.degrade_matrix(res_map.image_size, res_map.resolution(t),
                                        res_map.output_resolution(t)).astype(np.float32)
        return variant, {"step": np.int32(step), "num_tokens": np.int32(t),
                         "noise_idx": np.int32(noise_idx or 0), "degrade": degrade}

    # --- the step -------------------------------------------------------------------------------

    def _discriminate(self, head_params, state, constants, key, images, policy):
        """One training-mode D call on DiffAugment-ed images: (logits [B, 5 * 196], state)."""
        aug_key, dino_key = jax.random.split(key)
        augmented = augment.diff_augment(aug_key, images, policy)
        return disc.discriminator_logits(head_params, state, constants["dino"], dino_key,
                                         augmented, self.heads, self.dino)

    def _reconstruct(self, params, images, draws, variant: StepVariant, key):
        """The training forward: (reconstructions [2B or B, S, S, 3], codebook loss, commitment
        loss, clean indices [B, N], decoder codes [2B or B, N, D], first-token prediction)."""
        n = self.config.model.num_latent_tokens
        ranks = draw_neighbour_ranks(key, (images.shape[0], n), self.model.neighbour_top_k)
        if variant.correction:
            out = self.model.apply({"params": params}, images, draws["noise_idx"], ranks,
                                   draws["num_tokens"], variant.grid)
            corr = out["correction"]
            codes = jnp.concatenate([corr.quant_clean, corr.quant], axis=0)
            return (out["reconstructions"], corr.codebook_loss, corr.commitment_loss,
                    corr.indices[..., 0], codes, out["first_token"])

        def clean(module, x):  # t = 1: no correction (spec 3), a B-image decoder batch
            vq = module.encode(x)
            return (module.decode(vq.quantized, draws["num_tokens"], variant.grid), vq,
                    module.align_first_token(vq.quantized[:, 0]))

        recon, vq, first = self.model.apply({"params": params}, images, method=clean)
        return recon, vq.codebook_loss, vq.commitment_loss, vq.indices, vq.quantized, first

    def objectives(self) -> tuple[Objective, ...]:
        config, loss_config = self.config, self.config.loss

        def generator(params, context, batch, key):
            key = jax.random.fold_in(key, 0)
            ranks_key, lpips_key, d_key = jax.random.split(key, 3)
            variant, draws, constants = context.static, context.draws, context.constants
            step = draws["step"] + 1  # the original's global_step (train_steps + 1)
            images = images_to_float(batch["image"])
            recon, codebook, commitment, indices, codes, first = self._reconstruct(
                params[MODEL], images, draws, variant, ranks_key)
            target = resize.apply_resize_matrices(images, draws["degrade"], draws["degrade"])
            if variant.correction:
                target = jnp.concatenate([target, target], axis=0)
            reconstruction = jnp.mean(jnp.square(recon - target))
            zero = jnp.zeros((), jnp.float32)
            perceptual, perceptual_weight = zero, zero
            if loss_config.perceptual_weight:
                perceptual = jnp.mean(lpips.lpips_distance(constants["lpips"], target, recon,
                                                           lpips_key))
                perceptual_weight = loss_config.perceptual_weight * jnp.minimum(
                    1.0, step / loss_config.perceptual_warmup)
            variables = context.variables
            fake, d_state = self._discriminate(params[DISCRIMINATOR], variables[DISCRIMINATOR],
                                               constants, d_key, recon, augment.NORMAL)
            adversarial = gan_losses.hinge_g_loss(fake)
            disc_weight = gan_losses.adversarial_weight(step, loss_config.disc_start,
                                                        loss_config.disc_weight)
            alignment = zero
            if loss_config.alignment_weight:
                teacher_target = detailflow.alignment_target(self.teacher, constants["teacher"],
                                                             images)
                alignment = detailflow.alignment_loss(first, teacher_target)
            loss = (loss_config.reconstruction_weight * reconstruction
                    + perceptual_weight * perceptual + disc_weight * adversarial
                    + codebook + commitment + loss_config.alignment_weight * alignment)
            window = update_codebook_window(variables["codebook_window"], indices)
            usage = window_usage(window, config.model.codebook_size)
            sg = jax.lax.stop_gradient
            metrics_ = dict(
                reconstruction=reconstruction, perceptual=perceptual,
                perceptual_weight=perceptual_weight, generator_adversarial=adversarial,
                disc_weight=disc_weight, codebook=codebook, commitment=commitment,
                alignment=alignment,
                token_cosine_similarity=group_cosine_similarity(sg(codes),
                                                                config.model.group_size),
                codebook_usage=usage.fraction_used, codebook_perplexity=usage.perplexity,
                num_tokens=draws["num_tokens"].astype(jnp.float32),
                noise_index=(draws["noise_idx"] if variant.correction
                             else jnp.int32(-1)).astype(jnp.float32),
                output_size=jnp.float32(recon.shape[1]))
            new_variables = {**variables, DISCRIMINATOR: d_state, "codebook_window": window}
            return loss, LossOutput(metrics_, new_variables, (sg(target), sg(recon)))

        def discriminator(params, context, batch, key):
            del batch
            keys = jax.random.split(jax.random.fold_in(key, 1), 4)
            target, recon = context.carry
            step = context.draws["step"] + 1
            head_params, constants = params[DISCRIMINATOR], context.constants
            state = context.variables[DISCRIMINATOR]
            logits = []
            for call_key, images, policy in zip(
                    keys, (target, recon, target, recon),
                    (augment.NORMAL, augment.NORMAL, augment.STRONG, augment.STRONG)):
                call_logits, state = self._discriminate(head_params, state, constants, call_key,
                                                        images, policy)
                logits.append(call_logits)
            lecam_state = gan_losses.LeCamState(**context.variables["lecam"])
            out = gan_losses.discriminator_loss(
                *logits, lecam_state, step, loss_config.disc_start, loss_config.disc_weight,
                loss_config.lecam_weight, loss_config.cr_weight, loss_config.lecam_decay)
            metrics_ = dict(discriminator_hinge=out.hinge, lecam=out.lecam,
                            consistency=out.consistency, logits_real=jnp.mean(logits[0]),
                            logits_fake=jnp.mean(logits[1]),
                            lecam_real_ema=out.lecam_state.real_ema,
                            lecam_fake_ema=out.lecam_state.fake_ema)
            new_variables = {**context.variables, DISCRIMINATOR: state,
                             "lecam": out.lecam_state._asdict()}
            return out.loss, LossOutput(metrics_, new_variables)

        return (Objective("loss", MODEL, generator),
                Objective("discriminator_loss", DISCRIMINATOR, discriminator))

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self, params, constants, batch: Batch, key):
        """Clean encode, then decodes at the grid prefix lengths (1, 2, 4, ..., N), each at its
        R(n) output size. Metrics: psnr at N against the images, psnr_<n> against the
        prefix targets (area to R(n), bicubic to the output size), the batch's codebook usage.
        Images: one grid row per prefix length, nearest-upsampled to the full size."""
        del constants, key
        images = images_to_float(batch["image"])
        res_map, prefixes = self.res_map, grid_prefix_lengths(self.res_map)

        def decode_prefixes(module, x):
            vq = module.encode(x)
            return vq.indices, [module.decode(vq.quantized, n, res_map.output_grid(n))
                                for n in prefixes]

        indices, decodes = self.model.apply({"params": params}, images, method=decode_prefixes)
        results, rows = {}, []
        for n, decoded in zip(prefixes, decodes):
            decoded = jnp.clip(decoded, -1.0, 1.0)
            psnr = jnp.mean(metrics.psnr(prefix_target(images, res_map, n), decoded, 2.0))
            results["psnr" if n == res_map.num_tokens else f"psnr_{n}"] = psnr
            rows.append(upsample_nearest(decoded, res_map.image_size))
        usage = metrics.codebook_usage(indices, self.config.model.codebook_size)
        results.update(codebook_usage=usage.fraction_used, codebook_perplexity=usage.perplexity)
        return results, jnp.stack(rows)
