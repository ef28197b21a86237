"""The artifact format: one shared library holding the kernels, a JSON metadata blob and the weights.

Metadata (`kiln_meta`) describes inputs, outputs, storage blocks, every value a kernel reads or writes, and the
kernel steps in order; weights (`kiln_weights`) are the constants, each at a 64-byte aligned offset. Both are
exported as TVM-FFI functions returning bytes, so the file is all a deployment needs. Readers reject a newer
`format` with a clear error.
"""

from __future__ import annotations

import struct
from pathlib import Path

from kiln.errors import ArtifactError

# 1: the first format. 2: a block value may carry a byte `offset` into its block (the parts of a concat planned
# as a view), which a format-1 reader would ignore and so compute garbage: it refuses format 2 instead.
FORMAT = 2
META_SYMBOL = "kiln_meta"
WEIGHTS_SYMBOL = "kiln_weights"
ALIGN = 64

# ELF e_machine values
MACHINES = {62: "x86_64", 183: "aarch64"}


def check_elf(path: Path, expect_arch: str | None = None) -> str:
    """The architecture of a shared library, read from its ELF headers before anything loads it.

    dlopen of a truncated library dies with SIGBUS when it touches a page past the end of the file, so every
    segment and the section table must lie inside the file first.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
            data_for_phdrs = None
            if len(head) == 64:
                (phoff,) = struct.unpack_from("<Q", head, 32)
                (phentsize, phnum) = struct.unpack_from("<HH", head, 54)
                f.seek(phoff)
                data_for_phdrs = f.read(phentsize * phnum)
    except OSError as err:
        raise ArtifactError(f"cannot read artifact {str(path)!r}: {err.strerror}") from None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise ArtifactError(f"{path} is not a Kiln artifact (not an ELF shared library)")
    if head[4] != 2 or head[5] != 1:
        raise ArtifactError(f"{path} is not a 64-bit little-endian library")
    (e_type,) = struct.unpack_from("<H", head, 16)
    (machine,) = struct.unpack_from("<H", head, 18)
    if e_type != 3:
        raise ArtifactError(f"{path} is not a shared library (ELF type {e_type})")
    arch = MACHINES.get(machine, f"machine {machine}")
    if expect_arch is not None and arch != expect_arch:
        how = " or under qemu-user: `kiln run --qemu` (kiln.runtime.qemu)" if arch == "aarch64" else ""
        raise ArtifactError(f"{path} was built for {arch}; this machine is {expect_arch}: run it on an {arch} "
                            f"machine{how}")
    (shoff,) = struct.unpack_from("<Q", head, 40)
    (phentsize, phnum, shentsize, shnum) = struct.unpack_from("<HHHH", head, 54)
    truncated = shoff + shentsize * shnum > size or data_for_phdrs is None or len(data_for_phdrs) < phentsize * phnum
    for k in range(0 if truncated else phnum):
        p_type, _flags, p_offset = struct.unpack_from("<IIQ", data_for_phdrs, k * phentsize)
        (p_filesz,) = struct.unpack_from("<Q", data_for_phdrs, k * phentsize + 32)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD past the end of the file
            truncated = True
    if truncated:
        raise ArtifactError(f"{path} is truncated ({size} bytes); copy or rebuild it")
    return arch


def validate_metadata(meta: dict, path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("magic") != "kiln":
        raise ArtifactError(f"{path} is a shared library but not a Kiln artifact (no Kiln metadata)")
    fmt = meta.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise ArtifactError(f"{path} has artifact format {fmt}; this Kiln reads format ≤ {FORMAT}: upgrade Kiln")
    for key in ("inputs", "outputs", "blocks", "values", "steps"):
        if key not in meta:
            raise ArtifactError(f"{path}: metadata lacks '{key}' (corrupted?)")
