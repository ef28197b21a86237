"""CUDA device code at build time. `tvm.compile` leaves a cuda executable's kernels as CUDA C source, which
TVM's CUDA runtime would compile on the GPU machine when the library loads (a compiler there, JIT at every load).
Kiln compiles it here instead: nvcc turns the source into PTX, then into a fatbin holding the preset arch's SASS
(`sm_90`) and its PTX (`compute_90`, for a newer GPU's driver to JIT), so a bad kernel fails the build; the fatbin
replaces the source inside the artifact, and the driver loads it on the GPU machine with no compiler.

The artifact's device code travels in TVM's packed-imports blob (`__tvm_ffi__library_bin`: a u64 length, the
import tree as two u64 vectors, then per module its kind and, for all but the host library `_lib`, its bytes);
a CUDA module's bytes are its format string, its function table and its code (runtime/cuda/cuda_module.cc,
SaveToBytes). Every field is a u64 length (of bytes or of elements) before its contents.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import CodegenError

DEVICE_FORMAT = "fatbin"  # CUDAModuleNode hands any format but "cuda" to cuModuleLoadData, which reads fatbins
_U64 = struct.Struct("<Q")


def is_cuda(target) -> bool:
    return target.kind.name == "cuda"


def device_source(executable) -> str:
    """The CUDA C source of every kernel in a cuda executable."""
    mods = [m for m in executable.mod.imports if m.kind == "cuda"]
    if not mods:
        raise CodegenError("the executable holds no CUDA module; was it built for a cuda target?")
    return "\n".join(m.inspect_source() for m in mods)


def _nvcc() -> str:
    if shutil.which("nvcc") is None:
        raise CodegenError("a cuda target needs nvcc on PATH to compile its kernels; install the CUDA toolkit")
    return "nvcc"


def sm_version(target) -> str:
    """The target's compute capability as digits: `sm_90` → "90"."""
    arch = str(target.attrs.get("arch", ""))
    if not re.fullmatch(r"sm_\d+[a-z]?", arch):
        raise CodegenError(f"cuda target {target} has arch {arch!r}; give one like \"sm_90\" (the presets do)")
    return arch[3:]


def compile_ptx(source: str, target) -> str:
    """PTX for the target's `arch` (sm_80 for cuda-sm80), compiled by nvcc."""
    from tvm.support import nvcc

    _nvcc()
    try:
        with target:
            ptx = nvcc.compile_cuda(source, target_format="ptx", compiler="nvcc")
    except RuntimeError as err:
        raise CodegenError(f"nvcc could not compile the CUDA kernels: {str(err).strip()[-800:]}") from None
    return bytes(ptx).decode()


def compile_fatbin(ptx: str, target) -> bytes:
    """A fatbin of `ptx` for the target's arch: its SASS (ptxas, here) and the PTX itself, uncompressed so the
    artifact can be inspected without CUDA tools (`fatbin_entries`)."""
    sm = sm_version(target)
    with tempfile.TemporaryDirectory(prefix="kiln-cuda-") as tmp:
        src, out = Path(tmp) / "kernels.ptx", Path(tmp) / "kernels.fatbin"
        src.write_text(ptx)
        cmd = [_nvcc(), "-fatbin", "--no-compress", "-gencode", f"arch=compute_{sm},code=[sm_{sm},compute_{sm}]",
               "-o", str(out), str(src)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CodegenError(f"nvcc could not assemble the PTX for sm_{sm}: {proc.stderr.strip()[-800:]}")
        return out.read_bytes()


def ptx_kernels(ptx: str) -> list[str]:
    """Names of the kernel entry points in PTX text."""
    return re.findall(r"^\.visible \.entry (\w+)\(", ptx, flags=re.MULTILINE)


@dataclass(frozen=True)
class DeviceCode:
    source: str  # the CUDA C that TVM generated
    ptx: str
    fatbin: bytes  # what the artifact carries


def compile_device_code(executable, target) -> DeviceCode:
    """The executable's kernels compiled for the target: PTX, and the fatbin the artifact carries."""
    source = device_source(executable)
    ptx = compile_ptx(source, target)
    return DeviceCode(source, ptx, compile_fatbin(ptx, target))


def write_ptx(artifact: Path, ptx: str) -> Path:
    """The PTX beside `artifact` (`model.so` → `model.ptx`), for reading; nothing loads it (the .so has it)."""
    path = Path(artifact).with_suffix(".ptx")
    path.write_text(ptx)
    return path


# --- the packed-imports blob ---------------------------------------------------------------------------------

def _read_u64(data: bytes, at: int) -> tuple[int, int]:
    if at + 8 > len(data):
        raise CodegenError("the packed device-module blob is truncated")
    return _U64.unpack_from(data, at)[0], at + 8


def _read_str(data: bytes, at: int) -> tuple[bytes, int]:
    n, at = _read_u64(data, at)
    if at + n > len(data):
        raise CodegenError("the packed device-module blob is truncated")
    return bytes(data[at:at + n]), at + n


def _str(b: bytes) -> bytes:
    return _U64.pack(len(b)) + b


def split_imports(blob: bytes) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """The packed-imports blob (without its u64 length) as (import tree bytes, [(kind, bytes or None for `_lib`)])."""
    at = 0
    rows, at = _read_u64(blob, at)
    at += 8 * rows
    children, at = _read_u64(blob, at)
    at += 8 * children
    tree = blob[:at]
    modules: list[tuple[str, bytes | None]] = []
    for _ in range(rows - 1):
        kind, at = _read_str(blob, at)
        payload = None
        if kind != b"_lib":
            payload, at = _read_str(blob, at)
        modules.append((kind.decode(), payload))
    return tree, modules


def join_imports(tree: bytes, modules: list[tuple[str, bytes | None]]) -> bytes:
    body = tree + b"".join(_str(k.encode()) + (b"" if p is None else _str(p)) for k, p in modules)
    return _U64.pack(len(body)) + body


def split_cuda_module(payload: bytes, code_nbytes: int | None = None) -> tuple[str, bytes, bytes]:
    """A CUDA module's saved bytes as (format, function table bytes, code). The code is the last field; without
    its length, the first u64 after the format that counts exactly the bytes after it is taken for its length."""
    fmt, at = _read_str(payload, 0)
    ends = [len(payload) - 8 - code_nbytes] if code_nbytes is not None else range(at, len(payload) - 7)
    for end in ends:
        if end >= at and _U64.unpack_from(payload, end)[0] == len(payload) - end - 8:
            return fmt.decode(), payload[at:end], payload[end + 8:]
    raise CodegenError("the CUDA module's saved bytes do not end in its code")


def cuda_module_bytes(fmt: str, fmap: bytes, code: bytes) -> bytes:
    return _str(fmt.encode()) + fmap + _str(code)


def packed_imports_with_binary(executable, source: str, fatbin: bytes) -> bytes:
    """The executable's packed-imports blob with its CUDA module's source replaced by `fatbin`."""
    import tvm_ffi

    packed = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod).numpy())
    tree, modules = split_imports(packed[8:])
    out, replaced = [], 0
    for kind, payload in modules:
        if kind == "cuda":
            # "cuda": the source (no CUDA runtime in this process). Where TVM's CUDA runtime is loaded, it has
            # compiled the source already (NVRTC, for the local GPU); ours replaces that too.
            fmt = _read_str(payload, 0)[0].decode()
            fmt, fmap, code = split_cuda_module(payload, len(source.encode()) if fmt == "cuda" else None)
            if fmt == "cuda" and code != source.encode():
                raise CodegenError("the CUDA module holds other source than the source that was compiled")
            payload, replaced = cuda_module_bytes(DEVICE_FORMAT, fmap, fatbin), replaced + 1
        out.append((kind, payload))
    if replaced != 1:
        raise CodegenError(f"expected one CUDA module in the executable, found {replaced}")
    return join_imports(tree, out)


_PACKED_C = r'''
/* TVM's packed imports, as runtime.ModulePackImportsToC writes them, from a file */
__asm__(".section .rodata\n.balign 8\n.globl %(symbol)s\n.type %(symbol)s, @object\n%(symbol)s:\n"
        ".incbin \"%(file)s\"\n.size %(symbol)s, . - %(symbol)s\n.previous");
'''


def fpack_imports(blob: bytes):
    """An `export_library(fpack_imports=...)` hook that links `blob` as the library's packed imports."""
    import tvm_ffi

    symbol = tvm_ffi.get_global_func("runtime.ModuleImportsBlobName")()

    def pack(mod, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        if is_system_lib or prefix:
            raise CodegenError("a CUDA artifact is a shared library, not a system library")
        bin_path = os.path.join(workspace_dir, "devc.bin")
        with open(bin_path, "wb") as f:
            f.write(blob)
        c_path = os.path.join(workspace_dir, "devc.c")
        with open(c_path, "w") as f:
            f.write(_PACKED_C % {"symbol": symbol, "file": bin_path})
        return c_path

    return pack


# --- reading a fatbin ----------------------------------------------------------------------------------------

FATBIN_MAGIC = 0xBA55ED50
_FATBIN_HEADER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries after it
_ENTRY_HEADER = struct.Struct("<HHIQIIHHI")  # kind, version, header size, payload size, ..., arch (sm × 10)
FATBIN_KINDS = {1: "ptx", 2: "elf"}


def fatbin_entries(fatbin: bytes) -> list[tuple[str, int, bytes]]:
    """(kind "ptx" or "elf", sm version such as 90, payload) for each entry of a fatbin (nvcc's layout, as
    read by cuobjdump; entries may be compressed, their payload then is not plain PTX or ELF)."""
    magic, _version, header, size = _FATBIN_HEADER.unpack_from(fatbin, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError(f"not a fatbin (magic {magic:#x})")
    out, at = [], header
    while at < header + size:
        kind, _v, entry_header, payload, *_, arch = _ENTRY_HEADER.unpack_from(fatbin, at)
        start = at + entry_header
        out.append((FATBIN_KINDS.get(kind, str(kind)), arch, bytes(fatbin[start:start + payload])))
        at = start + payload
    return out
