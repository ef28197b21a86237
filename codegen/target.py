"""Targets: named presets (`x86`, `x86-avx512`, `x86-avx2`, `aarch64`, `cuda-sm80`, `native`) or a raw TVM
target dict as JSON. An unknown CPU name is an error here, not LLVM's silent fallback to a generic CPU."""

from __future__ import annotations

import json

from kiln.errors import KilnError
from kiln.schedules.target_info import vector_lanes  # noqa: F401  (re-exported)

PRESETS = {
    "x86-avx512": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"},
    "x86-avx2": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    "cuda-sm80": {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}},
}


def host_target_dict(num_cores: int | None = None) -> dict:
    from tvm.target import codegen

    d = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": codegen.llvm_get_system_cpu()}
    if num_cores:
        d["num-cores"] = num_cores
    return d


def resolve_target(spec: str | dict | None):
    """A tvm.target.Target for a preset name, `native`/`x86` (this machine), or a JSON target dict."""
    from tvm.target import Target, codegen

    if spec is None or spec in ("native", "x86", "host"):
        d = host_target_dict()
    elif isinstance(spec, dict):
        d = spec
    elif spec in PRESETS:
        d = PRESETS[spec]
    elif spec.strip().startswith("{"):
        try:
            d = json.loads(spec)
        except json.JSONDecodeError as err:
            raise KilnError(f"--target is not valid JSON: {err}") from None
    else:
        raise KilnError(f"unknown target {spec!r}; presets: native, x86, {', '.join(PRESETS)}, or a TVM target dict")
    if d.get("kind") == "llvm" and "mcpu" in d:
        triple = d.get("mtriple", codegen.llvm_get_system_triple())
        if not codegen.llvm_is_valid_cpu(d["mcpu"], triple):
            raise KilnError(f"LLVM does not know CPU {d['mcpu']!r} for {triple}")
    try:
        return Target(d)
    except (ValueError, RuntimeError) as err:
        raise KilnError(f"invalid target {d}: {err}") from None


def required_cpu_features(target) -> list[str]:
    """The x86 features the kernels may use, checked against the host at load time."""
    from tvm.target import codegen

    if target.kind.name != "llvm" or "x86" not in str(target.attrs.get("mtriple", "x86_64")):
        return []
    out = []
    for feature in ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"):
        try:
            if codegen.llvm_cpu_has_features([feature], target):
                out.append(feature)
        except (ValueError, RuntimeError):
            pass
    return out
