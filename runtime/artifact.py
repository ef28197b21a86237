"""The artifact format: one shared library holding the kernels, a JSON metadata blob and the weights.

Metadata (`kiln_meta`) describes inputs, outputs, storage blocks, every value a kernel reads or writes, and the
kernel steps in order; weights (`kiln_weights`) are the constants, each at a 64-byte aligned offset. Both are
exported as TVM-FFI functions returning bytes, so the file is all a deployment needs; or the weights lie in a file
beside it (`model.weights`, metadata `weights_file`), which needs not travel with the .so: `python -m
kiln.rebuild_weights` makes it again from the model, byte for byte (its size and CRC-32 are in the metadata, since
the seal covers the .so only). Readers reject a newer
`format` with a clear error. After the ELF contents comes the seal (`SEAL`), a CRC-32 of every byte before it;
metadata with `"sealed": true` makes a missing seal an error, so cutting it off does not skip the check.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError

# 1: the first format. 2: a block value may carry a byte `offset` into its block (the parts of a concat planned
# as a view), which a format-1 reader would ignore and so compute garbage: it refuses format 2 instead.
# 3: the weights may lie in a file beside the library (`weights_file`); only such artifacts are format 3, so an
# older reader refuses them rather than read an empty embedded blob, and every other artifact stays format 2.
FORMAT = 3
EMBEDDED_FORMAT = 2  # what build() writes; write_artifact makes it 3 for external weights
WEIGHTS_SUFFIX = ".weights"
META_SYMBOL = "kiln_meta"
WEIGHTS_SYMBOL = "kiln_weights"
WEIGHTS_VIEW_SYMBOL = "kiln_weights_view"  # the blob's address: one copy at load instead of three (optional)
ALIGN = 64
# The seal ends the file: magic, seal version, CRC-32 of all bytes before the seal, and their count. CRC-32 catches
# every burst of ≤ 32 flipped bits and costs 0.56 ms per MB here (56 ms for ResNet-50's 100 MB).
SEAL = struct.Struct("<8sIIQ")
SEAL_MAGIC = b"KILNSEAL"
SEAL_VERSION = 1

# ELF e_machine values
MACHINES = {62: "x86_64", 183: "aarch64"}


def check_elf(path: Path, expect_arch: str | None = None, data: bytes | memoryview | None = None) -> str:
    """The architecture of a shared library, read from its ELF headers before anything loads it.

    dlopen of a truncated library dies with SIGBUS when it touches a page past the end of the file, so every
    segment and the section table must lie inside the file first. Every offset is checked against the size
    before it is used: random bytes may hold any 64-bit value there. `data` is the whole file when the caller
    has read it already.
    """
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a directory, not a Kiln artifact") from None
    except OSError as err:
        raise ArtifactError(f"cannot read artifact {str(path)!r}: {err.strerror}") from None
    head, size = data[:64], len(data)
    if len(head) < 64 or head[:4] != b"\x7fELF":
        raise ArtifactError(f"{path} is not a Kiln artifact (not an ELF shared library)")
    if head[4] != 2 or head[5] != 1:
        raise ArtifactError(f"{path} is not a 64-bit little-endian library")
    (e_type, machine) = struct.unpack_from("<HH", head, 16)
    if e_type != 3:
        raise ArtifactError(f"{path} is not a shared library (ELF type {e_type})")
    arch = MACHINES.get(machine, f"machine {machine}")
    if expect_arch is not None and arch != expect_arch:
        how = " or under qemu-user: `kiln run --qemu` (kiln.runtime.qemu)" if arch == "aarch64" else ""
        raise ArtifactError(f"{path} was built for {arch}; this machine is {expect_arch}: run it on an {arch} "
                            f"machine{how}")
    (phoff, shoff) = struct.unpack_from("<QQ", head, 32)
    (phentsize, phnum, shentsize, shnum) = struct.unpack_from("<HHHH", head, 54)
    truncated = phentsize < 56 or phoff + phentsize * phnum > size or shoff + shentsize * shnum > size
    for k in range(0 if truncated else phnum):
        at = phoff + k * phentsize
        p_type, _flags, p_offset = struct.unpack_from("<IIQ", data, at)
        (p_filesz,) = struct.unpack_from("<Q", data, at + 32)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD past the end of the file
            truncated = True
    if truncated:
        raise ArtifactError(f"{path} is truncated or corrupted ({size} bytes; its ELF headers point past the end); "
                            f"copy or rebuild it")
    return arch


def seal(path: Path) -> None:
    """Append the seal: a checksum of every byte before it, so a load notices any flipped bit in code,
    metadata or weights before anything runs (the dynamic loader ignores bytes past the ELF contents)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "ab") as f:
        f.write(SEAL.pack(SEAL_MAGIC, SEAL_VERSION, zlib.crc32(data), len(data)))


def read_artifact(path: Path, expect_arch: str | None = None) -> tuple[memoryview, bool]:
    """The whole file, checked: ELF headers inside the file, the seal's checksum when it has one.

    Returns the bytes without the seal, and whether a seal vouched for them (artifacts written before the seal
    have none: their metadata lacks `sealed`, which the loader checks once it can read the metadata).
    """
    if not path.is_file():
        what = "is a directory, not a Kiln artifact" if path.is_dir() else "does not exist"
        raise ArtifactError(f"artifact {str(path)!r} {what}")
    try:
        with open(path, "rb") as f:
            data = memoryview(f.read())
    except OSError as err:
        raise ArtifactError(f"cannot read artifact {str(path)!r}: {err.strerror}") from None
    sealed = len(data) > SEAL.size and data[-SEAL.size:-SEAL.size + len(SEAL_MAGIC)] == SEAL_MAGIC
    if sealed:
        _magic, version, crc, length = SEAL.unpack_from(data, len(data) - SEAL.size)
        if version > SEAL_VERSION:
            raise ArtifactError(f"{path} has seal version {version}; this Kiln reads ≤ {SEAL_VERSION}: upgrade Kiln")
        data = data[:-SEAL.size]
        if length != len(data) or zlib.crc32(data) != crc:
            raise ArtifactError(f"{path} is corrupted (its checksum does not match its contents: a flipped bit, "
                                f"an edit or a partial copy); copy or rebuild it")
    check_elf(path, expect_arch, data)
    return data, sealed


def weights_path(path: Path, meta: dict) -> Path | None:
    """The weights file beside an artifact whose weights are external (`model.weights`); None when embedded."""
    name = meta.get("weights_file")
    return None if name is None else Path(path).with_name(name)


def read_weights_file(path: Path, meta: dict) -> bytes:
    """The external weights of the artifact at `path` (validated metadata `meta`), checked against the size and
    CRC-32 its metadata records."""
    wpath = weights_path(path, meta)
    if wpath is None:
        raise ArtifactError(f"{path} embeds its weights; there is no weights file to read")
    how = (f"copy it beside the artifact, or make it there with `python -m kiln.rebuild_weights <model> --target "
           f"<target> [the build's options] --artifact {path.name} -o {wpath.name}`")
    try:
        data = wpath.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path} keeps its weights in {wpath.name} beside it, which does not exist; {how}") from None
    except OSError as err:
        raise ArtifactError(f"cannot read weights file {str(wpath)!r}: {err.strerror}") from None
    n, crc = meta.get("weights_nbytes", 0), meta.get("weights_crc32")
    if len(data) != n or (crc is not None and zlib.crc32(data) != crc):
        raise ArtifactError(f"{wpath} does not belong to {path.name}: {len(data)} bytes with CRC-32 "
                            f"{zlib.crc32(data):#010x}, the artifact expects {n} bytes with CRC-32 "
                            f"{(crc or 0):#010x} (another model, build options or a partial copy); {how}")
    return data


def elf_symbols(data: bytes | memoryview) -> dict[str, tuple[int, int]]:
    """name → (file offset, size) of every symbol in an ELF file's .symtab and .dynsym whose bytes are in the file
    (check_elf has checked the section table lies inside it)."""
    (shoff,) = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    # (type, address, file offset, size, link, entry size) of each section
    sections = [struct.unpack_from("<4xI8xQQQI12xQ", data, shoff + k * shentsize) for k in range(shnum)]
    out: dict[str, tuple[int, int]] = {}
    for sh_type, _addr, offset, size, link, entsize in sections:
        if sh_type not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[link][2]
        for at in range(offset, offset + size, entsize):
            st_name, _info, _other, shndx, value, st_size = struct.unpack_from("<IBBHQQ", data, at)
            if not st_name or not 0 < shndx < len(sections) or sections[shndx][0] == 8:  # SHT_NOBITS: no bytes
                continue
            name = bytes(data[strtab + st_name:strtab + st_name + 256]).split(b"\0", 1)[0].decode(errors="replace")
            _type, addr, sec_offset = sections[shndx][:3]
            out.setdefault(name, (value - addr + sec_offset, st_size))
    return out


def read_meta(path: Path) -> dict:
    """An artifact's metadata read from the file, without loading it (no TVM, no CUDA driver): the bytes between
    the blob's labels in the symbol table. Checked like a load checks them (seal, ELF headers, fields)."""
    data, sealed = read_artifact(Path(path))
    try:
        symbols = elf_symbols(data)
        start, end = symbols[f"{META_SYMBOL}_s"][0], symbols[f"{META_SYMBOL}_e"][0]
    except struct.error:
        raise ArtifactError(f"{path}: its symbol table is corrupted; copy or rebuild it") from None
    except KeyError:
        raise ArtifactError(f"{path}: no metadata labels in its symbol table (stripped, or not a Kiln artifact)") from None
    try:
        meta = json.loads(bytes(data[start:end]))
    except (ValueError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: metadata is corrupted ({err})") from None
    validate_metadata(meta, Path(path))
    if meta.get("sealed") and not sealed:
        raise ArtifactError(f"{path} lost its seal (the checksum at its end): truncated or corrupted; copy or rebuild it")
    return meta


_DLPACK_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}  # int, uint, float, bool (DLPack's kDLBool)
_DLPACK_BFLOAT = 4


def tensor_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a tensor dtype name; bfloat16 comes from ml_dtypes (which TVM itself depends on)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    dtype = np.dtype(name)
    if dtype.kind not in _DLPACK_CODES:
        raise TypeError(f"{name} is not a tensor dtype")
    return dtype


def dlpack_code(dtype: np.dtype) -> tuple[int, int]:
    """DLPack's type code and bit width for a tensor dtype."""
    if dtype.kind == "V" and dtype.name == "bfloat16":
        return _DLPACK_BFLOAT, 16
    return _DLPACK_CODES[dtype.kind], dtype.itemsize * 8


def validate_metadata(meta: dict, path: Path) -> None:
    """Every field the loader reads, with its type and its bounds: a kernel trusts the shapes and offsets it is
    handed, so a damaged field must stop the load, not become an out-of-bounds write."""
    if not isinstance(meta, dict) or meta.get("magic") != "kiln":
        raise ArtifactError(f"{path} is a shared library but not a Kiln artifact (no Kiln metadata)")
    fmt = meta.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise ArtifactError(f"{path} has artifact format {fmt}; this Kiln reads format ≤ {FORMAT}: upgrade Kiln")
    for key in ("inputs", "outputs", "blocks", "values", "steps"):
        if not isinstance(meta.get(key), list):
            raise ArtifactError(f"{path}: metadata lacks '{key}' (corrupted?)")

    def bad(where: str, what: str) -> ArtifactError:
        return ArtifactError(f"{path}: metadata {where} {what} (corrupted?); rebuild the artifact")

    def count(v, where: str, limit: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (limit is not None and v >= limit):
            raise bad(where, f"is {v!r}, expected an integer in [0, {limit if limit is not None else '∞'})")
        return v

    def nbytes(d, where: str) -> int:
        if not isinstance(d, dict) or not isinstance(d.get("shape"), list) or not isinstance(d.get("dtype"), str):
            raise bad(where, "lacks a shape or a dtype")
        try:
            dtype = tensor_dtype(d["dtype"])
        except (TypeError, ImportError):
            raise bad(f"{where}.dtype", f"is {d['dtype']!r}, not a tensor dtype") from None
        n = dtype.itemsize
        for k, dim in enumerate(d["shape"]):
            n *= count(dim, f"{where}.shape[{k}]", 1 << 40)
        return n

    for key in ("inputs", "outputs"):
        for i, t in enumerate(meta[key]):
            nbytes(t, f"{key}[{i}]")
            if not isinstance(t.get("name"), str):
                raise bad(f"{key}[{i}].name", "is not a string")
    blocks = [count(b, f"blocks[{i}]") for i, b in enumerate(meta["blocks"])]
    weights = count(meta.get("weights_nbytes", 0), "weights_nbytes")
    for i, v in enumerate(meta["values"]):
        where = f"values[{i}]"
        n = nbytes(v, where)
        kind = v.get("kind")
        if kind in ("input", "output"):
            count(v.get("index"), f"{where}.index", len(meta[kind + "s"]))
        elif kind == "const":
            if count(v.get("offset"), f"{where}.offset") + n > weights:
                raise bad(where, f"reaches past the {weights} weight bytes")
        elif kind == "block":
            b = count(v.get("block"), f"{where}.block", len(blocks))
            if count(v.get("offset", 0), f"{where}.offset") + n > blocks[b]:
                raise bad(where, f"reaches past its block's {blocks[b]} bytes")
        else:
            raise bad(f"{where}.kind", f"is {kind!r}")
    for i, step in enumerate(meta["steps"]):
        if not isinstance(step, dict) or not isinstance(step.get("kernel"), str) or not isinstance(
                step.get("args"), list):
            raise bad(f"steps[{i}]", "lacks a kernel name or its args")
        for k, a in enumerate(step["args"]):
            count(a, f"steps[{i}].args[{k}]", len(meta["values"]))
    for key in ("entry", "pool"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(key, "is not a string")
    wfile = meta.get("weights_file")
    if wfile is not None and (not isinstance(wfile, str) or not wfile or Path(wfile).name != wfile or fmt < 3):
        raise bad("weights_file", f"is {wfile!r}, expected a file name beside the artifact (format ≥ 3)")
