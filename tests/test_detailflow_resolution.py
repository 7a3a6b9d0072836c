"""R(n), its rounding, the allowed prefix lengths and the per-step draws (spec 2, 3)."""

import collections

import numpy as np
import pytest

from tokenizers_jax.detailflow_resolution import (
    ResolutionMap,
    draw_noise_index,
    draw_prefix_length,
)

# Spec 2: n: R(n) -> out_res, for N = 128, R = 256, p = 1.5, g = 8.
SPEC_TABLE = {
    1: (1, 16), 2: (4, 16), 3: (6, 16), 4: (9, 16), 5: (12, 16), 6: (15, 16), 7: (18, 32),
    8: (21, 32), 16: (44, 48), 24: (67, 80), 32: (88, 96), 40: (108, 112), 48: (128, 128),
    56: (147, 160), 64: (164, 176), 72: (181, 192), 80: (196, 208), 88: (210, 224),
    96: (223, 224), 104: (235, 240), 112: (244, 256), 120: (251, 256), 128: (256, 256),
}


def test_spec_table():
    res = ResolutionMap()
    assert res.prefix_lengths() == tuple(SPEC_TABLE)
    for n, (r, out) in SPEC_TABLE.items():
        assert res.resolution(n) == r, n
        assert res.output_resolution(n) == out, n
        assert res.output_grid(n) == out // 16
    assert res.output_resolutions() == tuple(sorted({out for _, out in SPEC_TABLE.values()}))
    assert len(res.output_resolutions()) == 14


@pytest.mark.parametrize("tokens", [256, 512])
def test_larger_variants_reach_full_resolution(tokens):
    res = ResolutionMap(num_tokens=tokens)
    assert res.resolution(tokens) == 256 and res.output_resolution(tokens) == 256
    assert res.prefix_lengths()[:8] == tuple(range(1, 9))
    assert res.prefix_lengths()[8:] == tuple(range(16, tokens + 1, 8))
    assert all(r % 16 == 0 and 16 <= r <= 256 for r in res.output_resolutions())


def test_invalid_arguments():
    with pytest.raises(ValueError, match="prefix length"):
        ResolutionMap().resolution(0)
    with pytest.raises(ValueError, match="multiples of group_size"):
        ResolutionMap(num_tokens=100)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ResolutionMap(image_size=250)


def test_prefix_length_distribution():
    res = ResolutionMap()
    rng = np.random.default_rng(0)
    draws = collections.Counter(draw_prefix_length(res, rng, 0.2) for _ in range(20000))
    allowed = set(res.prefix_lengths()) - {128}
    assert set(draws) <= allowed | {128}
    assert abs(draws[128] / 20000 - 0.8) < 0.02
    # t in 1..8 each 0.2/120; t in 16..120 each 0.2*8/120; 128 is never degraded.
    small = sum(draws[t] for t in range(1, 9)) / 20000
    assert abs(small - 0.2 * 8 / 120) < 0.006
    assert abs(draws[64] / 20000 - 0.2 * 8 / 120) < 0.006
    assert all(draw_prefix_length(res, rng, 0.0) == 128 for _ in range(10))
    replay = [draw_prefix_length(res, np.random.default_rng(7), 0.5) for _ in range(2)]
    assert replay[0] == replay[1]


def test_noise_index_rules():
    res = ResolutionMap()
    rng = np.random.default_rng(1)
    assert draw_noise_index(res, rng, 1) is None
    assert draw_noise_index(res, rng, 64, correction_prob=0.0) is None
    for t in range(2, 9):
        seen = {draw_noise_index(res, rng, t) for _ in range(300)}
        assert seen == set(range(t))
    seen = collections.Counter(draw_noise_index(res, rng, 128) for _ in range(12000))
    # u ~ U{0..119}: 0..7 kept (1/120 each), then group starts 8..112 (8/120 each).
    assert set(seen) == set(range(8)) | set(range(8, 120, 8))
    assert abs(seen[3] / 12000 - 1 / 120) < 0.004
    assert abs(seen[64] / 12000 - 8 / 120) < 0.01
    for idx in seen:
        assert idx + res.noise_count(idx) <= 128
    with pytest.raises(ValueError, match="allowed prefix"):
        draw_noise_index(res, rng, 12)
