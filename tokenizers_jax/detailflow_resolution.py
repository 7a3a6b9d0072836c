"""DetailFlow's token-count <-> resolution map and the per-step random draws (spec 2, 3).

Pure host-side Python: these decide static shapes (decoder output grids) and the random
choices of a training step (prefix length t, self-correction noise index) before anything is
traced. Random draws take an explicit `numpy.random.Generator`, so a step can be replayed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class ResolutionMap:
    """R(n) and the decoder output size for each prefix length n (spec 2).

    Attributes:
      image_size: full resolution R (the encoder input and the size for n = N).
      num_tokens: N, the number of latent tokens.
      group_size: g, tokens per group.
      causal_num: the first `causal_num` tokens are token-causal (a multiple of g).
      power: degradation power p of R(n).
      patch_size: decoder patch size; output sizes are multiples of it and at least it.
    """

    image_size: int = 256
    num_tokens: int = 128
    group_size: int = 8
    causal_num: int = 8
    power: float = 1.5
    patch_size: int = 16

    def __post_init__(self):
        if self.num_tokens % self.group_size or self.causal_num % self.group_size:
            raise ValueError(
                f"num_tokens ({self.num_tokens}) and causal_num ({self.causal_num}) must be "
                f"multiples of group_size ({self.group_size})"
            )
        if self.num_tokens < self.causal_num + self.group_size:
            raise ValueError("num_tokens must leave at least one group after the causal tokens")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of the patch size "
                f"{self.patch_size}"
            )

    def resolution(self, n: int) -> int:
        """R(n) = int(R - (R-1)(N-n)^p / (N-1)^p), clipped to [1, R] (`token_res_map_func`)."""
        self._check_n(n)
        big_r, big_n = self.image_size, self.num_tokens
        slope = (big_r - 1) / math.pow(big_n - 1, self.power)
        size = int(big_r - slope * math.pow(big_n - n, self.power))
        return max(1, min(size, big_r))

    def output_resolution(self, n: int) -> int:
        """R(n) rounded up to a multiple of the patch size, at least one patch."""
        p = self.patch_size
        return max(p, math.ceil(self.resolution(n) / p) * p)

    def output_grid(self, n: int) -> int:
        """Decoder grid side G (output is G * patch_size pixels square) for prefix length n."""
        return self.output_resolution(n) // self.patch_size

    def prefix_lengths(self) -> tuple[int, ...]:
        """The prefix lengths used in training: 1..causal_num, then multiples of g up to N."""
        g = self.group_size
        return tuple(range(1, self.causal_num + 1)) + tuple(
            range(self.causal_num + g, self.num_tokens + 1, g)
        )

    def output_resolutions(self) -> tuple[int, ...]:
        """The distinct decoder output sizes over `prefix_lengths()` (the compiled buckets)."""
        return tuple(sorted({self.output_resolution(n) for n in self.prefix_lengths()}))

    def noise_count(self, noise_idx: int) -> int:
        """How many tokens self-correction perturbs at `noise_idx`: 1 in the causal part, else g."""
        return 1 if noise_idx < self.causal_num else self.group_size

    def _check_n(self, n: int):
        if not 1 <= n <= self.num_tokens:
            raise ValueError(f"prefix length must be in [1, {self.num_tokens}], got {n}")

    @classmethod
    def from_config(cls, model_config) -> "ResolutionMap":
        """From a `config.model` of configs/detailflow.py."""
        return cls(
            image_size=model_config.image_size,
            num_tokens=model_config.num_latent_tokens,
            group_size=model_config.group_size,
            causal_num=model_config.causal_num,
            power=model_config.degradation_power,
            patch_size=model_config.decoder.patch_size,
        )


def draw_prefix_length(res_map: ResolutionMap, rng: np.random.Generator, degrade_prob: float) -> int:
    """The batch-wide prefix length t of one training step (spec 2).

    With probability `degrade_prob`, t0 ~ U{1..N-g}, rounded up to a multiple of g when it is
    past the causal tokens; otherwise t = N.
    """
    if rng.random() >= degrade_prob:
        return res_map.num_tokens
    t = int(rng.integers(1, res_map.num_tokens - res_map.group_size + 1))
    if t > res_map.causal_num:
        t = math.ceil(t / res_map.group_size) * res_map.group_size
    return t


def draw_noise_index(
    res_map: ResolutionMap, rng: np.random.Generator, t: int, correction_prob: float = 1.0
) -> int | None:
    """The self-correction noise index for prefix length t (spec 3), or None for no correction.

    t = 1 never gets correction. For t <= causal_num, noise_idx ~ U{0..t-1}; otherwise
    u ~ U{0..t-g-1}, kept if it is in the causal part and floored to a group start otherwise.
    """
    if t == 1 or rng.random() >= correction_prob:
        return None
    if t <= res_map.causal_num:
        high = t
    else:
        if t % res_map.group_size or t < res_map.causal_num + res_map.group_size:
            raise ValueError(f"t={t} is not an allowed prefix length {res_map.prefix_lengths()}")
        high = t - res_map.group_size
    u = int(rng.integers(0, high))
    if u < res_map.causal_num:
        return u
    return u // res_map.group_size * res_map.group_size
