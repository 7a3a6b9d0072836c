"""The `discriminator` entry of a released DetailFlow tokenizer checkpoint (spec 8) <-> the
variables of `models.discriminator.DiscriminatorHeads`.

Used by `python -m tokenizers_jax.convert detailflow ... --discriminator`, which writes the
heads beside the tokenizer (OUTPUT/discriminator) so training can resume from a release;
`models.discriminator.load_discriminator_variables` reads them back. The DINO trunk is not
part of these weights (the original holds it outside its state dict; see `convert dino`),
nor is the discriminator's Adam state (`optimizer_disc`), which a resumed run starts afresh.

Per head i (torch -> Flax variables):
  heads.i.0.0       SNConv1d k=1   -> params/heads_i/conv_in   (+ spectral u, v)
  heads.i.0.1       BatchNorm1d    -> params/heads_i/norm_in   (+ batch_stats)
  heads.i.1.fn.0    SNConv1d k=9   -> params/heads_i/conv_res
  heads.i.1.fn.1    BatchNorm1d    -> params/heads_i/norm_res
  heads.i.2         SNConv1d 384->1 -> params/heads_i/conv_out
with weight_orig (out, in, k) -> kernel (k, in, out), weight_u -> u, weight_v -> v, BN
weight/bias -> scale/bias, running_mean/var -> mean/var, num_batches_tracked (int).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from tokenizers_jax.convert import common
from tokenizers_jax.convert.common import Rule, Transform
from tokenizers_jax.models.discriminator import DiscriminatorHeads, init_discriminator_variables

# Conv1d weight (out, in, k) <-> kernel (k, in, out).
CONV1D = Transform(lambda a: np.transpose(a, (2, 1, 0)), lambda a: np.transpose(a, (2, 1, 0)))
_CONVS = {"0.0": "conv_in", "1.fn.0": "conv_res", "2": "conv_out"}
_NORMS = {"0.1": "norm_in", "1.fn.1": "norm_res"}


def discriminator_rules(num_heads: int = 5) -> dict[str, Rule]:
    """torch `discriminator` key -> '/'-path in the {"params", "spectral", "batch_stats"} tree."""
    rules = {}
    for i in range(num_heads):
        for torch_name, name in _CONVS.items():
            src, module = f"heads.{i}.{torch_name}", f"heads_{i}/{name}"
            rules[f"{src}.weight_orig"] = Rule(f"params/{module}/kernel", CONV1D)
            rules[f"{src}.bias"] = Rule(f"params/{module}/bias")
            rules[f"{src}.weight_u"] = Rule(f"spectral/{module}/u")
            rules[f"{src}.weight_v"] = Rule(f"spectral/{module}/v")
        for torch_name, name in _NORMS.items():
            src, module = f"heads.{i}.{torch_name}", f"heads_{i}/{name}"
            rules[f"{src}.weight"] = Rule(f"params/{module}/scale")
            rules[f"{src}.bias"] = Rule(f"params/{module}/bias")
            rules[f"{src}.running_mean"] = Rule(f"batch_stats/{module}/mean")
            rules[f"{src}.running_var"] = Rule(f"batch_stats/{module}/var")
            rules[f"{src}.num_batches_tracked"] = Rule(f"batch_stats/{module}/num_batches_tracked")
    return rules


def abstract_variables(heads: DiscriminatorHeads, channels: int = 384) -> Any:
    """ShapeDtypeStructs of the unboxed head variables."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel

    return jax.eval_shape(
        lambda k: nn.unbox(init_discriminator_variables(k, heads, channels)), jax.random.key(0))


def discriminator_variables_from_torch(
    state_dict: Mapping[str, Any], heads: DiscriminatorHeads | None = None, channels: int = 384
) -> dict:
    """A checkpoint's `discriminator` state dict -> {"params", "spectral", "batch_stats"}
    (numpy; fp32, the BatchNorm counters int32).

    Raises:
      ConversionError: naming missing, unexpected or mis-shaped keys.
    """
    heads = DiscriminatorHeads() if heads is None else heads
    template = abstract_variables(heads, channels)
    variables = common.torch_to_flax(state_dict, discriminator_rules(heads.num_heads), template,
                                     what="DetailFlow checkpoint's discriminator")
    return jax.tree.map(lambda value, spec: np.asarray(value, spec.dtype), variables, template)


def discriminator_variables_to_torch(variables: Any, num_heads: int = 5) -> dict[str, np.ndarray]:
    """Inverse of `discriminator_variables_from_torch` (counters as int64, as torch's)."""
    state_dict = common.flax_to_torch(variables, discriminator_rules(num_heads))
    return {key: value.astype(np.int64) if key.endswith("num_batches_tracked") else value
            for key, value in state_dict.items()}
