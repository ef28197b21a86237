"""Targets: named presets (`x86`, `x86-avx512`, `x86-avx2`, `aarch64`, `aarch64-dotprod`, `cuda-sm80`,
`cuda-sm90`, `native`) or a raw TVM target dict as JSON. An unknown CPU name is an error here, not LLVM's silent fallback to a generic CPU."""

from __future__ import annotations

import json
import os
import platform
import shutil

from kiln.errors import CodegenError, KilnError
from kiln.ir.tvm_import import import_tvm
from kiln.schedules.target_info import vector_lanes  # noqa: F401  (re-exported)

PRESETS = {
    "x86-avx512": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"},
    # AVX-512 VNNI: quantized (QDQ) convs run on vpdpbusd (passes/realize_qdq.py, schedules/x86/qconv2d_nchwc.py)
    "x86-avx512-vnni": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"},
    "x86-avx2": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    # ARMv8.2 dot product (Cortex-A55/A76 and later, Graviton2+): int8 convs and matmuls on sdot
    "aarch64-dotprod": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
    "cuda-sm80": {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}},  # Ampere: A100
    "cuda-sm90": {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}},  # Hopper: H100, H200
}


def host_target_dict(num_cores: int | None = None) -> dict:
    """This machine as a target: its CPU and the cores this process may use. The only reader of the host; every
    other preset gives the same kernels on any build machine."""
    from tvm.target import codegen

    cpu = os.environ.get("KILN_NATIVE_CPU") or codegen.llvm_get_system_cpu()  # KILN_NATIVE_CPU: test as another host
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu,
            "num-cores": num_cores or len(os.sched_getaffinity(0))}


def resolve_target(spec: str | dict | None):
    """A tvm.target.Target for a preset name, `native`/`x86` (this machine), or a JSON target dict."""
    import_tvm()  # every compile and tune resolves its target first
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
    """The x86 features the kernels may use, or the aarch64 extensions beyond NEON they were built with
    (dotprod: sdot), checked against the host at load time."""
    from tvm.target import codegen

    if target.kind.name == "llvm" and "aarch64" in str(target.attrs.get("mtriple", "")):
        return [str(a).lstrip("+") for a in target.attrs.get("mattr", []) if str(a).lstrip("+") in ("dotprod",)]
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


# The cross compiler for a target triple's architecture, when it is not this machine's (Debian's names).
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-gcc"}


def target_arch(target) -> str:
    """The CPU architecture the target's code runs on: `x86_64`, `aarch64`, ..."""
    from tvm.target import codegen

    host = target.host if target.kind.name != "llvm" and target.host is not None else target
    triple = str(host.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    return triple.split("-", 1)[0]


def toolchain(target) -> tuple[str, object | None]:
    """(C compiler, export_library fcompile) that link an artifact for the target: this machine's gcc, or a
    cross gcc when the target is another architecture. A missing cross compiler is a clear error here."""
    from tvm.support import cc

    arch = target_arch(target)
    machine = {"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    if arch == machine:
        return "gcc", None
    gcc = CROSS_COMPILERS.get(arch)
    if gcc is None:
        raise CodegenError(f"cannot link an artifact for {arch} on this {machine} machine: no cross compiler "
                           f"is known for it (known: {', '.join(CROSS_COMPILERS)})")
    if shutil.which(gcc) is None:
        raise CodegenError(f"target {arch} needs the cross compiler {gcc}, which is not on PATH; install it "
                           f"(Debian/Ubuntu: apt-get install gcc-{arch}-linux-gnu)")
    # Kernels call libm (erff for GELU); link it as NEEDED. The options precede the objects, so not --as-needed.
    return gcc, cc.cross_compiler(gcc, options=["-Wl,--no-as-needed", "-lm"])
