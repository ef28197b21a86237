"""Facts about a target that schedules need (vector width), read from the TVM target."""

from __future__ import annotations


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """SIMD lanes for the dtype: 512-bit registers on AVX-512, 256 on AVX2, 128 on NEON and others."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return 4
    for feature, bits in (("avx512f", 512), ("avx2", 256)):
        try:
            if codegen.llvm_cpu_has_features([feature], target):
                return bits // dtype_bits
        except (ValueError, RuntimeError):
            break
    return 128 // dtype_bits
