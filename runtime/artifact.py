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

FORMAT = 1
META_SYMBOL = "kiln_meta"
WEIGHTS_SYMBOL = "kiln_weights"
ALIGN = 64

# ELF e_machine values
MACHINES = {62: "x86_64", 183: "aarch64"}


def check_elf(path: Path) -> str:
    """The architecture of a shared library, read from its ELF header before anything loads it."""
    try:
        head = path.read_bytes()[:64] if path.stat().st_size >= 64 else path.read_bytes()
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
    return MACHINES.get(machine, f"machine {machine}")


def validate_metadata(meta: dict, path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("magic") != "kiln":
        raise ArtifactError(f"{path} is a shared library but not a Kiln artifact (no Kiln metadata)")
    fmt = meta.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise ArtifactError(f"{path} has artifact format {fmt}; this Kiln reads format ≤ {FORMAT}: upgrade Kiln")
    for key in ("inputs", "outputs", "blocks", "values", "steps"):
        if key not in meta:
            raise ArtifactError(f"{path}: metadata lacks '{key}' (corrupted?)")
