"""Target facts that schedules and the conv cost model need, read from the target and never from the host:
`--target x86-avx512` gives the same kernels on any build machine. Only the `native` preset reads the host
(codegen/target.py writes its CPU and core count into the target dict); a target without `num-cores` is
planned for DEFAULT_CORES."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

DEFAULT_CORES = 2  # the machines this project's default heuristics were measured on

# per-core data caches (L1d, L2) of the CPUs LLVM names, in bytes; anything else gets GENERIC_CACHES
CACHES = {
    "skylake-avx512": (32 << 10, 1 << 20), "cascadelake": (32 << 10, 1 << 20), "icelake-server": (48 << 10, 5 << 18),
    "sapphirerapids": (48 << 10, 2 << 20), "emeraldrapids": (48 << 10, 2 << 20), "graniterapids": (48 << 10, 2 << 20),
    "haswell": (32 << 10, 256 << 10), "broadwell": (32 << 10, 256 << 10), "skylake": (32 << 10, 256 << 10),
    "znver2": (32 << 10, 512 << 10), "znver3": (32 << 10, 512 << 10), "znver4": (32 << 10, 1 << 20),
    "znver5": (48 << 10, 1 << 20), "neoverse-n1": (64 << 10, 1 << 20), "neoverse-v1": (64 << 10, 1 << 20),
}
GENERIC_CACHES = (32 << 10, 512 << 10)
X86_FEATURES = ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "amx-tile")


@dataclass(frozen=True)
class TargetInfo:
    kind: str  # "llvm" or "cuda"
    arch: str  # x86_64, aarch64, ... (the host side of a CUDA target)
    cpu: str  # LLVM's CPU name ("generic" when the target names none)
    vector_bits: int  # SIMD register width: 512 on AVX-512, 256 on AVX2, 128 on SSE and NEON
    vector_registers: int  # 32 on AVX-512 and NEON, 16 on AVX2 and SSE
    cores: int
    l1d_bytes: int
    l2_bytes: int
    features: tuple[str, ...] = ()
    sm: int = 0  # CUDA compute capability x 10 (80 for sm_80, 90 for sm_90; TVM fills in sm_50); 0 for CPUs

    def lanes(self, dtype_bits: int = 32) -> int:
        return max(1, self.vector_bits // dtype_bits)

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


def target_info(target) -> TargetInfo:
    """The facts of a tvm Target (cached per target string)."""
    return _info(str(target))


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """SIMD lanes for the dtype: 512-bit registers on AVX-512, 256 on AVX2, 128 on NEON and others (4 on CUDA,
    where it sizes vector loads)."""
    info = target_info(target)
    return 4 if info.is_cuda else info.lanes(dtype_bits)


@lru_cache(maxsize=64)
def _info(text: str) -> TargetInfo:
    from tvm.target import Target, codegen

    target = Target(text)
    kind = target.kind.name
    host = target.host if kind != "llvm" and target.host is not None else target
    triple = str(host.attrs.get("mtriple", "") or "x86_64-linux-gnu")
    arch = triple.split("-", 1)[0]
    cpu = str(host.attrs.get("mcpu", "") or "generic")
    cores = int(target.attrs.get("num-cores", 0) or host.attrs.get("num-cores", 0) or DEFAULT_CORES)
    features: list[str] = []
    if kind == "llvm" and arch == "x86_64":
        for f in X86_FEATURES:
            try:
                if codegen.llvm_cpu_has_features([f], target):
                    features.append(f)
            except (ValueError, RuntimeError):
                break
    elif arch == "aarch64":
        mattr = [str(a) for a in host.attrs.get("mattr", [])]
        features = ["neon", *(a.lstrip("+") for a in mattr if a.lstrip("+") != "neon")]
    bits = 512 if "avx512f" in features else 256 if "avx2" in features else 128
    registers = 32 if bits == 512 or arch == "aarch64" else 16
    l1d, l2 = CACHES.get(cpu, GENERIC_CACHES)
    sm = 0
    if kind == "cuda":
        digits = str(target.attrs.get("arch", "") or "").removeprefix("sm_").rstrip("a")
        sm = int(digits) if digits.isdigit() else 0
    return TargetInfo(kind, arch, cpu, bits, registers, cores, l1d, l2, tuple(features), sm)
