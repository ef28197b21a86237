"""What this machine can run. CI runs on whichever host the session had: Zen 3 (AVX2 only), Zen 5 or a Xeon
(AVX-512), so a test that pins a preset to assert a schedule must build there but may only run what the CPU
executes, and a test that compares int8 results with ONNX Runtime must know when ONNX Runtime is inexact."""

from __future__ import annotations

import platform

import pytest

from kiln.codegen.target import required_cpu_features, resolve_target
from kiln.runtime.cpu import host_flags, missing_features


def lacks(preset: str) -> list[str]:
    """The CPU features code built for `preset` needs and this machine lacks."""
    return missing_features(required_cpu_features(resolve_target(preset)))


def runs(preset: str):
    """A skip mark for a test that runs code built for `preset` on this machine."""
    missing = lacks(preset)
    return pytest.mark.skipif(bool(missing), reason=f"this CPU lacks {', '.join(missing)} for {preset}")


def ort_int8_saturates() -> bool:
    """ONNX Runtime's x86 u8×s8 kernels without VNNI (AVX2, plain AVX-512) add pairs of products in int16
    with saturation (vpmaddubsw), so full-range int8 weights give wrong sums: on Zen 3 (2026-12-03) a
    QLinearConv was 56 steps off the exact result with weights in [-128, 128) and exact in [-64, 64). Its
    quantizer's `reduce_range` exists for this."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = host_flags()
    return bool(flags) and not ({"avx512_vnni", "avx_vnni"} & flags)
