"""The conv algorithm choice: which candidates each shape has, and that the cost model ranks them the way they
measure on this kind of machine (the measured rankings are in docs/conv_layers.md)."""

import pytest
from kiln.schedules.choose import ConvWorkload, candidates, choose, estimate_ms


def wl(c, h, oc, k=3, s=1, groups=1):
    return ConvWorkload(1, c, h, h, oc, k, k, (s, s), (k // 2,) * 4, (1, 1), groups)


def test_candidates_follow_the_shape():
    assert candidates(wl(64, 56, 64)) == ["direct", "im2col", "winograd2", "winograd4"]
    assert candidates(wl(64, 56, 64, s=2)) == ["direct", "im2col"]
    assert candidates(wl(64, 56, 64, k=1)) == ["direct", "im2col"]
    assert candidates(wl(32, 56, 32, groups=32)) == ["direct"]  # depthwise
    assert candidates(wl(32, 56, 32, groups=4)) == ["nchw"]  # groups of 8 channels: stay NCHW
    assert candidates(wl(96, 26, 256, groups=2)) == ["direct"]  # AlexNet's: groups of whole 16-lane blocks
    assert candidates(wl(96, 26, 256, groups=2), lanes=32) == ["nchw"]


@pytest.mark.parametrize("c,h,want", [(64, 56, "winograd4"), (128, 28, "winograd4"), (256, 14, "winograd2")])
def test_winograd_wins_where_arithmetic_dominates(c, h, want):
    assert choose(wl(c, h, c)).algorithm == want


def test_direct_wins_for_1x1_strided_and_the_7x7_stem():
    assert choose(wl(256, 14, 1024, k=1)).algorithm == "direct"
    assert choose(wl(128, 56, 128, s=2)).algorithm == "direct"
    assert choose(ConvWorkload(1, 3, 224, 224, 64, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1))).algorithm == "direct"


def test_cold_weights_make_winograd_lose_on_small_maps_with_many_channels():
    """At 7x7 the transformed weights (1.8x or 4x the direct ones) cost more to stream than the saved work."""
    est = choose(wl(512, 7, 512)).estimates_ms
    assert est["direct"] < est["winograd4"]


def test_estimates_scale_with_work():
    assert estimate_ms(wl(64, 56, 128), "direct") > estimate_ms(wl(64, 56, 64), "direct")
    assert estimate_ms(wl(64, 28, 64), "winograd4") < estimate_ms(wl(64, 56, 64), "winograd4")


def test_winograd_loses_with_few_input_channels():
    """Its batched GEMM reduces over the input channels alone: SqueezeNet's 16-channel 3x3 measured 0.277 ms in
    F(4x4) against 0.179 ms direct, while the 32-channel one still gained (0.161 against 0.171)."""
    assert choose(wl(16, 55, 64)).algorithm == "direct"
    assert choose(wl(32, 27, 128)).algorithm == "winograd4"


def test_small_weights_run_fused_and_spill_nothing():
    """Small transformed weights (≤ 1 MB) run the stages per row of tiles, so V and M never leave L2: VGG-19's
    64-channel 224x224 conv and DenseNet-121's 128→32 convs at 56x56 gain (cold alone on Zen 5, 2026-12-03:
    F(4x4) 5.5 against 8.9 ms direct, 0.55 against 0.74)."""
    assert choose(wl(64, 224, 64)).algorithm == "winograd4"
    assert choose(wl(128, 56, 32)).algorithm == "winograd4"


def test_f2x2_runs_nearer_the_peak_but_few_output_channels_reuse_less():
    """VGG-19's 112x112 convs: F(2x2) fused 2.8 and 5.4 ms alone against F(4x4) unfused 4.8 and 7.8; DenseNet's
    128→32 at 14x14 (two output blocks, a narrower register tile): direct 56 µs, F(2x2) 69 (Zen 5, 2026-12-03)."""
    assert choose(wl(64, 112, 128)).algorithm == "winograd2"
    assert choose(wl(128, 112, 128)).algorithm == "winograd2"
    assert choose(wl(128, 14, 32)).algorithm == "direct"


def test_only_unfused_winograd_pays_for_spilled_intermediates(monkeypatch):
    """Unfused (the default when U is over 1 MB), V and M make a round trip through memory once they outgrow
    L2; run per row of tiles (U small), they stay in L2 and cost nothing beyond the arithmetic."""
    from kiln.schedules.choose import BANDWIDTH_GBS
    from kiln.schedules.x86 import winograd

    small = wl(64, 112, 64)  # U of F(4x4) 590 KB: fused; V and M 7.2 MB each
    tiles = (112 // 4) ** 2
    spill_ms = 1e3 * 2 * 4 * 36 * tiles * (64 + 64) / (BANDWIDTH_GBS * 1e9)
    fused = estimate_ms(small, "winograd4")
    monkeypatch.setattr(winograd, "FUSE_MAX_WEIGHT_BYTES", 0)
    assert estimate_ms(small, "winograd4") - fused == pytest.approx(spill_ms)
