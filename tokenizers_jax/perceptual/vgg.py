"""VGG16 `features` trunk (torchvision layout) returning the five LPIPS feature maps."""

from __future__ import annotations

import flax.linen as nn
import jax

from tokenizers_jax.perceptual.common import conv, max_pool

# (torchvision `features` index of each 3x3 conv, its output channels), per stage; every
# stage but the first starts with a 2x2 max pool.
VGG16_STAGES = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
LAYER_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


class VGG16Features(nn.Module):
    """torchvision VGG16 `features[:30]`; conv `features.N` is the submodule `features_N`.

    Input: [B, H, W, 3] (already normalised). Returns a dict LAYER_NAMES -> [B, h, w, C],
    the ReLU outputs at full, 1/2, 1/4, 1/8 and 1/16 resolution.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        outputs = {}
        for stage, (layer_name, convs) in enumerate(zip(LAYER_NAMES, VGG16_STAGES)):
            if stage:
                x = max_pool(x, 2, 2)
            for index, channels in convs:
                x = nn.relu(conv(channels, 3, padding=1, bias=True, name=f"features_{index}")(x))
            outputs[layer_name] = x
        return outputs
