"""CUDA device code at build time. A cuda executable from `tvm.compile` carries its kernels as CUDA C source,
which TVM's CUDA runtime would compile only when the library loads on a GPU machine; Kiln compiles it to PTX
here with the local nvcc instead, so a kernel that does not compile fails the build, and writes the PTX beside
the artifact (`model.so` → `model.ptx`) for the GPU side to load with the CUDA driver."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from kiln.errors import CodegenError


def is_cuda(target) -> bool:
    return target.kind.name == "cuda"


def device_source(executable) -> str:
    """The CUDA C source of every kernel in a cuda executable."""
    mods = [m for m in executable.mod.imports if m.kind == "cuda"]
    if not mods:
        raise CodegenError("the executable holds no CUDA module; was it built for a cuda target?")
    return "\n".join(m.inspect_source() for m in mods)


def compile_ptx(source: str, target) -> str:
    """PTX for the target's `arch` (sm_80 for cuda-sm80), compiled by nvcc."""
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        raise CodegenError("a cuda target needs nvcc on PATH to compile its kernels to PTX; install the CUDA toolkit")
    try:
        with target:
            ptx = nvcc.compile_cuda(source, target_format="ptx", compiler="nvcc")
    except RuntimeError as err:
        raise CodegenError(f"nvcc could not compile the CUDA kernels: {str(err).strip()[-800:]}") from None
    return bytes(ptx).decode()


def ptx_kernels(ptx: str) -> list[str]:
    """Names of the kernel entry points in PTX text."""
    return re.findall(r"^\.visible \.entry (\w+)\(", ptx, flags=re.MULTILINE)


def write_ptx(artifact: Path, executable, target) -> tuple[Path, int]:
    """Compile the executable's kernels to PTX and write them next to `artifact`; (path, number of kernels)."""
    ptx = compile_ptx(device_source(executable), target)
    path = Path(artifact).with_suffix(".ptx")
    path.write_text(ptx)
    return path, len(ptx_kernels(ptx))
